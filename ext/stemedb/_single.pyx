"""One query of one (subject, predicate) pair, from its keys to its Resolution, in one call (private API).

Owns: the common case of `stemedb.query.query` — a lens whose whole rule is
one kernel mode of `_pair` (Recency, Confidence, Consensus), the default
filters, no audit, no materialised view of the store. For it the general
path ran some fifteen Python functions and built five objects besides the
answer; here the snapshot's columns go to `_pair.PairQuery.run` as a C call,
the winner is decoded by record number (the point reader), and the
Resolution is filled in directly. Its contributions stay unbuilt until they
are read (`PairContributions`).

Anything outside that case is the caller's to route; and a winner whose
subject or predicate is not the pair asked for (its 64-bit keys collided
with another pair's) answers None, so that the caller takes the general
path, which confirms every candidate by its decoded fields. Same answers as
the general path, field for field: tests/test_single.py.

Must never: take the engine's lock itself (the view's `snapshot` does), keep
a reference to a snapshot after it returns (except in the lazy
contributions of the Resolution it returns), or answer for filters it does
not apply.
"""

from libc.stdint cimport int64_t, uint64_t

from stemedb._codec cimport AssertionCore
from stemedb._pair cimport PairQuery

from stemedb import _codec

cdef uint64_t NO_LIMIT = 0xFFFFFFFFFFFFFFFFULL
cdef Py_ssize_t KEYS_MAX = 1 << 16


cdef inline double _unit(double value) noexcept:
    """Clamped to [0, 1]; NaN and negatives are 0 (as stemedb.query._unit)."""
    if not value > 0.0:
        return 0.0
    return 1.0 if value > 1.0 else value


cdef class PairContributions:
    """What a Resolution's contributions are built from when first read: the query's snapshot,
    its candidates and their weights. `build` hands them to the query layer's builder."""

    cdef object _build, _db, _state, _arrays, _rows, _weights, _winner_object
    cdef Py_ssize_t _count

    def build(self):
        return self._build(self._db, self._state, self._count, self._arrays, self._rows,
                           self._weights, self._winner_object)


cdef class SingleQuery:
    """The one-call query of one store's QueryState (see the module doc).

    pair: the state's PairQuery (its kept column views are shared with the
    general path). resolution: the Resolution class, filled in without its
    __init__ (every slot is set). build: build(db, state, count, arrays,
    rows, weights, winner_object) -> the contributions. filters: the default
    Filters, which every answer carries.
    """

    cdef PairQuery _pair
    cdef dict _keys
    cdef object _resolution, _new, _build, _filters
    cdef int64_t _lifecycle_mask

    def __init__(self, PairQuery pair not None, resolution, build, filters):
        self._pair = pair
        self._keys = {}
        self._resolution = resolution
        self._new = resolution.__new__
        self._build = build
        self._filters = filters
        self._lifecycle_mask = filters.lifecycle_mask

    cdef tuple _keys_of(self, str subject, str predicate):
        """(pair key, subject key, predicate key, subject UTF-8, predicate UTF-8), memoised:
        three BLAKE3 calls cost more than the rest of a query."""
        pair = (subject, predicate)
        found = self._keys.get(pair)
        if found is None:
            if len(self._keys) >= KEYS_MAX:
                self._keys.clear()
            found = (<uint64_t>_codec.pair_key(subject, predicate), <uint64_t>_codec.subject_key(subject),
                     <uint64_t>_codec.predicate_key(predicate), subject.encode("utf-8"),
                     predicate.encode("utf-8"))
            self._keys[pair] = found
        return <tuple>found

    cpdef object answer(self, db, state, str subject, str predicate, int mode, str lens):
        """The Resolution of (subject, predicate) through the lens of `mode`, described as `lens`,
        with the default filters; None when the general path must answer (see the module doc)."""
        if subject is None or predicate is None or lens is None:
            raise TypeError("answer: subject, predicate and lens must be str")
        if state.views:
            return None
        cdef Py_ssize_t visible = state.visible   # first, as QueryState.snapshot reads it
        snapshot = db.view.snapshot()
        cdef Py_ssize_t count = snapshot.count
        if count > visible:
            count = visible   # the query state has not been told of the rows above
        arrays = snapshot.arrays
        levels, scan_lo = state.pairs.snapshot(arrays, count)
        cdef tuple keys = self._keys_of(subject, predicate)
        cdef Py_ssize_t row
        cdef uint64_t winner_object
        cand, weights, index, share, conflict = self._pair.run(
            arrays, levels, scan_lo, count, keys[0], keys[1], keys[2], NO_LIMIT, 0,
            self._lifecycle_mask, False, 0.0, mode, &row, &winner_object)
        winner = None
        found_object = None
        if row >= 0:
            winner = db.view.record_at(row)
            if (not isinstance(winner, AssertionCore) or (<AssertionCore>winner)._subject != keys[3]
                    or (<AssertionCore>winner)._predicate != keys[4]):
                return None   # a key collision: the general path confirms the candidates
            found_object = winner_object
        cdef PairContributions source = PairContributions.__new__(PairContributions)
        source._build = self._build
        source._db = db
        source._state = state
        source._count = count
        source._arrays = arrays
        source._rows = cand
        source._weights = weights
        source._winner_object = found_object
        result = self._new(self._resolution)
        result.subject = subject
        result.predicate = predicate
        result.lens = lens
        result.winner = winner
        result.confidence = _unit(share)
        result.conflict_score = _unit(conflict)
        result.candidates_count = len(cand)
        result.filters = self._filters
        result._analysis = None
        result._contributions = None
        result._source = source
        result._recompute = None
        return result


