"""The store as replication sees it: ordered items per scope, reading rows, verified intake.

Owns: `EngineStore`, the adapter between one open Database and the
replication code — the engine's range trees per scope (the whole store, the
global partition, each partition: `Database.reconcile_items`, kept by the
engine beside its ID index), the reads of records by record number, and the
storing of records that came from a peer, each verified first exactly like
a client's write (ID recomputed, signatures or envelope membership checked);
and `Intake`, which holds back members whose envelope has not arrived yet
within one session. Must never: store a record that did not verify, store
part of a batch in which any record is forged, or serve a held-back member.

`accept` is the intake path: one engine call (`Database.put_encoded` with
`hold_back=True`) verifies and stores a batch and hands back the members it
held. `verify` (decode and verify, for callers that need the records as
objects) and `store` (store what verified) are the two-step path; `store`
also goes through `put_encoded`, so the engine checks the bytes it stores.

Threads: every method may be called from a worker thread. `lock` is the
engine's state lock (`Database.reconcile_lock`); hold it while a
reconciliation step reads `items()` — a writer indexes each batch under
it, so a step sees no half-added batch. It is reentrant, and the engine
takes it itself for reads, so reading records while holding it is allowed,
but keep what runs under it short: writers wait for it.
Error handling: a forged or malformed record raises SignatureError or
InvalidRecord naming the record; nothing of its batch is stored. StorageFull,
DurabilityError and CorruptionError pass through from the engine. An
EngineStore over a store kept for another partition count than the cluster
file's raises ConfigError naming both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stemedb import _codec, _reconcile
from stemedb.errors import InvalidRecord, NotFound, SignatureError
from stemedb.records import Envelope, RecordKind, check_envelope_members
from stemedb.replication.framing import RecordBatch, concat
from stemedb.replication.placement import Placement

PROBE_SALT = bytes(8)   # the salt of fingerprints that are compared across nodes (status, tests)


class ReplicaStore(Protocol):
    """What the replication code needs of a store (EngineStore; the tests' in-memory stores)."""

    lock: threading.RLock

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]: ...
    def read_rows(self, rows: np.ndarray) -> RecordBatch: ...
    def record_sizes(self, rows: np.ndarray) -> np.ndarray: ...
    def envelope_mask(self, rows: np.ndarray) -> np.ndarray: ...
    def read_ids(self, ids: list[bytes]) -> RecordBatch: ...
    def verify(self, batch: RecordBatch) -> Verified: ...
    def store(self, verified: Verified) -> int: ...
    def accept(self, batch: RecordBatch) -> tuple[int, RecordBatch]: ...


@dataclass
class Verified:
    """A batch split by how each record is proven; everything but `waiting` has verified."""

    envelopes: RecordBatch            # envelopes in the batch (their signatures checked)
    batch_members: RecordBatch        # members of those envelopes (membership checked)
    others: RecordBatch               # individually signed, or members of stored envelopes
    waiting: RecordBatch              # members of an envelope neither in the batch nor stored
    records: dict[bytes, Any] = field(default_factory=dict)   # ID → decoded record

    @property
    def storable(self) -> int:
        return len(self.envelopes) + len(self.batch_members) + len(self.others)


