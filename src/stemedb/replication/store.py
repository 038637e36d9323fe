"""The store as replication sees it: ordered items per scope, reading rows, verified intake.

Owns: `EngineStore`, the adapter between one open Database and the
replication code — a RangeTree per scope (the whole store, the global
partition, each partition) kept from the engine's write notifications and a
scan at open, the reads of records by record number, and the storing of
records that came from a peer, each verified first exactly like a client's
write (ID recomputed, signatures or envelope membership checked); and
`Intake`, which holds back members whose envelope has not arrived yet within
one session. Must never: store a record that did not verify, store part of a
batch in which any record is forged, or serve a held-back member.

This adapter is interim: the engine will keep the trees beside its ID index
(docs/replication.md, "Interface requests"). Until then it reads the engine's
columns (read through `db.view`) and subscribes to its write notifications.

Threads: every method may be called from a worker thread. `lock` guards the
trees; hold it while a reconciliation step reads `items()` (the listener
takes it too, so a step sees no half-added batch). Never read records while
holding it (the engine's state lock is taken inside the engine, and the
listener holds that one while it waits for this one).
Error handling: a forged or malformed record raises SignatureError or
InvalidRecord naming the record; nothing of its batch is stored. StorageFull,
DurabilityError and CorruptionError pass through from the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stemedb import _codec, _reconcile
from stemedb.errors import InvalidRecord, NotFound, SignatureError
from stemedb.records import Envelope, check_envelope_members
from stemedb.replication.framing import RecordBatch, concat
from stemedb.replication.placement import Placement, scopes_of
from stemedb.replication.reconcile import WHOLE_STORE

PROBE_SALT = bytes(8)   # the salt of fingerprints that are compared across nodes (status, tests)


class ReplicaStore(Protocol):
    """What the replication code needs of a store (EngineStore; the tests' in-memory stores)."""

    lock: threading.RLock

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]: ...
    def read_rows(self, rows: np.ndarray) -> RecordBatch: ...
    def record_sizes(self, rows: np.ndarray) -> np.ndarray: ...
    def read_ids(self, ids: list[bytes]) -> RecordBatch: ...
    def verify(self, batch: RecordBatch) -> Verified: ...
    def store(self, verified: Verified) -> int: ...


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
    """A Database seen by replication: trees per scope, row reads, verified stores."""

    def __init__(self, db: Any, placement: Placement) -> None:
        self.db = db
        self.placement = placement
        self.lock = threading.RLock()
        self._trees: dict[int, _reconcile.RangeTree] = {WHOLE_STORE: _reconcile.RangeTree()}
        with self.lock:
            # Batches numbered from `start` on reach _on_write; the rows below it are read here.
            start = db.view.subscribe(self._on_write)
            if start:
                snapshot = db.view.snapshot()
                self._add_rows(np.arange(start, dtype=np.uint32),
                               snapshot.arrays["kind"][:start], snapshot.arrays["subject"][:start])

    def close(self) -> None:
        self.db.view.unsubscribe(self._on_write)

    # ---------------------------------------------------------------- items

    def _on_write(self, recnos: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        with self.lock:
            self._add_rows(recnos, columns["kind"], columns["subject"])

    def _add_rows(self, rows: np.ndarray, kinds: np.ndarray, subjects: np.ndarray) -> None:
        timestamps, ids = self._columns()
        self._trees[WHOLE_STORE].add(rows, timestamps, ids)
        scopes = scopes_of(self.placement.partitions_of_columns(kinds, subjects))
        for scope in np.unique(scopes).tolist():
            tree = self._trees.get(scope)
            if tree is None:
                tree = self._trees[scope] = _reconcile.RangeTree()
            tree.add(np.ascontiguousarray(rows[scopes == scope]), timestamps, ids)

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.db.view.snapshot().arrays
        return arrays["timestamp"], arrays["id"]

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]:
        """(tree, timestamps, ids) of a scope; call with `lock` held."""
        tree = self._trees.get(scope)
        if tree is None:
            tree = self._trees[scope] = _reconcile.RangeTree()
        return (tree, *self._columns())

    def count(self, scope: int) -> int:
        with self.lock:
            tree = self._trees.get(scope)
            return len(tree) if tree is not None else 0

    def fingerprint(self, scope: int) -> bytes:
        """The 16-byte fingerprint of a whole scope under PROBE_SALT (equal sets, equal bytes)."""
        with self.lock:
            tree, timestamps, ids = self.items(scope)
            return tree.fingerprint((0, b""), None, timestamps, ids, PROBE_SALT)

    def scopes(self) -> list[int]:
        with self.lock:
            return sorted(self._trees)

    def ids_of_scope(self, scope: int) -> set[bytes]:
        """Every ID held in a scope (for tests and small stores)."""
        with self.lock:
            tree, _, ids = self.items(scope)
            rows = tree.rows()
            return {bytes(ids[r]) for r in rows}

    # ---------------------------------------------------------------- reads

    def read_rows(self, rows: np.ndarray) -> RecordBatch:
        """The stored records with these record numbers (checksums checked by the engine)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return RecordBatch.empty()
        ids = np.ascontiguousarray(self.db.view.snapshot().arrays["id"][rows])
        blob, offsets, found = self.db.get_encoded_many(ids)
        if (found < 0).any():
            missing = bytes(ids[int(np.argmax(found < 0))]).hex()
            raise NotFound(f"record {missing} is in a replication tree but not in the store")
        return RecordBatch(blob, offsets, ids)

    def record_sizes(self, rows: np.ndarray) -> np.ndarray:
        """Encoded bytes of each record number (from the engine's `length` column)."""
        lengths = self.db.view.snapshot().arrays["length"]
        return np.asarray(lengths[np.asarray(rows, dtype=np.int64)], dtype=np.int64)

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
        records = verified.records
        if len(verified.batch_members):
            members = [records[bytes(i)] for i in verified.batch_members.ids]
            envelopes = [records[bytes(i)] for i in verified.envelopes.ids]
            self.db.put_many(members, envelope=envelopes)
        elif len(verified.envelopes):
            self.db.put_many([records[bytes(i)] for i in verified.envelopes.ids])
        if len(verified.others):
            self.db.put_many([records[bytes(i)] for i in verified.others.ids])
        return verified.storable


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
        verified = self.store.verify(batch)
        stored = self.store.store(verified)
        self.stored += stored
        if len(verified.waiting):
            self.held.append(verified.waiting)
        if stored and self.held and len(verified.envelopes):
            self._retry()
        return stored

    @property
    def held_records(self) -> int:
        return sum(len(b) for b in self.held)

    def _retry(self) -> RecordBatch:
        held, self.held = concat(self.held), []
        verified = self.store.verify(held)
        self.stored += self.store.store(verified)
        if len(verified.waiting):
            self.held = [verified.waiting]
        return verified.waiting

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