cdef class QueryFront:
    """`db.query`, bound onto the Database when the store opens: the common case without a
    Python frame between the caller and SingleQuery.answer, everything else to `general`.

    hooks() -> (general, lens_info, state_of, single_for, warm, lenses) is called on the first
    query (it imports the query layer, which opening a store does not): general(db, subject,
    predicate, **options) is stemedb.query.query; lens_info(name) -> (lens, mode, describe())
    for the lenses SingleQuery answers, or None; state_of(db) the store's QueryState;
    single_for(state) its SingleQuery; warm() starts the JIT warm-up in the background;
    lenses the stemedb.lenses module, whose GENERATION changes when a lens name is
    registered (the names cached here are then looked up again).
    """

    cdef object _db, _hooks
    cdef object _general, _lens_info, _state_of, _single_for, _warm, _lenses
    cdef dict _names                 # lens name -> (mode, describe) or None (not answered here)
    cdef object _generation

    def __init__(self, db, hooks):
        self._db = db
        self._hooks = hooks
        self._general = None
        self._names = {}

    cdef int _setup(self) except -1:
        (self._general, self._lens_info, self._state_of, self._single_for, self._warm,
         self._lenses) = self._hooks()
        self._generation = self._lenses.GENERATION
        return 0

    def __call__(self, subject, predicate=None, *, lens="recency", lifecycle="any", epoch=None,
                 as_of=None, decay=False, now=None, audit=False, agent=None):
        """Resolve the claims about subject (and predicate) through a lens: see
        stemedb.Database.query (the same arguments, the same answers)."""
        if self._general is None:
            self._setup()
        if (predicate is not None and epoch is None and as_of is None and now is None
                and decay is False and audit is False and type(subject) is str
                and type(predicate) is str and type(lens) is str and type(lifecycle) is str
                and len(<str>subject) and len(<str>predicate) and <str>lifecycle == "any"):
            generation = self._lenses.GENERATION
            if generation != self._generation:
                self._names.clear()
                self._generation = generation
            found = self._names.get(lens, False)
            if found is False:
                info = self._lens_info(lens)
                found = None if info is None else (info[1], info[2])
                self._names[lens] = found
            if found is not None:
                db = self._db
                state = self._state_of(db)
                single = state.single_query
                if single is None:
                    single = self._single_for(state)
                result = (<SingleQuery?>single).answer(db, state, <str>subject, <str>predicate,
                                                        (<tuple>found)[0], (<tuple>found)[1])
                if result is not None:
                    self._warm()
                    return result
        return self._general(self._db, subject, predicate, lens=lens, lifecycle=lifecycle,
                             epoch=epoch, as_of=as_of, decay=decay, now=now, audit=audit,
                             agent=agent)