class EngineStore:
    """A Database seen by replication: its trees per scope, row reads, verified stores."""

    def __init__(self, db: Any, placement: Placement | None) -> None:
        """`placement` None: the whole store only (scope 0), as between two single stores."""
        self.db = db
        self.placement = placement
        # The engine keeps the trees; a store opened without partitions= starts keeping them
        # now (recorded in its MANIFEST; a store kept for another count raises ConfigError).
        if placement is not None:
            db.keep_partitions(placement.partitions)
        self.lock = db.reconcile_lock()

    def close(self) -> None:
        """Nothing to release: the trees are the engine's (kept as long as the store is open)."""

    # ---------------------------------------------------------------- items

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]:
        """(tree, timestamps, ids) of a scope; call with `lock` held."""
        return self.db.reconcile_items(scope)  # type: ignore[no-any-return]

    def count(self, scope: int) -> int:
        with self.lock:
            return len(self.items(scope)[0])

    def fingerprint(self, scope: int) -> bytes:
        """The 16-byte fingerprint of a whole scope under PROBE_SALT (equal sets, equal bytes)."""
        with self.lock:
            tree, timestamps, ids = self.items(scope)
            return tree.fingerprint((0, b""), None, timestamps, ids, PROBE_SALT)

    def scopes(self) -> list[int]:
        """Scope 0 and every scope holding a record."""
        return self.db.reconcile_scopes()  # type: ignore[no-any-return]

    def ids_of_scope(self, scope: int) -> set[bytes]:
        """Every ID held in a scope (for tests and small stores)."""
        with self.lock:
            tree, _, ids = self.items(scope)
            return {bytes(ids[r]) for r in tree.rows()}

    # ---------------------------------------------------------------- reads

    def read_rows(self, rows: np.ndarray) -> RecordBatch:
        """The stored records with these record numbers (checksums checked by the engine)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return RecordBatch.empty()
        ids = self.db.ids_of_rows(rows)
        blob, offsets, found = self.db.get_encoded_many(ids)
        if (found < 0).any():
            missing = bytes(ids[int(np.argmax(found < 0))]).hex()
            raise NotFound(f"record {missing} is in a replication tree but not in the store")
        return RecordBatch(blob, offsets, ids)

    def record_sizes(self, rows: np.ndarray) -> np.ndarray:
        """Encoded bytes of each record number (from the engine's `length` column)."""
        return self.db.record_lengths(rows)  # type: ignore[no-any-return]

    def envelope_mask(self, rows: np.ndarray) -> np.ndarray:
        """Which of these record numbers are envelopes (from the engine's `kind` column)."""
        return self.db.record_kinds(rows) == RecordKind.ENVELOPE  # type: ignore[no-any-return]

    def read_ids(self, ids: list[bytes]) -> RecordBatch:
        """The stored records with these IDs (NotFound naming the first one absent)."""
        array = np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 32) if ids else \
            np.zeros((0, 32), dtype=np.uint8)
        blob, offsets, found = self.db.get_encoded_many(array)
        if (found < 0).any():
            raise NotFound(f"no record with ID {ids[int(np.argmax(found < 0))].hex()}")
        return RecordBatch(blob, offsets, array)

    # --------------------------------------------------------------- intake

    def verify(self, batch: RecordBatch) -> Verified:
        return verify_batch(batch, self._stored_envelope)

    def _stored_envelope(self, envelope_id: bytes) -> Envelope | None:
        try:
            record = self.db.get(envelope_id)
        except NotFound:
            return None
        return record if isinstance(record, Envelope) else None

    def store(self, verified: Verified) -> int:
        """Store what verified; returns how many records were offered to the engine."""
        if not verified.storable:
            return 0
        # Envelopes first, then the members they prove, then the rest: one durable batch.
        batch = concat([verified.envelopes, verified.batch_members, verified.others])
        self.db.put_encoded(batch.blob, batch.offsets, ids=batch.ids)
        return verified.storable

    def accept(self, batch: RecordBatch) -> tuple[int, RecordBatch]:
        """Verify and store a batch from a peer in one engine call: (records stored, held back).

        Held back: members whose envelope is neither in the batch nor
        stored (not judged, not stored). A forged record refuses the whole
        batch (SignatureError / InvalidRecord naming it).
        """
        if not len(batch):
            return 0, RecordBatch.empty()
        result = self.db.put_encoded(batch.blob, batch.offsets, ids=batch.ids, hold_back=True)
        return int(result.stored.sum()), batch.select(result.held)


StoredEnvelope = Callable[[bytes], "Envelope | None"]


