"""Query planning and results: index lookup -> candidate columns -> lens -> Resolution.

Owns: the public read-time API over a Database — `query` (one subject and
predicate, or every predicate of a subject), `query_many`, `conflicts` (the
disagreement dashboard), `materialize` (cached winners of every pair),
`trust_ranks`, the query audit log (`audit_log` and the writer behind
`audit=True`), and `warm_up` (JIT compilation, once per process). Must
never: write records, decode more than the winners and what the caller asks
for, or answer from a materialised view that a later write has invalidated.

Read path: the (subject, predicate) key -> candidate record numbers from the
query-side CSR index (lenses/_state.py) -> one compiled call (stemedb._pair,
built ahead of time: no JIT on this path) confirms the subject / predicate
keys and applies revisions and filters over the engine's fixed-width
columns -> the lens reads columns, never decoded records -> only
the winner is decoded (contributions are decoded when first read). Posting
keys are 64-bit hashes: the decoded winner's subject and predicate are
compared with the query's, and on a mismatch the candidates are confirmed
one by one on their decoded records and the lens runs again.

The store is read only through `db.view` (engine/view.py): consistent
snapshots of the column arrays, posting lists, records by number. What a
query sees ends at the query state's `visible` count (lenses/_state.py):
the records whose write notification the query layer has processed.

Resource handling: audit entries are appended to `audit.log` in the data
directory (`db.side_file`: open, append, fdatasync, close per entry). The
numba kernels of the whole-store passes are compiled (or loaded from
numba's cache) once per process: in the background from the first single
query, in the foreground by the first whole-store call, or by `warm_up()`
(the server calls it at start). Error handling: bad arguments raise ValueError / TypeError naming
the parameter; a closed store raises StemeError; damaged records raise
CorruptionError from the engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from stemedb import _codec, _pair, _single
from stemedb.engine.database import Database
from stemedb.lenses import Lens, _bulk, _rules, get_lens
from stemedb.lenses._state import KeyIndex, QueryState, state_of
from stemedb.lenses.base import (
    DEFAULT_FILTERS,
    HALF_LIVES,
    Candidates,
    Context,
    EpochSpec,
    Filters,
    LensSpec,
    LifecycleSpec,
    Outcome,
    conflict_score,
)
from stemedb.lenses.simple import Confidence, Recency
from stemedb.lenses.weighted import Consensus
from stemedb.records import Assertion, RecordKind, Ref, Signer
from stemedb.results import Contribution, Resolution, _short

AgentSpec: TypeAlias = "str | bytes | bytearray | memoryview | Signer | None"

__all__ = [
    "Resolution", "Contribution", "PairConflict", "MaterializedView",
    "EncodedResolutions",
    "query", "query_many", "query_encoded", "conflicts", "materialize", "drop_view", "trust_ranks",
    "audit_log", "warm_up", "render",
    "AUDIT_FILE",
]

AUDIT_FILE = "audit.log"
AUDIT_VERSION = 1


# ------------------------------------------------------------------ warm-up

log = logging.getLogger("stemedb.query")

# When numba's cache cannot be inspected: a warm-up still running after this many seconds is
# compiling (loading the kernels from the cache takes about half a second).
WARM_UP_NOTICE_SECONDS = 1.0

_warm_lock = threading.Lock()
_warm_started = False
_warm_done = threading.Event()


def warm_up(*, background: bool = False) -> None:
    """Compile (or load from numba's cache) every kernel, once per process.

    The whole-store calls (query_many, query_encoded, conflicts,
    trust_ranks, materialize) call it and wait; a single `query` starts it
    in the background and does not wait — its lens work is compiled ahead of
    time (stemedb._pair), so it never waits for the JIT. A server calls it at
    start. `background=True` starts it in a daemon thread and returns at
    once; a whole-store call that arrives before it finishes waits for it.
    """
    global _warm_started
    if background and _warm_started:
        return          # every query after the first: no lock taken
    with _warm_lock:
        start = not _warm_started
        _warm_started = True
    if start:
        if background:
            threading.Thread(target=_run_warm_up, name="stemedb-jit-warm-up", daemon=True).start()
            return
        _run_warm_up()
    if not background:
        _warm_done.wait()


def _run_warm_up() -> None:
    started = time.perf_counter()
    told = threading.Event()

    def tell() -> None:
        told.set()
        log.warning("compiling the query kernels: the first whole-store call after an install "
                    "(query_many, conflicts, trust_ranks, materialize) waits 10-20 s for this, "
                    "single queries do not; the compiled code is cached for later processes")

    # numba's disk cache says whether this will compile; if it cannot be read, a warm-up
    # still running after WARM_UP_NOTICE_SECONDS is compiling (a cache load takes less).
    try:
        kernels = _bulk.kernels()
    except ModuleNotFoundError:     # a client-only install: the whole-store calls say so
        _warm_done.set()
        return
    cold = kernels.cache_is_cold()
    notice = threading.Timer(WARM_UP_NOTICE_SECONDS, tell)
    notice.daemon = True
    if cold:
        tell()
    elif cold is None:
        notice.start()
    try:
        kernels.warm_up()
    finally:
        notice.cancel()
        if told.is_set():
            log.warning("query kernels ready after %.1f s", time.perf_counter() - started)
        _warm_done.set()


def _ensure_warm() -> None:
    if not _warm_done.is_set():
        warm_up()


# -------------------------------------------------------------- the results

class _ContributionSource:
    """What it takes to build the contributions later: the query's snapshot, rows and weights."""

    __slots__ = ("context", "rows", "weights", "winner_object")

    def __init__(self, context: Context, rows: np.ndarray, weights: np.ndarray,
                 winner_object: int | None) -> None:
        self.context = context
        self.rows = rows
        self.weights = weights
        self.winner_object = winner_object

    def build(self) -> list[Contribution]:
        if not len(self.rows):
            return []
        arrays = self.context.arrays
        timestamps = arrays["timestamp"][self.rows]
        ids = arrays["id"][self.rows]
        objects = arrays["object"][self.rows]
        # weight desc, then latest, then lowest ID (IDs are unique: a total order)
        id_order = np.lexsort(ids.T[::-1])
        rank = np.empty(len(id_order), dtype=np.int64)
        rank[id_order] = np.arange(len(id_order))
        order = np.lexsort((rank, -timestamps.astype(np.float64), -self.weights))
        records = self.context.assertions(self.rows[order])
        return [Contribution(record.id, float(self.weights[i]), record.lifecycle, record.source_hash,
                             self.winner_object is not None and int(objects[i]) == self.winner_object)
                for i, record in zip(order.tolist(), records)]


def _context(db: Database, state: QueryState, filters: Filters) -> Context:
    snapshot = state.snapshot(db)
    return Context(db, state, snapshot.count, snapshot.arrays, filters)


def _as_assertion(record: _codec.Record) -> Assertion:
    if not isinstance(record, Assertion):
        raise TypeError(f"expected an assertion, got a {type(record).__name__}")
    return record


def _key_rows(context: Context, index: KeyIndex, key: int) -> tuple[np.ndarray, int]:
    """(record numbers of the assertions with this key, unfiltered and ascending; key flags)."""
    a = context.arrays
    levels, scan_lo = index.snapshot(a, context.count)
    base, tail = levels
    raw, flags = _pair.key_rows(np.uint64(key), *base.arrays, *tail.arrays, scan_lo,
                                   context.count, a[index.column], a["target"])
    return raw, int(flags)


_CHECK_ALL = _rules.FLAG_REVISED | _rules.FLAG_MIXED


def _filter(context: Context, raw: np.ndarray, subject_key: int, predicate_key: int,
            flags: int = _CHECK_ALL) -> np.ndarray:
    a = context.arrays
    f = context.filters
    return _pair.filter_candidates(
        raw, len(raw), flags, a["subject"], a["predicate"], np.uint64(subject_key),
        np.uint64(predicate_key), a["timestamp"], f.as_of_limit, a["target"], a["id"], a["epoch"],
        f.epoch_key, a["lifecycle"], f.lifecycle_mask)


_KEYS: dict[tuple[str, str], tuple[np.uint64, np.uint64, np.uint64]] = {}
_KEYS_MAX = 1 << 16


def _pair_keys(subject: str, predicate: str) -> tuple[np.uint64, np.uint64, np.uint64]:
    """(pair, subject, predicate) keys, memoised: three BLAKE3 calls cost more than the lookup."""
    found = _KEYS.get((subject, predicate))
    if found is None:
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        found = _KEYS[(subject, predicate)] = (
            np.uint64(_codec.pair_key(subject, predicate)), np.uint64(_codec.subject_key(subject)),
            np.uint64(_codec.predicate_key(predicate)))
    return found


def _pair_candidates(context: Context, subject: str, predicate: str) -> np.ndarray:
    """The filtered candidates of one pair, in one kernel call."""
    a = context.arrays
    f = context.filters
    levels, scan_lo = context.state.pairs.snapshot(a, context.count)
    base, tail = levels
    pair, subject_key, predicate_key = _pair_keys(subject, predicate)
    return _pair.select_pair(
        pair, *base.arrays, *tail.arrays, scan_lo, context.count, a["pair"], a["subject"],
        a["predicate"], subject_key, predicate_key, a["timestamp"], f.as_of_limit, a["target"],
        a["id"], a["epoch"], f.epoch_key, a["lifecycle"], f.lifecycle_mask)


# Lenses whose whole rule is one kernel mode: the planner runs them fused with the
# candidate selection (one call), bypassing Candidates / Outcome.
_FUSED = {Recency: _pair.RECENCY, Confidence: _pair.CONFIDENCE, Consensus: _pair.CONSENSUS}


_NO_LIMIT = int(_rules.NO_LIMIT)   # as_of when none is given (an int: no numpy scalar per query)


def _pair_query(state: QueryState) -> _pair.PairQuery:
    """The store's PairQuery: resolve_pair with the column views kept between queries."""
    found = state.pair_query
    if not isinstance(found, _pair.PairQuery):
        found = state.pair_query = _pair.PairQuery(HALF_LIVES)
    return found


def _single_query(state: QueryState) -> _single.SingleQuery:
    """The store's one-call query (stemedb._single), sharing the PairQuery's column views."""
    found = state.single_query
    if not isinstance(found, _single.SingleQuery):
        found = state.single_query = _single.SingleQuery(_pair_query(state), Resolution,
                                                         _pair_contributions, DEFAULT_FILTERS)
    return found


def _pair_contributions(db: Database, state: QueryState, count: int, arrays: Mapping[str, np.ndarray],
                        rows: np.ndarray, weights: np.ndarray, winner_object: int | None
                        ) -> list[Contribution]:
    """The contributions of a Resolution that stemedb._single answered (built when first read)."""
    context = Context(db, state, count, arrays, DEFAULT_FILTERS)
    return _ContributionSource(context, rows, weights, winner_object).build()


# id(lens) -> (lens, kernel mode, describe()) of the lenses _single answers for (the fused ones)
_SINGLE_LENSES: dict[int, tuple[Lens, int, str]] = {}


def _single_lens(chosen: Lens) -> tuple[Lens, int, str] | None:
    found = _SINGLE_LENSES.get(id(chosen))
    if found is not None and found[0] is chosen:
        return found
    if type(chosen) not in _FUSED:
        return None
    if len(_SINGLE_LENSES) >= 64:   # lens objects made per call: keep the table small
        _SINGLE_LENSES.clear()
    found = _SINGLE_LENSES[id(chosen)] = (chosen, _FUSED[type(chosen)], chosen.describe())
    return found


def _front_hooks() -> tuple[Any, ...]:
    """What a `_single.QueryFront` (the `db.query` bound at open, stemedb/database.py) calls."""
    from stemedb import lenses
    return (query, _single_lens_named, state_of, _single_query, _warm_in_background, lenses)


def _single_lens_named(name: str) -> tuple[Lens, int, str] | None:
    return _single_lens(get_lens(name))


def _warm_in_background() -> None:
    warm_up(background=True)


def _fused_outcome(context: Context, lens: Lens, subject: str, predicate: str) -> Outcome:
    f = context.filters
    levels, scan_lo = context.state.pairs.snapshot(context.arrays, context.count)
    pair, subject_key, predicate_key = _pair_keys(subject, predicate)
    cand, weights, winner, share, conflict = _pair_query(context.state).resolve(
        context.arrays, levels, scan_lo, context.count, pair, subject_key, predicate_key,
        _NO_LIMIT if f.as_of is None else f.as_of,
        0 if f.epoch is None else _codec.id_key(f.epoch), f.lifecycle_mask, f.decay,
        float(f.now or 0), _FUSED[type(lens)])
    return Outcome(Candidates(context, cand), None if winner < 0 else int(winner), float(share),
                   weights, float(conflict))


def _confirmed(context: Context, raw: np.ndarray, subject: str, predicate: str | None) -> np.ndarray:
    """The slow path after a key collision: keep the records whose fields really match."""
    keep = []
    epoch = context.filters.epoch
    for row, record in zip(raw.tolist(), context.assertions(raw)):
        if getattr(record, "subject", None) != subject:
            continue
        if predicate is not None and record.predicate != predicate:
            continue
        if epoch is not None and record.epoch != epoch:
            continue
        keep.append(row)
    return _filter(context, np.array(keep, dtype=np.int64), 0, 0)


def _matches(record: _codec.Record, subject: str, predicate: str | None, filters: Filters) -> bool:
    if not isinstance(record, Assertion):
        return False
    if record.subject != subject or (predicate is not None and record.predicate != predicate):
        return False
    return filters.epoch is None or record.epoch == filters.epoch


def _resolve(context: Context, lens: Lens, outcome: Outcome, subject: str, predicate: str | None,
             confirm: Callable[[], np.ndarray]) -> tuple[Outcome, Assertion | None]:
    """Decode the winner of `outcome`; on a key collision, confirm the candidates and rerun."""
    row = outcome.winner_row
    if row is None:
        return outcome, None
    winner = context.assertion_at(row)
    if _matches(winner, subject, predicate, context.filters):
        return outcome, winner
    outcome = lens.resolve(Candidates(context, confirm()))
    row = outcome.winner_row
    return outcome, (context.assertion_at(row) if row is not None else None)


def _resolution(context: Context, lens: Lens, outcome: Outcome, winner: Assertion | None, subject: str,
                predicate: str | None) -> Resolution:
    candidates = outcome.candidates
    conflict = outcome.conflict_score
    if conflict is None:
        conflict = conflict_score(candidates, outcome.weights)
    winner_object = None
    if outcome.winner is not None:
        winner_object = int(context.arrays["object"][candidates.rows[outcome.winner]])
    source = _ContributionSource(context, candidates.rows,
                                 np.asarray(outcome.weights, dtype=np.float64), winner_object)
    return Resolution(subject, predicate, lens.describe(), winner, _unit(outcome.confidence),
                      _unit(conflict), len(candidates), analysis=outcome.analysis,
                      filters=context.filters, source=source)


def _unit(value: float) -> float:
    value = float(value)
    return 0.0 if not value > 0.0 else min(value, 1.0)


def _compute_pair(context: Context, lens: Lens, subject: str, predicate: str
                  ) -> tuple[Resolution, Outcome]:
    def confirm() -> np.ndarray:
        raw, _ = _key_rows(context, context.state.pairs, _codec.pair_key(subject, predicate))
        return _confirmed(context, raw, subject, predicate)

    if type(lens) in _FUSED:
        first = _fused_outcome(context, lens, subject, predicate)
    else:
        first = lens.resolve(Candidates(context, _pair_candidates(context, subject, predicate)))
    outcome, winner = _resolve(context, lens, first, subject, predicate, confirm)
    return _resolution(context, lens, outcome, winner, subject, predicate), outcome


def _resolve_pair(context: Context, lens: Lens, subject: str, predicate: str) -> Resolution:
    views = context.state.views
    found = views.get(lens.key()) if views and context.filters.is_default else None
    view = found if isinstance(found, MaterializedView) else None
    if view is not None:
        served = view.serve(context, subject, predicate)
        if served is not None:
            return served
    resolution, outcome = _compute_pair(context, lens, subject, predicate)
    if view is not None:
        view.store(context, subject, predicate, resolution, outcome)
    return resolution


def _resolve_subject(context: Context, lens: Lens, subject: str) -> dict[str, Resolution]:
    """Every predicate of the subject that has candidates, each resolved on its own."""
    subject_key = _codec.subject_key(subject)
    raw, flags = _key_rows(context, context.state.subjects, subject_key)
    if not len(raw):
        return {}
    predicate_keys = context.arrays["predicate"][raw]
    out: dict[str, Resolution] = {}
    for key in np.unique(predicate_keys).tolist():
        group = raw[predicate_keys == key]
        cand = _filter(context, group, subject_key, 0, flags)
        if not len(cand):
            continue

        def confirm(group: np.ndarray = group) -> np.ndarray:
            return _confirmed(context, group, subject, None)

        first = lens.resolve(Candidates(context, cand))
        outcome, winner = _resolve(context, lens, first, subject, None, confirm)
        sample = winner
        if sample is None:
            rows = outcome.candidates.rows if len(outcome.candidates) else cand
            sample = context.assertions(rows[:1])[0]
        if sample.subject != subject:
            continue
        out[sample.predicate] = _resolution(context, lens, outcome, winner, subject, sample.predicate)
    return dict(sorted(out.items()))


def _resolve_fixed(context: Context, lens: Lens, subject: str, predicate: str | None) -> Resolution:
    """Lenses that read fixed predicates of the subject (Constraints)."""
    names = list(lens.predicates or ())
    if predicate is not None:
        if predicate not in names:
            raise ValueError(f"predicate: {predicate!r}; the {lens.name} lens reads {', '.join(names)}")
        names = [predicate]
    parts = [_pair_candidates(context, subject, name) for name in names]
    cand = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    outcome = lens.resolve(Candidates(context, cand))
    winner = context.assertion_at(outcome.winner_row) if outcome.winner_row is not None else None
    return _resolution(context, lens, outcome, winner, subject, predicate)


def _check_names(subject: Any, predicate: Any) -> None:
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject: expected a non-empty str, got {subject!r}")
    if predicate is not None and (not isinstance(predicate, str) or not predicate):
        raise ValueError(f"predicate: expected a non-empty str or None, got {predicate!r}")


# ------------------------------------------------------------------ the API

def query(db: Database, subject: str, predicate: str | None = None, *, lens: LensSpec = "recency",
          lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None, as_of: int | None = None,
          decay: bool = False, now: int | None = None, audit: bool = False,
          agent: AgentSpec = None) -> Resolution | dict[str, Resolution]:
    """Resolve what the store says about `subject` / `predicate` through `lens`.

    lens: a name ("recency", "confidence", "consensus", "vote_consensus",
    "authority", "skeptic", "epoch_aware", "layered", "constraints") or a
    Lens object. lifecycle: "any", "approved", a stage (name, number or
    Lifecycle) or a list of stages; filters on each claim's current stage
    (after revisions). epoch: an Epoch or its ID: only assertions in it.
    as_of: µs; only what was written with timestamp <= as_of (votes and
    epochs too). decay: weigh confidence by age (half-life per source
    class) at `now` (µs; default: as_of, else the current time).
    audit: append an entry to the audit log, naming `agent`.

    Returns a Resolution; with predicate=None, a dict predicate ->
    Resolution for every predicate of the subject that has candidates
    (lenses with fixed predicates, like Constraints, return one Resolution).
    """
    _check_names(subject, predicate)
    chosen = get_lens(lens)
    if (predicate is not None and epoch is None and as_of is None and now is None and decay is False
            and not audit and type(lifecycle) is str and lifecycle == "any"):
        # The common case in one compiled call (stemedb._single); None: take the general path.
        single = _single_lens(chosen)
        if single is not None:
            state = state_of(db)
            answer = _single_query(state).answer(db, state, subject, predicate, single[1], single[2])
            if answer is not None:
                warm_up(background=True)
                return answer
    filters = Filters.make(lifecycle, epoch, as_of, decay, now)
    context = _context(db, state_of(db), filters)
    result: Resolution | dict[str, Resolution]
    if chosen.predicates is not None:
        result = _resolve_fixed(context, chosen, subject, predicate)
    elif predicate is None:
        result = _resolve_subject(context, chosen, subject)
    else:
        result = _resolve_pair(context, chosen, subject, predicate)
    if audit:
        _write_audit(db, agent, subject, predicate, chosen, filters, result)
    # For the whole-store calls; a single query needs no JIT. Started after the answer, so
    # that importing numba (in a thread, holding the GIL most of the time) does not slow
    # the first query down.
    warm_up(background=True)
    return result


def query_many(db: Database, pairs: Iterable[tuple[str, str]], *, lens: LensSpec = "recency",
               lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None, as_of: int | None = None,
               decay: bool = False, now: int | None = None) -> list[Resolution]:
    """`query` for many (subject, predicate) pairs over one snapshot of the store (in order).

    For Recency, Confidence and Consensus the pairs are resolved in one
    kernel call and the winners decoded in one batch; contributions are then
    computed when first read.
    """
    _ensure_warm()
    chosen = get_lens(lens)
    if chosen.predicates is not None:
        raise ValueError(f"query_many: the {chosen.name} lens reads fixed predicates; use query()")
    filters = Filters.make(lifecycle, epoch, as_of, decay, now)
    context = _context(db, state_of(db), filters)
    pairs = list(pairs)
    for subject, predicate in pairs:
        _check_names(subject, predicate)
    views = context.state.views
    if type(chosen) not in _FUSED or (views and chosen.key() in views and filters.is_default):
        return [_resolve_pair(context, chosen, subject, predicate) for subject, predicate in pairs]
    return _resolve_batch(context, chosen, pairs)


def _batch_kernel(context: Context, lens: Lens, pairs: list[tuple[str, str]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(winner records or -1, confidences, conflict scores, candidate counts) of many pairs."""
    keys = np.array([_pair_keys(s, p) for s, p in pairs], dtype=np.uint64).reshape(-1, 3)
    a = context.arrays
    f = context.filters
    levels, scan_lo = context.state.pairs.snapshot(a, context.count)
    base, tail = levels
    return _bulk.kernels().resolve_keys(  # type: ignore[no-any-return]
        np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1]),
        np.ascontiguousarray(keys[:, 2]), *base.arrays, *tail.arrays, scan_lo, context.count,
        a["pair"], a["subject"], a["predicate"], a["timestamp"], f.as_of_limit, a["target"],
        a["id"], a["epoch"], f.epoch_key, a["lifecycle"], f.lifecycle_mask, a["confidence"],
        a["source_class"], f.decay, float(f.now or 0), HALF_LIVES, a["object"],
        _FUSED[type(lens)])


def _resolve_batch(context: Context, lens: Lens, pairs: list[tuple[str, str]]) -> list[Resolution]:
    f = context.filters
    winners, shares, scores, sizes = _batch_kernel(context, lens, pairs)
    found = winners >= 0
    decoded = iter(context.assertions(winners[found]))
    name = lens.describe()
    out = []
    for j, (subject, predicate) in enumerate(pairs):
        winner = next(decoded) if found[j] else None
        if winner is not None and not _matches(winner, subject, predicate, f):
            out.append(_compute_pair(context, lens, subject, predicate)[0])
            continue

        def recompute(subject: str = subject, predicate: str = predicate) -> Resolution:
            return _compute_pair(context, lens, subject, predicate)[0]

        out.append(Resolution(subject, predicate, name, winner, _unit(shares[j]), _unit(scores[j]),
                              int(sizes[j]), filters=f, recompute=recompute))
    return out


@dataclass
class EncodedResolutions:
    """Answers for many pairs as arrays, winners left encoded (what a server sends on).

    found[i]: pair i has a winner; winner_ids[i]: its ID ((n, 32) uint8, zeros
    where none); confidence, conflict_score, candidates_count: per pair;
    blob[offsets[i]:offsets[i+1]]: the winner's canonical encoding (empty
    where none), read with its checksum checked.
    """

    found: np.ndarray
    winner_ids: np.ndarray
    confidence: np.ndarray
    conflict_score: np.ndarray
    candidates_count: np.ndarray
    blob: bytes
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.found)

    def encoded(self, index: int) -> bytes:
        return self.blob[self.offsets[index]:self.offsets[index + 1]]

    def winner(self, index: int) -> Assertion | None:
        """The decoded winner of pair `index`, or None."""
        return _as_assertion(_codec.decode(self.encoded(index))) if self.found[index] else None


def query_encoded(db: Database, pairs: Iterable[tuple[str, str]], *, lens: LensSpec = "recency",
                  lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None,
                  as_of: int | None = None, decay: bool = False,
                  now: int | None = None) -> EncodedResolutions:
    """Resolve many (subject, predicate) pairs; winners stay encoded (no decoding).

    Recency, Confidence and Consensus run as one kernel call over all pairs.
    Key collisions are ruled out by the subject and predicate keys the index
    confirms per key (the winner itself is not decoded to compare names).
    Other lenses go through `query_many`.
    """
    _ensure_warm()
    chosen = get_lens(lens)
    pairs = list(pairs)
    filters = Filters.make(lifecycle, epoch, as_of, decay, now)
    if type(chosen) in _FUSED:
        for subject, predicate in pairs:
            _check_names(subject, predicate)
        context = _context(db, state_of(db), filters)
        winners, shares, scores, sizes = _batch_kernel(context, chosen, pairs)
    else:
        results = query_many(db, pairs, lens=chosen, lifecycle=lifecycle, epoch=epoch, as_of=as_of,
                             decay=decay, now=now)
        rows = db.view.lookup(_id_rows([r.winner.id for r in results if r.winner]))
        winners = np.full(len(results), -1, dtype=np.int64)
        winners[[i for i, r in enumerate(results) if r.winner is not None]] = rows
        shares = np.array([r.confidence for r in results], dtype=np.float64)
        scores = np.array([r.conflict_score for r in results], dtype=np.float64)
        sizes = np.array([r.candidates_count for r in results], dtype=np.int64)
        context = _context(db, state_of(db), filters)
    found = winners >= 0
    winner_ids = np.zeros((len(pairs), 32), dtype=np.uint8)
    winner_ids[found] = context.arrays["id"][winners[found]]
    blob, offsets = context.gather(winners[found])
    full = np.zeros(len(pairs) + 1, dtype=np.int64)
    full[1:][found] = np.diff(offsets)
    return EncodedResolutions(found, winner_ids, np.minimum(np.maximum(shares, 0.0), 1.0),
                              np.minimum(np.maximum(scores, 0.0), 1.0), sizes, blob,
                              np.cumsum(full))


def _id_rows(ids: list[bytes]) -> np.ndarray:
    if not ids:
        return np.zeros((0, 32), dtype=np.uint8)
    return np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 32)


# ------------------------------------------------------- disagreement dashboard

@dataclass(frozen=True)
class PairConflict:
    """One (subject, predicate) of the disagreement dashboard."""

    subject: str
    predicate: str
    conflict_score: float
    candidates_count: int
    claims_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "predicate": self.predicate,
                "conflict_score": self.conflict_score, "candidates_count": self.candidates_count,
                "claims_count": self.claims_count}


def conflicts(db: Database, top: int | None = None, *, lifecycle: LifecycleSpec = "any",
              as_of: int | None = None, min_score: float = 0.0) -> list[PairConflict]:
    """Every (subject, predicate) whose claims disagree, most contested first.

    The conflict score is the Skeptic / Consensus one (normalised entropy of
    the claims' confidence shares, no decay), computed for the whole store in
    one numba pass. Sorted by score, then candidates (descending), then pair
    key. Pairs scoring 0 (one claim carries all weight) are left out.
    """
    _ensure_warm()
    if top is not None and (not isinstance(top, int) or top < 0):
        raise ValueError(f"top: expected a count >= 0 or None, got {top!r}")
    filters = Filters.make(lifecycle, None, as_of)
    context = _context(db, state_of(db), filters)
    a = context.arrays
    level = context.state.pairs.full(a, context.count)
    scores, sizes, claims, sample = _bulk.kernels().conflicts_all(
        *level.arrays, a["timestamp"], filters.as_of_limit, a["target"], a["id"], a["lifecycle"],
        filters.lifecycle_mask, a["confidence"], a["object"])
    keep = np.flatnonzero((scores > 0.0) & (scores >= min_score))
    order = keep[np.lexsort((level.keys[keep], -sizes[keep], -scores[keep]))]
    if top is not None:
        order = order[:top]
    records = context.assertions(sample[order])
    return [PairConflict(record.subject, record.predicate, float(scores[i]), int(sizes[i]),
                         int(claims[i]))
            for i, record in zip(order.tolist(), records)]


def trust_ranks(db: Database) -> dict[str, float]:
    """Trust rank per agent with one (key: first 8 bytes of the agent's public key, hex).

    Agents absent from the result have the starting rank, 0.5.
    """
    _ensure_warm()
    context = _context(db, state_of(db), Filters())
    keys, values = context.trust()
    return {int(k).to_bytes(8, "little").hex(): float(v) for k, v in zip(keys.tolist(), values.tolist())}


# -------------------------------------------------------- materialised views

class MaterializedView:
    """The cached winner of every (subject, predicate) under one lens (default filters).

    Built in one pass over the store (a numba kernel for Recency,
    Confidence, Consensus, Authority and Skeptic; a loop over pairs for other
    lenses). A write to a pair invalidates that pair: the next query of it
    runs the lens and refreshes the entry. A lens that depends on votes,
    trust ranks or epochs (see Lens.reads) makes the whole view stale when
    such records are written; a stale view is bypassed until `refresh()`.
    `db.query(s, p, lens=...)` with default filters answers from the view.
    """

    def __init__(self, state: QueryState, lens: Lens) -> None:
        self.lens = lens
        self._state = state
        self._lock = threading.Lock()
        # pair key -> (winner record or -1, confidence, conflict, candidates, store count it was
        # computed at): an entry is only ever replaced by one computed at a later count
        self._entries: dict[int, tuple[int, float, float, int, int]] = {}
        self._dirty: dict[int, int] = {}
        self._ready = False
        self.stale = False
        self.built_count = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dirty_pairs(self) -> int:
        return len(self._dirty)

    def refresh(self, db: Database) -> None:
        """Recompute every pair (also clears `stale`)."""
        with self._lock:
            self._ready = False
            self._dirty = {}
            self.stale = False
        context = _context(db, self._state, Filters())
        entries = self._compute(context)
        with self._lock:
            self._entries = entries
            self.built_count = context.count
            self._ready = True

    def _compute(self, context: Context) -> dict[int, tuple[int, float, float, int, int]]:
        a = context.arrays
        level = context.state.pairs.full(a, context.count)
        lens = self.lens
        mode = lens.bulk_mode
        if mode is not None:
            multipliers = np.ones(7)
            trust_keys, trust_values, default = np.zeros(0, dtype=np.uint64), np.zeros(0), 1.0
            if lens.bulk_authority:
                from stemedb.lenses.weighted import Authority
                assert isinstance(lens, Authority)
                multipliers = lens.multiplier_array()
                if lens.trust:
                    trust_keys, trust_values = context.trust()
                    default = 0.5
            winners, shares, scores, sizes = _bulk.kernels().resolve_all(
                *level.arrays, a["timestamp"], a["target"], a["id"], a["lifecycle"],
                a["confidence"], a["source_class"], a["signer"], a["object"], mode,
                lens.bulk_authority, multipliers, trust_keys, trust_values, default)
            at = [context.count] * len(winners)
            return dict(zip(level.keys.tolist(), zip(winners.tolist(), shares.tolist(),
                                                     scores.tolist(), sizes.tolist(), at)))
        entries = {}
        for i, key in enumerate(level.keys.tolist()):
            raw = level.rows[level.starts[i]:level.starts[i + 1]].astype(np.int64)
            cand = _filter(context, raw, 0, 0, int(level.flags[i]) & _rules.FLAG_REVISED)
            outcome = lens.resolve(Candidates(context, cand))
            conflict = outcome.conflict_score
            if conflict is None:
                conflict = conflict_score(outcome.candidates, outcome.weights)
            row = outcome.winner_row
            entries[key] = (-1 if row is None else row, _unit(outcome.confidence), _unit(conflict),
                            len(outcome.candidates), context.count)
        return entries

    # called by the QueryState's write listener (after each durable batch, before it is visible)
    def on_write(self, recnos: np.ndarray, columns: Mapping[str, np.ndarray],
                 assertions: np.ndarray) -> None:
        reads = self.lens.dependencies()
        kind = columns["kind"]
        if (("trust" in reads and assertions.any()) or ("votes" in reads and (kind == RecordKind.VOTE).any())
                or ("epochs" in reads and (kind == RecordKind.EPOCH).any())):
            self.stale = True
        if assertions.any():
            pairs = columns["pair"][assertions].tolist()
            last = recnos[assertions].tolist()
            with self._lock:
                self._dirty.update(zip(pairs, last))

    def serve(self, context: Context, subject: str, predicate: str) -> Resolution | None:
        """The cached answer, or None when the pair must be computed."""
        if not self._ready or self.stale or context.count < self.built_count:
            return None
        key = _codec.pair_key(subject, predicate)
        if key in self._dirty:
            return None
        entry = self._entries.get(key)
        if entry is None:
            entry = (-1, 0.0, 0.0, 0, 0)
        row, confidence, conflict, count, _ = entry
        winner = context.assertion_at(row) if row >= 0 else None
        if winner is not None and not _matches(winner, subject, predicate, context.filters):
            return None
        lens = self.lens

        def recompute() -> Resolution:
            return _compute_pair(context, lens, subject, predicate)[0]

        return Resolution(subject, predicate, lens.describe(), winner, confidence, conflict, count,
                          filters=context.filters, recompute=recompute)

    def store(self, context: Context, subject: str, predicate: str, resolution: Resolution,
              outcome: Outcome) -> None:
        """Refresh one pair's entry from a query computed at `context.count`."""
        if not self._ready or self.stale:
            return
        key = _codec.pair_key(subject, predicate)
        row = outcome.winner_row
        entry = (-1 if row is None else row, resolution.confidence, resolution.conflict_score,
                 resolution.candidates_count, context.count)
        with self._lock:
            written = self._dirty.get(key)
            if written is not None and written >= context.count:
                return  # a write this computation did not see: the pair stays dirty
            current = self._entries.get(key)
            if current is not None and current[4] > context.count:
                return  # another query already stored a later answer
            self._entries[key] = entry
            if written is not None:
                del self._dirty[key]

    def __repr__(self) -> str:
        return (f"<MaterializedView {self.lens.describe()} pairs={len(self)} dirty={self.dirty_pairs}"
                f"{' stale' if self.stale else ''}>")


def materialize(db: Database, lens: LensSpec) -> MaterializedView:
    """Cache the winner of every (subject, predicate) under `lens`; returns the view.

    Materialising the same lens again rebuilds its view. Queries with that
    lens and default filters are then answered from the view.
    """
    _ensure_warm()
    chosen = get_lens(lens)
    if chosen.predicates is not None:
        raise ValueError(f"materialize: the {chosen.name} lens is per subject, not per pair")
    state = state_of(db)
    key: Hashable = chosen.key()
    found = state.views.get(key)
    view = found if isinstance(found, MaterializedView) else None
    if view is None:
        view = MaterializedView(state, chosen)
        # registered before the snapshot it is built from: no write can slip between
        state.register_view(key, view)
    view.refresh(db)
    return view


def drop_view(db: Database, lens: LensSpec) -> bool:
    """Forget the materialised view of `lens`; True if there was one."""
    return state_of(db).drop_view(get_lens(lens).key())


# ---------------------------------------------------------------- printing

def render(result: Any, *, contributions: int = 10) -> str:
    """Human-readable text for what the functions here return (the CLI prints it).

    Accepts a Resolution, a dict predicate -> Resolution, a list of
    PairConflict, or a list of audit entries. `--json` output should use
    `to_dict()` / the entries themselves instead.
    """
    if isinstance(result, Resolution):
        return _render_resolution(result, contributions)
    if isinstance(result, dict):
        if not result:
            return "no candidates"
        return "\n\n".join(_render_resolution(r, contributions) for r in result.values())
    if isinstance(result, list) and all(isinstance(c, PairConflict) for c in result):
        if not result:
            return "no contested (subject, predicate) pairs"
        lines = [f"{'score':>6}  {'claims':>6}  {'cands':>6}  subject / predicate"]
        lines += [f"{c.conflict_score:6.3f}  {c.claims_count:6d}  {c.candidates_count:6d}  "
                  f"{c.subject} / {c.predicate}" for c in result]
        return "\n".join(lines)
    if isinstance(result, list):
        return "\n".join(
            f"{e.get('at')}  {e.get('agent') or '-'}  {e.get('lens')}  {e.get('subject')} / "
            f"{e.get('predicate') or '*'}  -> " + ", ".join(
                f"{name or e.get('predicate')}: {_short(r.get('value'))}"
                for name, r in (e.get("results") or {}).items())
            for e in result) or "no audit entries"
    return repr(result)


def _render_resolution(r: Resolution, contributions: int) -> str:
    lines = [f"{r.subject} / {r.predicate or '*'}  (lens {r.lens})",
             f"  winner      {_short(r.value) if r.winner is not None else '(none)'}"
             + (f"  [{r.winner.id.hex()[:16]}]" if r.winner is not None else ""),
             f"  confidence  {r.confidence:.4f}",
             f"  conflict    {r.conflict_score:.4f}",
             f"  candidates  {r.candidates_count}"]
    analysis = r.analysis
    status = getattr(analysis, "status", None)
    if status is not None:
        lines.append(f"  status      {status}")
        for claim in analysis.claims[:contributions]:
            lines.append(f"    {claim.share:6.1%}  {_short(claim.value)}  ({claim.assertions} assertions)")
    tiers = getattr(analysis, "tiers", None)
    if tiers is not None:
        for tier in tiers:
            value = _short(tier.winner.object) if tier.winner is not None else "(none)"
            lines.append(f"    {tier.source_class.name.lower():14s} {value}  confidence "
                         f"{tier.confidence:.3f}  conflict {tier.conflict_score:.3f}")
    if hasattr(analysis, "must_use"):
        lines.append("  must use    " + ", ".join(_short(rule.value) for rule in analysis.must_use))
        lines.append("  forbidden   " + ", ".join(_short(rule.value) for rule in analysis.forbidden))
        if analysis.conflicts:
            lines.append("  CONFLICTS   " + ", ".join(_short(v) for v in analysis.conflicts))
    if contributions:
        shown = r.contributions[:contributions]
        if shown:
            lines.append("  contributions (weight, lifecycle, assertion)")
        for c in shown:
            lines.append(f"    {c.weight:8.4f}  {c.lifecycle.name.lower():12s} {c.assertion_id.hex()[:16]}"
                         f"{'  *' if c.supports else ''}")
        if len(r.contributions) > len(shown):
            lines.append(f"    ... {len(r.contributions) - len(shown)} more")
    return "\n".join(lines)


# ------------------------------------------------------------------- audit

def _agent_name(agent: AgentSpec) -> str | None:
    if agent is None:
        return None
    if isinstance(agent, Signer):
        return agent.public_key.hex()
    if isinstance(agent, (bytes, bytearray, memoryview)):
        return bytes(agent).hex()
    if isinstance(agent, str):
        return agent
    raise TypeError(f"agent: expected a str, public key bytes or Signer, got {type(agent).__name__}")


def _audit_result(result: Resolution) -> dict[str, Any]:
    return {
        "winner": result.winner.id.hex() if result.winner is not None else None,
        "value": _json_value(result.value),
        "confidence": result.confidence, "conflict_score": result.conflict_score,
        "candidates_count": result.candidates_count,
        "contributions": [[c.assertion_id.hex(), c.weight, c.lifecycle.name.lower(),
                           c.source_hash.hex()] for c in result.contributions],
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, Ref):
        return {"ref": value.entity}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    return value


def _write_audit(db: Database, agent: AgentSpec, subject: str, predicate: str | None,
                 lens: Lens, filters: Filters, result: Resolution | dict[str, Resolution]) -> None:
    if isinstance(result, dict):
        results = {name: _audit_result(r) for name, r in result.items()}
    else:
        results = {predicate or "": _audit_result(result)}
    entry = {"v": AUDIT_VERSION, "at": time.time_ns() // 1000, "agent": _agent_name(agent),
             "subject": subject, "predicate": predicate, "lens": lens.describe(),
             "filters": filters.as_dict(), "results": results}
    db.side_file(AUDIT_FILE).append((json.dumps(entry, separators=(",", ":"), sort_keys=True)
                                     + "\n").encode())


def audit_log(db: Database, agent: AgentSpec = None, since: int | None = None,
              limit: int | None = 100) -> list[dict[str, Any]]:
    """Audit entries, oldest first: the last `limit` (None: all) by `agent`, at or after `since` µs.

    Each entry is the JSON object written by `query(..., audit=True)` (see
    docs/query.md). A torn last line (a crash during an append) is skipped.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected a count >= 0 or None, got {limit!r}")
    lines = db.side_file(AUDIT_FILE).lines()
    name = _agent_name(agent)
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if name is not None and entry.get("agent") != name:
            continue
        if since is not None and entry.get("at", 0) < since:
            continue
        out.append(entry)
    if limit is not None:
        out = out[-limit:] if limit else []
    return out

