"""Per-store query state: the query-side key index, trust-rank and epoch caches, view registry.

Owns: for each open Database, (1) a CSR index of assertion record numbers by
(subject, predicate) key and by subject key, kept in three levels (base,
tail, and a short unindexed run of the newest records that queries scan) so
that writes never wait for it; (2) the cached trust ranks and epoch
supersession answers, invalidated by generation counters that its write
listener bumps; (3) the registry of materialised views; (4) `visible`, the
record count up to which the listener has seen every batch. Queries read
only records below `visible`, so a cache or view is never asked about a
record whose write it has not been told of yet (notifications arrive just
after the engine indexes a batch, before its writers are acknowledged).
Must never: write to the store, or read it other than through `db.view`.

Why a second index: the engine's posting lists are linked chains through a
`prev` array (O(1) append, ~120 ns per entry to walk: a cache miss each), so
the candidates of a pair with thousands of claims would cost hundreds of
microseconds per query. The CSR levels give them as one contiguous slice.
Memory: 4 bytes per assertion plus 16 bytes per distinct key, per index.

Resource handling: nothing but memory; the state lives as long as its
Database (a WeakKeyDictionary entry), subscribed to its write notifications.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from stemedb.engine.view import Snapshot
from stemedb.lenses import _bulk, _rules
from stemedb.records import Epoch, RecordKind

if TYPE_CHECKING:
    from stemedb._codec import Record
    from stemedb.engine.database import Database

Arrays = Mapping[str, np.ndarray]


class _AsOf(Protocol):
    @property
    def as_of_limit(self) -> np.uint64: ...


class Context(Protocol):
    """What the query state reads of a query's context (lenses/base.Context).

    A protocol, not an import: base.py refers to QueryState, so importing its
    Context here would make the two modules import each other.
    """

    db: Database
    state: QueryState
    count: int
    arrays: Arrays

    @property
    def filters(self) -> _AsOf: ...

    def records(self, rows: np.ndarray | Sequence[int]) -> list[Record]: ...

SCAN_MAX = 4096          # newest records a query scans linearly before the tail is rebuilt
TAIL_MIN = 65536         # the tail is merged into the base above max(TAIL_MIN, base / 8) records


class Level(NamedTuple):
    """One CSR level over the records [lo, hi): keys ascending, rows of keys[i] in rows[starts[i]:starts[i+1]]."""

    keys: np.ndarray      # uint64, unique, ascending
    starts: np.ndarray    # int64, len(keys) + 1
    rows: np.ndarray      # uint32 record numbers, ascending within each key
    flags: np.ndarray     # uint8 per key: _rules.FLAG_REVISED | FLAG_MIXED
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.keys, self.starts, self.rows, self.flags


def empty_level(at: int = 0) -> Level:
    return Level(np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=np.int64),
                 np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint8), at, at)


def _from_sorted(sorted_keys: np.ndarray, rows: np.ndarray, lo: int, hi: int,
                 arrays: Arrays, confirm: tuple[str, ...]) -> Level:
    if not len(sorted_keys):
        return empty_level(hi)._replace(lo=lo)
    boundaries = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], boundaries, [len(sorted_keys)])).astype(np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.uint32)
    return Level(np.ascontiguousarray(sorted_keys[starts[:-1]]), starts, rows,
                 _key_flags(arrays, rows, starts, confirm), lo, hi)


def _key_flags(arrays: Arrays, rows: np.ndarray, starts: np.ndarray,
               confirm: tuple[str, ...]) -> np.ndarray:
    """Per key: FLAG_REVISED if a record has a parent; FLAG_MIXED if records differ in `confirm`.

    With both clear (the common case), queries read neither the parent
    column nor the subject / predicate columns of the key's records.
    """
    firsts = starts[:-1]
    sizes = np.diff(starts)
    revised = np.logical_or.reduceat(arrays["target"][rows] != 0, firsts)
    mixed = np.zeros(len(firsts), dtype=bool)
    for name in confirm:
        values = arrays[name][rows]
        mixed |= np.logical_or.reduceat(values != np.repeat(values[firsts], sizes), firsts)
    flags = np.where(revised, _rules.FLAG_REVISED, 0) | np.where(mixed, _rules.FLAG_MIXED, 0)
    return flags.astype(np.uint8)


def build_level(arrays: Arrays, column: str, lo: int, hi: int,
                confirm: tuple[str, ...]) -> Level:
    """The CSR of the non-zero keys of arrays[column][lo:hi]."""
    keys = arrays[column][lo:hi]
    present = np.flatnonzero(keys)
    present_keys = keys[present]
    order = np.argsort(present_keys, kind="stable")
    return _from_sorted(present_keys[order], present[order] + lo, lo, hi, arrays, confirm)


def merge_levels(first: Level, second: Level, arrays: Arrays,
                 confirm: tuple[str, ...]) -> Level:
    """One level over first.lo..second.hi (second follows first)."""
    if not second.size:
        return first._replace(hi=second.hi)
    if not first.size:
        return second._replace(lo=first.lo)
    keys = np.concatenate([np.repeat(first.keys, np.diff(first.starts)),
                           np.repeat(second.keys, np.diff(second.starts))])
    rows = np.concatenate([first.rows, second.rows])
    order = np.argsort(keys, kind="stable")  # two sorted runs: timsort merges them in linear time
    return _from_sorted(keys[order], rows[order], first.lo, second.hi, arrays, confirm)


class Levels(NamedTuple):
    base: Level
    tail: Level


class KeyIndex:
    """Record numbers of assertions by one uint64 key column, in CSR levels (see the module doc).

    `confirm` names the columns whose keys must agree within an index key
    (for the pair index: subject and predicate), or the key is flagged mixed.
    """

    def __init__(self, column: str, confirm: tuple[str, ...]) -> None:
        self.column = column
        self.confirm = confirm
        self.levels = Levels(empty_level(), empty_level())
        self._lock = threading.Lock()

    def snapshot(self, arrays: Arrays, count: int) -> tuple[Levels, int]:
        """(levels, first unindexed record): records [tail.hi, count) must be scanned."""
        levels = self.levels
        if count - levels.tail.hi > SCAN_MAX:
            levels = self._catch_up(arrays, count, full=False)
        return levels, min(levels.tail.hi, count)

    def full(self, arrays: Arrays, count: int) -> Level:
        """One level covering every record below `count` (merging the levels if needed)."""
        levels = self.levels
        if levels.base.hi < count or levels.tail.size:
            levels = self._catch_up(arrays, count, full=True)
        return levels.base

    def _catch_up(self, arrays: Arrays, count: int, *, full: bool) -> Levels:
        with self._lock:
            base, tail = self.levels
            if full and base.hi >= count and not tail.size:
                return self.levels
            if not full and count - tail.hi <= SCAN_MAX:
                return self.levels
            if full or count - base.hi > max(TAIL_MIN, base.hi // 8):
                fresh = build_level(arrays, self.column, base.hi, count, self.confirm)
                base = merge_levels(base, fresh, arrays, self.confirm)
                tail = empty_level(count)
            else:
                tail = build_level(arrays, self.column, base.hi, count, self.confirm)
            self.levels = Levels(base, tail)
            return self.levels

    def memory_bytes(self) -> int:
        return sum(sum(a.nbytes for a in level.arrays) for level in self.levels)


class CachedView(Protocol):
    """What the registry needs of a materialised view (stemedb.query.MaterializedView)."""

    def on_write(self, record_numbers: np.ndarray, columns: Arrays, assertions: np.ndarray) -> None: ...


class QueryState:
    """Everything the query layer derives from one store (see the module doc)."""

    def __init__(self, visible: int = 0) -> None:
        self.pairs = KeyIndex("pair", ("subject", "predicate"))
        self.subjects = KeyIndex("subject", ("subject",))
        self.assertion_generation = 0
        self.vote_generation = 0
        self.epoch_generation = 0
        self.views: dict[Hashable, CachedView] = {}
        self.pair_query: object = None  # stemedb.query's _pair.PairQuery for this store, made on first use
        self.single_query: object = None  # and its _single.SingleQuery (which shares that PairQuery)
        self.visible = visible          # every batch below this count was notified
        self._notify_lock = threading.Lock()
        self._trust: tuple[int, np.ndarray, np.ndarray] | None = None
        self._trust_lock = threading.Lock()
        self._epochs: tuple[int, dict[tuple[int, int], bool]] = (0, {})
        self._links: dict[int, list[int]] = {}
        self._links_upto = 0
        self._links_lock = threading.Lock()

    def snapshot(self, db: Database) -> Snapshot:
        """The store's columns as far as this state has been told of them (see the module doc)."""
        visible = self.visible       # read first: the engine's count is at least this afterwards
        snapshot = db.view.snapshot()
        if snapshot.count > visible:
            snapshot.count = visible
        return snapshot

    # -- the write listener (engine/view.py: called after each durable batch is indexed)

    def on_write(self, record_numbers: np.ndarray, columns: Arrays) -> None:
        kind = columns["kind"]
        assertions = kind == RecordKind.ASSERTION
        with self._notify_lock:
            if assertions.any():
                self.assertion_generation += 1
            if (kind == RecordKind.VOTE).any():
                self.vote_generation += 1
            if (kind == RecordKind.EPOCH).any():
                self.epoch_generation += 1
            for view in list(self.views.values()):
                view.on_write(record_numbers, columns, assertions)
            if len(record_numbers):
                self.visible = max(self.visible, int(record_numbers[-1]) + 1)

    def seen_up_to(self, count: int) -> None:
        """Every record below `count` is known (the count a subscription started from)."""
        with self._notify_lock:
            self.visible = max(self.visible, count)

    def register_view(self, key: Hashable, view: CachedView) -> None:
        """Add a view; every batch not yet visible will reach it (so none falls between)."""
        with self._notify_lock:
            self.views[key] = view

    def drop_view(self, key: Hashable) -> bool:
        with self._notify_lock:
            return self.views.pop(key, None) is not None

    # -- trust ranks

    def trust(self, context: Context) -> tuple[np.ndarray, np.ndarray]:
        """(signer keys ascending, trust rank), recomputed in bulk when assertions were written."""
        cached = self._trust
        if cached is not None and cached[0] == self.assertion_generation:
            return cached[1], cached[2]
        with self._trust_lock:
            generation = self.assertion_generation
            cached = self._trust
            if cached is not None and cached[0] == generation:
                return cached[1], cached[2]
            snapshot = self.snapshot(context.db)
            arrays = snapshot.arrays
            keys, values = trust_ranks(self.pairs.full(arrays, snapshot.count), arrays)
            self._trust = (generation, keys, values)
            return keys, values

    # -- epoch supersession

    def superseders(self, context: Context, epoch_key: int) -> list[int]:
        """Record numbers (below context.count) of the Epoch records that list this epoch.

        Kept here, not read from the engine's superseded_by: the query layer
        decodes each Epoch record once (epochs are rare) and extends the map
        incrementally as the store grows.
        """
        if self._links_upto < context.count:
            with self._links_lock:
                start = self._links_upto
                if start < context.count:
                    kind = context.arrays["kind"][start:context.count]
                    rows = np.flatnonzero(kind == RecordKind.EPOCH) + start
                    for row, epoch in zip(rows.tolist(), context.records(rows)):
                        assert isinstance(epoch, Epoch), "the kind column says Epoch"
                        for superseded in epoch.supersedes:
                            key = int.from_bytes(superseded[:8], "little")
                            self._links.setdefault(key, []).append(row)
                    self._links_upto = context.count
        return [r for r in self._links.get(epoch_key, ()) if r < context.count]

    def superseded(self, context: Context, epoch_keys: Sequence[int]) -> set[int]:
        generation, cache = self._epochs
        if generation != self.epoch_generation:
            cache = {}
            self._epochs = (self.epoch_generation, cache)
        as_of = int(context.filters.as_of_limit)
        out = set()
        for key in epoch_keys:
            key = int(key)
            found = cache.get((key, as_of))
            if found is None:
                found = cache[(key, as_of)] = epoch_superseded(context, key)
            if found:
                out.add(key)
        return out


