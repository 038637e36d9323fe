"""Forged records, as a compromised peer or a tampering network would send them.

Owns: the three forgeries of RELIABILITY.md's forged-peer row, made from an
honest assertion: `bad_signature` (content changed, signatures kept, sent
under its new ID), `wrong_id` (content changed, sent under the old ID), and
`orphan_member` (a member of an envelope that does not exist); and
`Tamperer`, the network's forge hook, which substitutes one of them for a
record of a REPLICA_PUT, PUSH or SYNC frame (request or answer). Every forged record's true ID is added to `forged_ids`,
so a test can assert that none of them was ever stored. Must never: produce
a record that would verify.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from stemedb import _codec, _protocol
from stemedb._protocol import Frame
from stemedb.records import Assertion
from stemedb.replication import framing
from stemedb.replication.framing import RecordBatch

KINDS = ("bad_signature", "wrong_id", "orphan_member")


def altered(record: Any) -> Assertion:
    """The same claim one microsecond later, with no proof: new content, new ID."""
    return Assertion(record.subject, record.predicate, record.object, confidence=record.confidence,
                     timestamp=record.timestamp + 1, source_class=record.source_class,
                     lifecycle=record.lifecycle, signers=record.signers)


def forge(record: Any, kind: str, rng: random.Random) -> tuple[bytes, bytes, bytes]:
    """(encoded bytes, the ID it is sent under, its true ID) of a forgery made from `record`."""
    copy = altered(record)
    if kind == "orphan_member":
        envelope = rng.getrandbits(256).to_bytes(32, "little")
        forged = copy._with_proof(record.signers, (), envelope)
    elif record.envelope is not None:
        forged = copy._with_proof(record.signers, (), record.envelope)   # not listed in it
    else:
        forged = copy._with_proof(record.signers, record._signature_entries, None)
    encoded = forged.encode()
    true_id = forged.id
    sent_as = record.id if kind == "wrong_id" else true_id
    return encoded, sent_as, true_id


def replace(batch: RecordBatch, index: int, encoded: bytes, sent_as: bytes) -> RecordBatch:
    before = batch.select(np.arange(index, dtype=np.int64))
    after = batch.select(np.arange(index + 1, len(batch), dtype=np.int64))
    middle = RecordBatch(encoded, np.array([0, len(encoded)], dtype=np.int64),
                         np.frombuffer(sent_as, dtype=np.uint8).reshape(1, 32))
    return framing.concat([before, middle, after])


class Tamperer:
    """Substitutes forged records into frames; remembers every forged ID."""

    def __init__(self) -> None:
        self.forged_ids: set[bytes] = set()
        self.by_kind = dict.fromkeys(KINDS, 0)

    def __call__(self, frame: Frame, rng: random.Random, source: str = "", target: str = "") -> Frame | None:
        response = bool(frame.flags & _protocol.RESPONSE)
        if frame.opcode == _protocol.ERROR or (response and frame.opcode != _protocol.SYNC):
            return None
        if frame.opcode == _protocol.PUSH:
            return self._swap(frame, framing.decode_push(frame.payload), rng,
                              lambda b: framing.encode_records(b))
        if frame.opcode == _protocol.REPLICA_PUT:
            batch, push = framing.decode_replica_put(frame.payload)
            return self._swap(frame, batch, rng, lambda b: framing.encode_replica_put(b, push=push))
        if frame.opcode == _protocol.SYNC and response:
            answer = framing.decode_sync_answer(frame.payload)

            def encode_answer(b: RecordBatch) -> bytes:
                answer.records = b
                return framing.encode_sync_answer(answer)
            return self._swap(frame, answer.records, rng, encode_answer)
        if frame.opcode == _protocol.SYNC:
            request = framing.decode_sync_request(frame.payload)

            def encode_request(b: RecordBatch) -> bytes:
                request.records = b
                return framing.encode_sync_request(request)
            return self._swap(frame, request.records, rng, encode_request)
        return None

    def _swap(self, frame: Frame, batch: RecordBatch, rng: random.Random, encode: Any) -> Frame | None:
        records = _codec.decode_many(batch.blob, batch.offsets) if len(batch) else []
        choices = [i for i, r in enumerate(records) if isinstance(r, Assertion)]
        if not choices:
            return None
        index = rng.choice(choices)
        kind = rng.choice(KINDS)
        encoded, sent_as, true_id = forge(records[index], kind, rng)
        self.forged_ids.add(true_id)
        self.by_kind[kind] += 1
        payload = encode(replace(batch, index, encoded, sent_as))
        return Frame(frame.opcode, frame.flags, frame.request_id, payload)
