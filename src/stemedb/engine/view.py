"""What the layers above the engine may read, and how they learn of writes.

Owns: `ReadView`, the typed read side of an open store for the query engine,
the lenses, replication and the server: the record count, consistent
snapshots of the column arrays, posting lists, ID lookups and reads of
records by record number; and `WriteNotifier`, which tells subscribers of
every durable batch once it is indexed. Must never: hand out the state lock,
the engine's private state, or anything a caller could use to write.

Write notifications: a listener is called as `listener(record_numbers,
columns)` — the batch's record numbers (uint32, ascending) and its column
arrays (`_codec.COLUMNS` plus location and length, one row per record) —
in the leader's thread, after the records are indexed and the state lock is
released, in commit order, before any writer of that batch is acknowledged.
So once `put` returns, every listener has seen its records. A listener may
read the store (through this view) and update its own structures; it must
be quick (the batch's writers wait for it), must not raise (an exception is
logged and the other listeners still run; the write stays durable), must not
write to the store or wait for anything that writes (the leader would wait
for itself), and must not keep the arrays it is given beyond the call
without copying them.

Resource handling: nothing but memory. Error handling: reads raise what the
engine raises (NotFound, CorruptionError naming file and offset).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from stemedb._codec import Record
from stemedb.engine.indexes import POSTINGS, State

log = logging.getLogger("stemedb.engine")

Columns = Mapping[str, np.ndarray]
Listener = Callable[[np.ndarray, Columns], None]


class RecordReader(Protocol):
    """What the view reads records through (engine/reads.py)."""

    def records_at(self, rows: np.ndarray) -> list[Record]: ...
    def record_at(self, row: int) -> Record: ...
    def gather(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]: ...


class Snapshot:
    """The column arrays at one instant: rows below `count` are valid and never change.

    The arrays are the engine's own (not copies) and may be longer than
    `count`; a later write appends rows after `count` or moves the columns
    to larger arrays, never changes these rows. Read-only. (A plain slotted
    class: one is made per query.)
    """

    __slots__ = ("count", "arrays")

    def __init__(self, count: int, arrays: Mapping[str, np.ndarray]) -> None:
        self.count = count
        self.arrays = arrays

    def column(self, name: str) -> np.ndarray:
        """Rows [0, count) of one column."""
        return self.arrays[name][:self.count]


class Postings:
    """One family of posting lists (record numbers by key, ascending), read under the state lock."""

    def __init__(self, state: State, lock: threading.RLock, name: str) -> None:
        self._index = state.postings[name]
        self._lock = lock

    def get(self, key: int, below: int | None = None) -> np.ndarray:
        """Record numbers with this key (those below `below` only, if given)."""
        with self._lock:
            rows = self._index.get(key)
        return rows if below is None else rows[rows < below]

    def get_many(self, keys: np.ndarray, below: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(record numbers, offsets): those of keys[i] are flat[offsets[i]:offsets[i+1]].

        With `below`, only record numbers below it (a snapshot's count): a
        posting list may already hold records written after the snapshot.
        """
        with self._lock:
            flat, offsets = self._index.get_many(keys)
        if below is None or not len(flat) or int(flat.max()) < below:
            return flat, offsets
        keep = flat < below
        kept_before = np.concatenate(([0], np.cumsum(keep))).astype(np.int64)
        return flat[keep], kept_before[offsets]


class WriteNotifier:
    """The subscribers to write notifications (see the module doc for the contract)."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()

    def subscribe(self, listener: Listener) -> None:
        """Add a listener (call under the state lock, so no batch falls between)."""
        self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)  # bound methods are equal, never identical

    def current(self) -> tuple[Listener, ...]:
        """The listeners of a batch being indexed (taken under the state lock)."""
        return self._listeners

    @staticmethod
    def deliver(listeners: Sequence[Listener], record_numbers: np.ndarray, columns: Columns) -> None:
        """Call each listener of the batch (after the state lock is released)."""
        for listener in listeners:
            try:
                listener(record_numbers, columns)
            except Exception:
                log.exception("a write listener raised; the batch is durable and indexed")


class ReadView:
    """The read side of an open store (see the module doc). Thread-safe."""

    def __init__(self, state: State, lock: threading.RLock, reader: RecordReader,
                 notifier: WriteNotifier, check_open: Callable[[], None]) -> None:
        self._state = state
        self._lock = lock
        self._reader = reader
        self._notifier = notifier
        self._check_open = check_open   # raises StemeError once the store is closed
        self._postings = {name: Postings(state, lock, name) for name in POSTINGS}
        self._arrays: dict[str, np.ndarray] | None = None   # the column dict snapshots share
        self._arrays_generation = -1

    @property
    def count(self) -> int:
        """Records indexed so far (record numbers are 0 .. count-1, in write order)."""
        return self._state.count

    def snapshot(self) -> Snapshot:
        """The count and the column arrays, taken together (see Snapshot).

        Snapshots share one copy of the column dict until the engine replaces
        its arrays (read-only, as the arrays are), so that a reader holding
        per-array views can tell "nothing changed" by the dict's identity.
        """
        self._check_open()
        with self._lock:
            columns = self._state.columns
            if columns.generation != self._arrays_generation or self._arrays is None:
                self._arrays = dict(columns.arrays)
                self._arrays_generation = columns.generation
            return Snapshot(self._state.count, self._arrays)

    def release(self) -> None:
        """Drop the shared column dict (the store is closing; under the state lock)."""
        self._arrays = None
        self._arrays_generation = -1

    def column(self, name: str) -> np.ndarray:
        """Rows [0, count) of one column (a view of the engine's array: read-only)."""
        return self.snapshot().column(name)

    def postings(self, name: str) -> Postings:
        """A posting-list family: one of engine.indexes.POSTINGS (subject, pair, target, ...)."""
        try:
            return self._postings[name]
        except KeyError:
            raise ValueError(f"postings: {name!r}, expected one of {', '.join(POSTINGS)}") from None

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Record number of each ID of an (n, 32) uint8 array; -1 where not stored."""
        self._check_open()
        with self._lock:
            return np.asarray(self._state.lookup_many(np.ascontiguousarray(ids, dtype=np.uint8)))

    def records_at(self, rows: np.ndarray | Sequence[int]) -> list[Record]:
        """Decode the records with these record numbers (frame checksums checked)."""
        self._check_open()
        return self._reader.records_at(np.asarray(rows, dtype=np.int64))

    def record_at(self, row: int) -> Record:
        """Decode the record with this record number (one compiled call; frame checks as get)."""
        return self._reader.record_at(row)

    def gather(self, rows: np.ndarray | Sequence[int]) -> tuple[bytes, np.ndarray]:
        """(blob, offsets) of the encoded records with these record numbers, checksums checked."""
        self._check_open()
        return self._reader.gather(np.asarray(rows, dtype=np.int64))

    def subscribe(self, listener: Listener) -> int:
        """Call `listener` after each later durable batch; returns the count it starts from.

        Every batch of records numbered from the returned count on is
        delivered to it, and no earlier one.
        """
        with self._lock:
            self._notifier.subscribe(listener)
            return self._state.count

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            self._notifier.unsubscribe(listener)