def verify_batch(batch: RecordBatch, stored_envelope: StoredEnvelope) -> Verified:
    """Check every record of `batch` as a client's write is checked; raise on the first forged one.

    The ID each record came with must be the ID of its content; an envelope
    must carry its signer's signature; a member must be listed in its
    envelope (in the batch or stored) by that envelope's signer; any other
    record must carry valid signatures of all its signers. Members whose
    envelope is nowhere yet are returned in `waiting`, unjudged.
    """
    if not len(batch):
        empty = RecordBatch.empty()
        return Verified(empty, empty, empty, empty)
    records = _codec.decode_many(batch.blob, batch.offsets)
    computed = _codec.ids_of(records)
    claimed = np.ascontiguousarray(batch.ids, dtype=np.uint8)
    wrong = np.nonzero((computed != claimed).any(axis=1))[0]
    if len(wrong):
        index = int(wrong[0])
        raise InvalidRecord(f"records[{index}]: came as {bytes(claimed[index]).hex()} but its content "
                            f"is {bytes(computed[index]).hex()}")
    by_id = {bytes(claimed[i]): record for i, record in enumerate(records)}
    envelope_rows = [i for i, r in enumerate(records) if isinstance(r, Envelope)]
    in_batch = {bytes(claimed[i]) for i in envelope_rows}
    stored: dict[bytes, Envelope | None] = {}
    batch_members, others, waiting = [], [], []
    for index, record in enumerate(records):
        if isinstance(record, Envelope):
            continue
        if record.envelope is None:
            _verify_signed(record, index)
            others.append(index)
        elif record.envelope in in_batch:
            batch_members.append(index)
        else:
            if record.envelope not in stored:
                stored[record.envelope] = stored_envelope(record.envelope)
            envelope = stored[record.envelope]
            if envelope is None:
                waiting.append(index)
                continue
            if record.signers != (envelope.signer,) or bytes(claimed[index]) not in set(envelope.members):
                raise SignatureError(f"records[{index}] ({bytes(claimed[index]).hex()}): not a member "
                                     f"of envelope {record.envelope.hex()}")
            others.append(index)
    envelopes = [records[i] for i in envelope_rows]
    members = batch.select(np.array(batch_members, dtype=np.int64))
    if batch_members:
        check_envelope_members(envelopes, bytes(members.blob), members.offsets, members.ids)
    else:
        for index in envelope_rows:
            _verify_signed(records[index], index)
    return Verified(batch.select(np.array(envelope_rows, dtype=np.int64)), members,
                    batch.select(np.array(others, dtype=np.int64)),
                    batch.select(np.array(waiting, dtype=np.int64)), by_id)


def _has_envelope(batch: RecordBatch) -> bool:
    """Whether the batch holds an envelope (the kind column, without decoding the records)."""
    lengths = np.diff(batch.offsets).astype(np.uint32)
    kinds = _codec.extract_columns(batch.blob, batch.offsets[:-1], lengths)["kind"]
    return bool((kinds == RecordKind.ENVELOPE).any())


def _verify_signed(record: Any, index: int) -> None:
    try:
        record.verify()
    except SignatureError as exc:
        raise SignatureError(f"records[{index}]: {exc}") from None


class Intake:
    """Records arriving from one peer in one session, members held back until their envelope arrives.

    `accept(batch)` verifies and stores what it can; `finish()` retries the
    held-back members and refuses any whose envelope never came. Blocking:
    call it through the node's run-blocking hook.
    """

    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.held: list[RecordBatch] = []
        self.stored = 0
        self.received = 0

    def accept(self, batch: RecordBatch) -> int:
        self.received += len(batch)
        stored, waiting = self.store.accept(batch)
        self.stored += stored
        if len(waiting):
            self.held.append(waiting)
        if stored and self.held and _has_envelope(batch):
            self._retry()
        return stored

    @property
    def held_records(self) -> int:
        return sum(len(b) for b in self.held)

    def _retry(self) -> RecordBatch:
        held, self.held = concat(self.held), []
        stored, waiting = self.store.accept(held)
        self.stored += stored
        if len(waiting):
            self.held = [waiting]
        return waiting

    def finish(self) -> None:
        """End of the session: a member still without its envelope is forged."""
        if not self.held:
            return
        waiting = self._retry()
        if len(waiting):
            self.held = []
            record = _codec.decode_many(waiting.blob, waiting.offsets)[0]
            raise SignatureError(f"record {bytes(waiting.ids[0]).hex()}: its envelope "
                                 f"{record.envelope.hex()} was never sent ({len(waiting)} members "
                                 "held back and refused)")