def trust_ranks(level: Level, arrays: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """FEATURES.md §3: 0.5 + 0.05 per agreeing pair - 0.1 per disagreeing pair, clamped to [0, 1]."""
    signers, marks = _bulk.kernels().trust_votes(   # a whole-store numba pass
        *level.arrays, arrays["timestamp"], arrays["target"], arrays["id"], arrays["lifecycle"],
        arrays["confidence"], arrays["signer"], arrays["object"])
    if not len(signers):
        return np.zeros(0, dtype=np.uint64), np.zeros(0)
    keys, inverse = np.unique(signers, return_inverse=True)
    agree = np.bincount(inverse, weights=marks > 0, minlength=len(keys))
    disagree = np.bincount(inverse, weights=marks < 0, minlength=len(keys))
    return keys, np.clip(0.5 + 0.05 * agree - 0.1 * disagree, 0.0, 1.0)


def epoch_superseded(context: Context, key: int) -> bool:
    """Is the epoch with this ID key superseded (as of the query)?

    Superseded: some visible Epoch record lists it in `supersedes` (any
    supersession kind), and following the chain of superseders reaches an
    epoch nobody supersedes. When every chain loops (a supersession cycle),
    the latest epoch of the loop (timestamp, then lowest ID) survives and
    the others are superseded. An epoch with no stored record is judged the
    same way (missing epochs fail open: nothing supersedes them, they stay).
    """
    arrays = context.arrays
    timestamp, ids = arrays["timestamp"], arrays["id"]
    as_of = int(context.filters.as_of_limit)

    def superseders(epoch_key: int) -> list[int]:
        return [r for r in context.state.superseders(context, epoch_key) if int(timestamp[r]) <= as_of]

    direct = superseders(key)
    if not direct:
        return False
    reached: dict[int, int] = {}
    stack = list(direct)
    while stack:
        row = stack.pop()
        row_key = int(np.ascontiguousarray(ids[row, :8]).view("<u8")[0])
        if row_key in reached:
            continue
        reached[row_key] = row
        following = superseders(row_key)
        if not following:
            return True  # the chain ends at a live epoch
        stack.extend(following)
    if key not in reached:
        return True  # it leads into a loop it is not part of
    latest = max(reached.values(), key=lambda r: (int(timestamp[r]), _inverted(bytes(ids[r]))))
    return reached[key] != latest


def _inverted(data: bytes) -> bytes:
    """Sorts descending where `data` sorts ascending (so max() picks the lowest ID on equal times)."""
    return bytes(255 - b for b in data)


_STATES: weakref.WeakKeyDictionary[Database, QueryState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def forget(db: Database) -> None:
    """Drop the QueryState of a store that has closed (its query indexes and column views)."""
    with _STATES_LOCK:
        found = _STATES.pop(db, None)
    if found is not None:
        db.view.unsubscribe(found.on_write)


def state_of(db: Database) -> QueryState:
    """The QueryState of this Database, created (and subscribed to its writes) on first use."""
    found = _STATES.get(db)
    if found is not None:
        return found
    with _STATES_LOCK:
        found = _STATES.get(db)
        if found is None:
            found = QueryState()
            found.seen_up_to(db.view.subscribe(found.on_write))
            _STATES[db] = found
        return found
