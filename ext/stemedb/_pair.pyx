"""The lens work of one (subject, predicate) pair, compiled ahead of time (private API).

Owns: the per-pair steps a single query runs — the candidates of one key
from the query-side CSR levels (`key_rows`, `filter_candidates`,
`select_pair`), their weights (`effective_confidence`, `authority_weights`,
`net_votes`), the claims (`group_claims`, `rank_claims`, `entropy`) and the
winner (`pick`, and `resolve_pair`: selection, weights and pick in one
call). They are the rules of `stemedb.lenses._kernels`, step for step, with
the same arguments and results; the numba kernels stay for the whole-store
passes (every pair at once), which they run in parallel loops. A single
query calls only this module, so it never waits for a JIT compiler.
`tests/test_pair_kernels.py` holds the two to the same answers on random
stores, bit for bit.

Determinism (as in _kernels): a result depends only on the set of
candidates. Ties are broken by ID, weights are summed as integer units of
2**-32, entropy terms as integer units of 2**-40.

Arguments are the engine's column arrays (the first `count` rows valid)
with their dtypes: uint64 keys, timestamps and targets, float32 confidence,
uint8 kind / source class / lifecycle, the (n, 32) uint8 ID column, uint32
CSR rows and posting lists, int64 offsets and candidates. Must never:
decode records, take locks, or keep a reference to an array after it returns.
"""

from libc.math cimport floor, log, pow, fabs, INFINITY
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

import numpy as np

from stemedb.records import RecordKind

RECENCY = 0
CONFIDENCE = 1
CONSENSUS = 2
cdef int RECENCY_MODE = 0
cdef int CONSENSUS_MODE = 2
FLAG_REVISED = 1
FLAG_MIXED = 2

cdef int64_t _FLAG_REVISED = 1
cdef int64_t _FLAG_MIXED = 2
cdef double WEIGHT_SCALE = 4294967296.0        # 2 ** 32
cdef double WEIGHT_CAP = 65536.0
cdef double ENTROPY_SCALE = 1099511627776.0    # 2 ** 40
cdef double DAY_US = 86400000000.0
cdef uint64_t NO_LIMIT = 0xFFFFFFFFFFFFFFFFULL
cdef uint8_t KIND_VOTE = int(RecordKind.VOTE)


# ----------------------------------------------------------------- helpers

cdef inline bint _id_less(IdColumn ids, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef int k
    for k in range(32):
        if ids[a, k] != ids[b, k]:
            return ids[a, k] < ids[b, k]
    return False


cdef inline uint64_t _id_key(IdColumn ids, Py_ssize_t r) noexcept nogil:
    cdef uint64_t value = 0
    cdef int k
    for k in range(7, -1, -1):
        value = (value << 8) | ids[r, k]
    return value


cdef inline bint _more_recent(const uint64_t[:] timestamp, IdColumn ids, Py_ssize_t a,
                              Py_ssize_t b) noexcept nogil:
    if timestamp[a] != timestamp[b]:
        return timestamp[a] > timestamp[b]
    return _id_less(ids, a, b)


cdef inline int64_t _weight_units(double weight) noexcept nogil:
    if not weight > 0.0:
        return 0
    if weight > WEIGHT_CAP:
        weight = WEIGHT_CAP
    return <int64_t>floor(weight * WEIGHT_SCALE + 0.5)


cdef inline Py_ssize_t _table_size(Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t size = 8
    while size < 2 * n:
        size *= 2
    return size


cdef inline Py_ssize_t _lower_bound(const uint64_t[:] keys, uint64_t key) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = keys.shape[0], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------- selection

cdef struct Span:
    Py_ssize_t lo
    Py_ssize_t hi
    int64_t flags


cdef inline Span _csr_span(const uint64_t[:] keys, const int64_t[:] starts, const uint8_t[:] flags,
                           uint64_t key) noexcept nogil:
    """Where `key`'s rows are in one CSR level (an empty span and no flags if absent)."""
    cdef Span span
    cdef Py_ssize_t i = _lower_bound(keys, key)
    span.lo = 0
    span.hi = 0
    span.flags = 0
    if i < keys.shape[0] and keys[i] == key:
        span.lo = starts[i]
        span.hi = starts[i + 1]
        span.flags = flags[i]
    return span


cdef Py_ssize_t _gather(uint64_t key, Span base, const uint32_t[:] base_rows, Span tail,
                        const uint32_t[:] tail_rows, Py_ssize_t scan_lo, Py_ssize_t scan_hi,
                        const uint64_t[:] key_column, const uint64_t[:] target, int64_t* out,
                        int64_t* flags) noexcept nogil:
    """The record numbers of `key` from the three levels into out (room for all); their count."""
    cdef Py_ssize_t m = 0, i, r
    flags[0] = base.flags | tail.flags
    for i in range(base.lo, base.hi):
        out[m] = base_rows[i]
        m += 1
    for i in range(tail.lo, tail.hi):
        out[m] = tail_rows[i]
        m += 1
    for r in range(scan_lo, scan_hi):
        if key_column[r] == key:
            out[m] = r
            m += 1
            flags[0] |= _FLAG_MIXED
            if target[r] != 0:
                flags[0] |= _FLAG_REVISED
    return m


cdef inline Py_ssize_t _room(Span base, Span tail, Py_ssize_t scan_lo, Py_ssize_t scan_hi) noexcept nogil:
    return (base.hi - base.lo) + (tail.hi - tail.lo) + (scan_hi - scan_lo if scan_hi > scan_lo else 0)


cdef Py_ssize_t _filter(int64_t* kept, Py_ssize_t m, int64_t flags, const uint64_t[:] subject,
                        const uint64_t[:] predicate, uint64_t subject_key, uint64_t predicate_key,
                        const uint64_t[:] timestamp, uint64_t as_of, const uint64_t[:] target,
                        IdColumn ids, const uint64_t[:] epoch, uint64_t epoch_key,
                        const uint8_t[:] lifecycle, int64_t lifecycle_mask) except -1 nogil:
    """Filter kept[:m] in place, as _kernels.filter_candidates; the count kept."""
    cdef Py_ssize_t i, n, size
    cdef uint64_t mask, s, k
    cdef uint64_t* slots
    if flags & _FLAG_MIXED and (subject_key != 0 or predicate_key != 0):
        n = 0
        for i in range(m):
            if (subject_key == 0 or subject[kept[i]] == subject_key) and \
                    (predicate_key == 0 or predicate[kept[i]] == predicate_key):
                kept[n] = kept[i]
                n += 1
        m = n
    if as_of != NO_LIMIT:
        n = 0
        for i in range(m):
            if timestamp[kept[i]] <= as_of:
                kept[n] = kept[i]
                n += 1
        m = n
    if flags & _FLAG_REVISED and m:
        # the parents of the visible ones, in an open-addressing set (0 marks an empty slot)
        size = _table_size(m)
        slots = <uint64_t*>malloc(size * sizeof(uint64_t))
        if slots == NULL:
            with gil:
                raise MemoryError()
        for i in range(size):
            slots[i] = 0
        mask = <uint64_t>(size - 1)
        for i in range(m):
            k = target[kept[i]]
            if k == 0:
                continue
            s = k & mask
            while slots[s] != 0 and slots[s] != k:
                s = (s + 1) & mask
            slots[s] = k
        n = 0
        for i in range(m):
            if not _in_set(slots, mask, _id_key(ids, kept[i])):
                kept[n] = kept[i]
                n += 1
        m = n
        free(slots)
    if epoch_key != 0:
        n = 0
        for i in range(m):
            if epoch[kept[i]] == epoch_key:
                kept[n] = kept[i]
                n += 1
        m = n
    if lifecycle_mask & 0x1F != 0x1F:
        n = 0
        for i in range(m):
            if (lifecycle_mask >> lifecycle[kept[i]]) & 1:
                kept[n] = kept[i]
                n += 1
        m = n
    return m


cdef inline bint _in_set(const uint64_t* slots, uint64_t mask, uint64_t key) noexcept nogil:
    if key == 0:
        return False
    cdef uint64_t s = key & mask
    while slots[s] != 0:
        if slots[s] == key:
            return True
        s = (s + 1) & mask
    return False


def key_rows(uint64_t key, const uint64_t[:] base_keys, const int64_t[:] base_starts,
             const uint32_t[:] base_rows, const uint8_t[:] base_flags,
             const uint64_t[:] tail_keys, const int64_t[:] tail_starts,
             const uint32_t[:] tail_rows, const uint8_t[:] tail_flags, Py_ssize_t scan_lo,
             Py_ssize_t scan_hi, const uint64_t[:] key_column, const uint64_t[:] target):
    """(record numbers of one key, ascending, int64; their flags) from the three index levels:
    the base CSR, the tail CSR and the unindexed records [scan_lo, scan_hi), scanned (a
    scanned record sets FLAG_MIXED, and FLAG_REVISED if it has a parent)."""
    cdef int64_t flags = 0
    cdef Py_ssize_t m = 0
    raw = _gathered(key, base_keys, base_starts, base_rows, base_flags, tail_keys, tail_starts,
                    tail_rows, tail_flags, scan_lo, scan_hi, key_column, target, &flags, &m)
    return raw[:m], flags


cdef object _gathered(uint64_t key, const uint64_t[:] base_keys, const int64_t[:] base_starts,
                      const uint32_t[:] base_rows, const uint8_t[:] base_flags,
                      const uint64_t[:] tail_keys, const int64_t[:] tail_starts,
                      const uint32_t[:] tail_rows, const uint8_t[:] tail_flags,
                      Py_ssize_t scan_lo, Py_ssize_t scan_hi, const uint64_t[:] key_column,
                      const uint64_t[:] target, int64_t* flags, Py_ssize_t* count):
    """An int64 array whose first count[0] entries are the record numbers of `key`."""
    cdef Span base = _csr_span(base_keys, base_starts, base_flags, key)
    cdef Span tail = _csr_span(tail_keys, tail_starts, tail_flags, key)
    rows = np.empty(_room(base, tail, scan_lo, scan_hi) + 1, dtype=np.int64)
    cdef int64_t[::1] out = rows
    with nogil:
        count[0] = _gather(key, base, base_rows, tail, tail_rows, scan_lo, scan_hi, key_column,
                           target, &out[0], flags)
    return rows


def filter_candidates(const int64_t[:] raw, Py_ssize_t count, int64_t flags,
                      const uint64_t[:] subject, const uint64_t[:] predicate, uint64_t subject_key,
                      uint64_t predicate_key, const uint64_t[:] timestamp, uint64_t as_of,
                      const uint64_t[:] target, IdColumn ids, const uint64_t[:] epoch,
                      uint64_t epoch_key, const uint8_t[:] lifecycle, int64_t lifecycle_mask):
    """Candidates among raw[:count], as _kernels.filter_candidates: the subject / predicate keys
    confirmed (when FLAG_MIXED), timestamp <= as_of, revised assertions dropped (when
    FLAG_REVISED), then the epoch and the lifecycle stages."""
    rows = np.empty(count + 1, dtype=np.int64)
    cdef int64_t[::1] kept = rows
    cdef Py_ssize_t i, m
    for i in range(count):
        kept[i] = raw[i]
    with nogil:
        m = _filter(&kept[0], count, flags, subject, predicate, subject_key, predicate_key,
                    timestamp, as_of, target, ids, epoch, epoch_key, lifecycle, lifecycle_mask)
    return rows[:m]


def select_pair(uint64_t key, const uint64_t[:] base_keys, const int64_t[:] base_starts,
                const uint32_t[:] base_rows, const uint8_t[:] base_flags,
                const uint64_t[:] tail_keys, const int64_t[:] tail_starts,
                const uint32_t[:] tail_rows, const uint8_t[:] tail_flags, Py_ssize_t scan_lo,
                Py_ssize_t scan_hi, const uint64_t[:] key_column, const uint64_t[:] subject,
                const uint64_t[:] predicate, uint64_t subject_key, uint64_t predicate_key,
                const uint64_t[:] timestamp, uint64_t as_of, const uint64_t[:] target,
                IdColumn ids, const uint64_t[:] epoch, uint64_t epoch_key,
                const uint8_t[:] lifecycle, int64_t lifecycle_mask):
    """key_rows then filter_candidates, in one call."""
    return _select(key, base_keys, base_starts, base_rows, base_flags, tail_keys, tail_starts,
                   tail_rows, tail_flags, scan_lo, scan_hi, key_column, subject, predicate,
                   subject_key, predicate_key, timestamp, as_of, target, ids, epoch, epoch_key,
                   lifecycle, lifecycle_mask)


cdef object _select(uint64_t key, const uint64_t[:] base_keys, const int64_t[:] base_starts,
                    const uint32_t[:] base_rows, const uint8_t[:] base_flags,
                    const uint64_t[:] tail_keys, const int64_t[:] tail_starts,
                    const uint32_t[:] tail_rows, const uint8_t[:] tail_flags, Py_ssize_t scan_lo,
                    Py_ssize_t scan_hi, const uint64_t[:] key_column, const uint64_t[:] subject,
                    const uint64_t[:] predicate, uint64_t subject_key, uint64_t predicate_key,
                    const uint64_t[:] timestamp, uint64_t as_of, const uint64_t[:] target,
                    IdColumn ids, const uint64_t[:] epoch, uint64_t epoch_key,
                    const uint8_t[:] lifecycle, int64_t lifecycle_mask):
    """The filtered candidates of `key` (int64 record numbers, ascending)."""
    cdef int64_t flags = 0
    cdef Py_ssize_t m = 0
    rows = _gathered(key, base_keys, base_starts, base_rows, base_flags, tail_keys, tail_starts,
                     tail_rows, tail_flags, scan_lo, scan_hi, key_column, target, &flags, &m)
    cdef int64_t[::1] out = rows
    with nogil:
        m = _filter(&out[0], m, flags, subject, predicate, subject_key, predicate_key, timestamp,
                    as_of, target, ids, epoch, epoch_key, lifecycle, lifecycle_mask)
    return rows[:m]


# ---------------------------------------------------------------- weights

cdef void _effective(const int64_t* cand, Py_ssize_t n, const float[:] confidence,
                     const uint64_t[:] timestamp, const uint8_t[:] source_class, bint decay,
                     double now, const double[:] half_lives, double* out) noexcept nogil:
    cdef Py_ssize_t i, r
    cdef double half_life, age
    for i in range(n):
        out[i] = confidence[cand[i]]
    if decay:
        for i in range(n):
            r = cand[i]
            half_life = half_lives[source_class[r]]
            if half_life > 0.0 and half_life < INFINITY:
                age = now - <double>timestamp[r]
                if age > 0.0:
                    out[i] *= pow(0.5, age / DAY_US / half_life)


def effective_confidence(const int64_t[::1] cand, const float[:] confidence,
                         const uint64_t[:] timestamp, const uint8_t[:] source_class, bint decay,
                         double now, const double[:] half_lives):
    """confidence x 0.5 ** (age_days / half_life[source_class]) (no decay: the confidence)."""
    cdef Py_ssize_t n = cand.shape[0]
    result = np.empty(n + 1, dtype=np.float64)
    cdef double[::1] out = result
    if n:
        with nogil:
            _effective(&cand[0], n, confidence, timestamp, source_class, decay, now, half_lives,
                       &out[0])
    return result[:n]


def authority_weights(const int64_t[:] cand, const double[:] effective,
                      const uint8_t[:] source_class, const uint64_t[:] signer,
                      const double[:] multipliers, const uint64_t[:] trust_keys,
                      const double[:] trust_values, double default_trust):
    """effective confidence x source-class multiplier x trust rank of the signer."""
    cdef Py_ssize_t n = cand.shape[0], i, r, j
    cdef double trust
    result = np.empty(n, dtype=np.float64)
    cdef double[::1] out = result
    with nogil:
        for i in range(n):
            r = cand[i]
            trust = default_trust
            j = _lower_bound(trust_keys, signer[r])
            if j < trust_keys.shape[0] and trust_keys[j] == signer[r]:
                trust = trust_values[j]
            out[i] = effective[i] * multipliers[source_class[r]] * trust
    return result


def net_votes(const int64_t[:] cand, const uint32_t[:] flat, const int64_t[:] offsets,
              const uint8_t[:] kind, const uint64_t[:] timestamp, uint64_t as_of,
              const float[:] weight, const uint64_t[:] signer, IdColumn ids):
    """Per candidate: the summed weight of the latest vote of each agent, floored at 0
    (flat[offsets[i]:offsets[i+1]] target candidate i; votes after as_of are ignored)."""
    cdef Py_ssize_t n = cand.shape[0], i, j, m, size, longest = 0
    cdef int64_t r, total, units
    cdef uint64_t mask, s, agent
    cdef double value
    result = np.zeros(n, dtype=np.float64)
    cdef double[::1] out = result
    for i in range(n):
        longest = max(longest, offsets[i + 1] - offsets[i])
    if longest == 0:
        return result
    votes_array = np.empty(longest, dtype=np.int64)
    agents_array = np.empty(_table_size(longest), dtype=np.uint64)
    chosen_array = np.empty(_table_size(longest), dtype=np.int64)
    cdef int64_t[::1] votes = votes_array
    cdef uint64_t[::1] agents = agents_array
    cdef int64_t[::1] chosen = chosen_array
    with nogil:
        for i in range(n):
            m = 0
            for j in range(offsets[i], offsets[i + 1]):
                r = flat[j]
                if kind[r] == KIND_VOTE and timestamp[r] <= as_of:
                    votes[m] = r
                    m += 1
            if m == 0:
                continue
            # the latest vote of each agent: a small open-addressing map agent -> vote
            size = _table_size(m)
            mask = <uint64_t>(size - 1)
            for j in range(size):
                agents[j] = 0
                chosen[j] = -1
            for j in range(m):
                r = votes[j]
                agent = signer[r]
                s = agent & mask
                while chosen[s] != -1 and agents[s] != agent:
                    s = (s + 1) & mask
                if chosen[s] == -1 or _more_recent(timestamp, ids, r, chosen[s]):
                    agents[s] = agent
                    chosen[s] = r
            total = 0
            for j in range(size):
                if chosen[j] != -1:
                    value = min(max(<double>weight[chosen[j]], -WEIGHT_CAP), WEIGHT_CAP)
                    units = <int64_t>floor(fabs(value) * WEIGHT_SCALE + 0.5)
                    total += units if value > 0 else -units
            if total > 0:
                out[i] = total / WEIGHT_SCALE
    return result


# ----------------------------------------------------------------- claims

cdef Py_ssize_t _group(const int64_t* cand, Py_ssize_t n, const double* weights,
                       const uint64_t[:] obj, const uint64_t[:] timestamp, IdColumn ids,
                       int64_t* group, int64_t* units, int64_t* counts, int64_t* latest,
                       int64_t* slots, uint64_t* keys) noexcept nogil:
    """Group candidates by object key (slots: _table_size(n) entries of scratch); the groups.
    group[i] is candidate i's, numbered in candidate order; per group: weight units, size,
    and the index in cand of its most recent assertion."""
    cdef Py_ssize_t size = _table_size(n), i, j, g, groups = 0
    cdef uint64_t mask = <uint64_t>(size - 1), s, key
    for i in range(size):
        slots[i] = -1
    for i in range(n):
        units[i] = 0
        counts[i] = 0
    for i in range(n):
        key = obj[cand[i]]
        s = key & mask
        while True:
            g = slots[s]
            if g == -1:
                slots[s] = groups
                keys[groups] = key
                latest[groups] = i
                g = groups
                groups += 1
                break
            if keys[g] == key:
                break
            s = (s + 1) & mask
        group[i] = g
    for i in range(n):
        g = group[i]
        units[g] += _weight_units(weights[i])
        counts[g] += 1
    for i in range(n):
        g = group[i]
        j = latest[g]
        if timestamp[cand[i]] != timestamp[cand[j]]:
            if timestamp[cand[i]] > timestamp[cand[j]]:
                latest[g] = i
        elif i != j and _id_less(ids, cand[i], cand[j]):
            latest[g] = i
    return groups


def group_claims(const int64_t[::1] cand, const double[::1] weights, const uint64_t[:] obj,
                 const uint64_t[:] timestamp, IdColumn ids):
    """(group of each candidate, group weight units, group sizes, index in `cand` of each
    group's most recent assertion); groups numbered in candidate order."""
    cdef Py_ssize_t n = cand.shape[0], groups = 0
    columns = np.empty((4, n + 1), dtype=np.int64)
    cdef int64_t[:, ::1] out = columns
    cdef int64_t* slots = <int64_t*>malloc(_table_size(n) * sizeof(int64_t))
    cdef uint64_t* keys = <uint64_t*>malloc((n + 1) * sizeof(uint64_t))
    try:
        if slots == NULL or keys == NULL:
            raise MemoryError()
        if n:
            with nogil:
                groups = _group(&cand[0], n, &weights[0], obj, timestamp, ids, &out[0, 0],
                                &out[1, 0], &out[2, 0], &out[3, 0], slots, keys)
    finally:
        free(slots)
        free(keys)
    return columns[0, :n], columns[1, :groups], columns[2, :groups], columns[3, :groups]


cdef double _entropy(const int64_t* units, const int64_t* counts, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t g, positive = 0
    cdef int64_t total = 0, accumulated = 0, value
    cdef bint by_weight
    cdef double p, score
    for g in range(k):
        total += units[g]
    by_weight = total > 0
    if not by_weight:
        total = 0
        for g in range(k):
            total += counts[g]
    for g in range(k):
        value = units[g] if by_weight else counts[g]
        if value > 0:
            positive += 1
            p = <double>value / <double>total
            accumulated += <int64_t>floor(-p * log(p) * ENTROPY_SCALE + 0.5)
    if positive <= 1 or total <= 0:
        return 0.0
    score = accumulated / ENTROPY_SCALE / log(<double>positive)
    if score < 0.0:
        return 0.0
    if score > 1.0:
        return 1.0
    return score


def entropy(units, counts):
    """Normalised Shannon entropy of the claims' weight shares, in [0, 1] (by count when every
    weight is 0; claims with a zero share do not count toward the normaliser ln(k))."""
    cdef const int64_t[::1] u = np.ascontiguousarray(units, dtype=np.int64)
    cdef const int64_t[::1] c = np.ascontiguousarray(counts, dtype=np.int64)
    if u.shape[0] != c.shape[0]:
        raise ValueError(f"entropy: {u.shape[0]} weights for {c.shape[0]} counts")
    if u.shape[0] == 0:
        return 0.0
    return _entropy(&u[0], &c[0], u.shape[0])


cdef inline bint _better_claim(const int64_t* cand, const int64_t* units, const int64_t* latest,
                               const uint64_t[:] timestamp, IdColumn ids, Py_ssize_t a,
                               Py_ssize_t b) noexcept nogil:
    if units[a] != units[b]:
        return units[a] > units[b]
    return _more_recent(timestamp, ids, cand[latest[a]], cand[latest[b]])


def rank_claims(const int64_t[::1] cand, units, latest, const uint64_t[:] timestamp, IdColumn ids):
    """Claim indices, best first: more weight, then the more recent latest assertion."""
    cdef const int64_t[::1] u = np.ascontiguousarray(units, dtype=np.int64)
    cdef const int64_t[::1] last = np.ascontiguousarray(latest, dtype=np.int64)
    cdef Py_ssize_t n = u.shape[0], width = 1, lo, mid, hi, i, j, k
    order_array = np.arange(n, dtype=np.int64)
    scratch_array = np.empty(n, dtype=np.int64)
    if n < 2:
        return order_array
    cdef int64_t[::1] order = order_array, scratch = scratch_array, swap
    with nogil:
        while width < n:
            lo = 0
            while lo < n:
                mid = min(lo + width, n)
                hi = min(lo + 2 * width, n)
                i, j, k = lo, mid, lo
                while i < mid and j < hi:
                    if _better_claim(&cand[0], &u[0], &last[0], timestamp, ids, order[j], order[i]):
                        scratch[k] = order[j]
                        j += 1
                    else:
                        scratch[k] = order[i]
                        i += 1
                    k += 1
                while i < mid:
                    scratch[k] = order[i]
                    i += 1
                    k += 1
                while j < hi:
                    scratch[k] = order[j]
                    j += 1
                    k += 1
                lo += 2 * width
            swap = order
            order = scratch
            scratch = swap
            width *= 2
    return np.asarray(order)


cdef int _pick(const int64_t* cand, Py_ssize_t n, const double* weights, const uint64_t[:] obj,
               const uint64_t[:] timestamp, IdColumn ids, int mode, Py_ssize_t* index,
               double* share, double* conflict) except -1 nogil:
    """The winner's index in cand (or -1), the resolution confidence and the conflict score."""
    cdef Py_ssize_t g, i, best = 0, groups
    cdef int64_t total = 0
    cdef uint64_t best_time, t
    cdef int64_t* scratch
    cdef int64_t *group, *units, *counts, *latest, *slots
    index[0] = -1
    share[0] = 0.0
    conflict[0] = 0.0
    if n == 0:
        return 0
    scratch = <int64_t*>malloc((5 * n + _table_size(n)) * sizeof(int64_t))
    if scratch == NULL:
        with gil:
            raise MemoryError()
    group, units, counts, latest = scratch, scratch + n, scratch + 2 * n, scratch + 3 * n
    slots = scratch + 5 * n
    groups = _group(cand, n, weights, obj, timestamp, ids, group, units, counts, latest, slots,
                    <uint64_t*>(scratch + 4 * n))
    conflict[0] = _entropy(units, counts, groups)
    if mode == CONSENSUS_MODE:
        for g in range(1, groups):
            if _better_claim(cand, units, latest, timestamp, ids, g, best):
                best = g
        for g in range(groups):
            total += units[g]
        share[0] = units[best] / <double>total if total > 0 else 0.0
        index[0] = latest[best]
        free(scratch)
        return 0
    free(scratch)
    if mode == RECENCY_MODE:
        best_time = timestamp[cand[0]]
        for i in range(1, n):
            t = timestamp[cand[i]]
            if t > best_time or (t == best_time and _id_less(ids, cand[i], cand[best])):
                best = i
                best_time = t
    else:
        for i in range(1, n):
            if weights[i] != weights[best]:
                if weights[i] > weights[best]:
                    best = i
            elif _more_recent(timestamp, ids, cand[i], cand[best]):
                best = i
    index[0] = best
    share[0] = min(max(weights[best], 0.0), 1.0)
    return 0


def pick(const int64_t[::1] cand, const double[::1] weights, const uint64_t[:] obj,
         const uint64_t[:] timestamp, IdColumn ids, int mode):
    """(index of the winner in cand or -1, resolution confidence, conflict score)."""
    cdef Py_ssize_t n = cand.shape[0], index = -1
    cdef double share = 0.0, conflict = 0.0
    if n:
        with nogil:
            _pick(&cand[0], n, &weights[0], obj, timestamp, ids, mode, &index, &share, &conflict)
    return index, share, conflict


def resolve_pair(uint64_t key, const uint64_t[:] base_keys, const int64_t[:] base_starts,
                 const uint32_t[:] base_rows, const uint8_t[:] base_flags,
                 const uint64_t[:] tail_keys, const int64_t[:] tail_starts,
                 const uint32_t[:] tail_rows, const uint8_t[:] tail_flags, Py_ssize_t scan_lo,
                 Py_ssize_t scan_hi, const uint64_t[:] key_column, const uint64_t[:] subject,
                 const uint64_t[:] predicate, uint64_t subject_key, uint64_t predicate_key,
                 const uint64_t[:] timestamp, uint64_t as_of, const uint64_t[:] target,
                 IdColumn ids, const uint64_t[:] epoch, uint64_t epoch_key,
                 const uint8_t[:] lifecycle, int64_t lifecycle_mask, const float[:] confidence,
                 const uint8_t[:] source_class, bint decay, double now, const double[:] half_lives,
                 const uint64_t[:] obj, int mode):
    """select_pair, effective_confidence and pick in one call (Recency, Confidence, Consensus):
    (candidates, weights, winner index or -1, confidence, conflict score)."""
    cand = _select(key, base_keys, base_starts, base_rows, base_flags, tail_keys, tail_starts,
                   tail_rows, tail_flags, scan_lo, scan_hi, key_column, subject, predicate,
                   subject_key, predicate_key, timestamp, as_of, target, ids, epoch, epoch_key,
                   lifecycle, lifecycle_mask)
    cdef Py_ssize_t m = len(cand), index = -1
    cdef double share = 0.0, conflict = 0.0
    weights = np.empty(m + 1, dtype=np.float64)
    cdef const int64_t[::1] rows = cand
    cdef double[::1] weight = weights
    if m:
        with nogil:
            _effective(&rows[0], m, confidence, timestamp, source_class, decay, now, half_lives,
                       &weight[0])
            _pick(&rows[0], m, &weight[0], obj, timestamp, ids, mode, &index, &share, &conflict)
    return cand, weights[:m], index, share, conflict


# ------------------------------------------------------- one store, many calls

cdef class PairQuery:
    """`resolve_pair` for one store, with its views of the columns kept between calls.

    A call of `resolve_pair` takes some twenty array arguments, and taking a
    typed view of each one costs more than the lens work on a pair of a few
    claims. A PairQuery keeps the views and re-takes one only when the engine
    (or the query index) has replaced that array: `arrays` is a snapshot's
    column mapping, `levels` the pair index's (base, tail) Levels; the same
    mapping object as the last call means the same arrays (the engine's
    snapshots share one until it replaces them), so nothing is re-checked.
    Same arguments otherwise, same results (tests/test_pair_kernels.py).
    """

    def __init__(self, half_lives):
        self._held = {}
        self._arrays = None
        self._half_lives = np.ascontiguousarray(half_lives, dtype=np.float64)
        self._levels = None

    cdef bint _stale(self, object arrays, str name):
        array = arrays[name]
        if self._held.get(name) is array:
            return False
        self._held[name] = array
        return True

    cdef int _refresh(self, object arrays, levels) except -1:
        if arrays is self._arrays and levels is self._levels:
            return 0      # the same column mapping as last time (snapshots share it): same views
        self._arrays = arrays
        if self._stale(arrays, "pair"):
            self._pair = arrays["pair"]
        if self._stale(arrays, "subject"):
            self._subject = arrays["subject"]
        if self._stale(arrays, "predicate"):
            self._predicate = arrays["predicate"]
        if self._stale(arrays, "timestamp"):
            self._timestamp = arrays["timestamp"]
        if self._stale(arrays, "target"):
            self._target = arrays["target"]
        if self._stale(arrays, "epoch"):
            self._epoch = arrays["epoch"]
        if self._stale(arrays, "object"):
            self._object = arrays["object"]
        if self._stale(arrays, "id"):
            self._ids = arrays["id"]
        if self._stale(arrays, "lifecycle"):
            self._lifecycle = arrays["lifecycle"]
        if self._stale(arrays, "source_class"):
            self._source_class = arrays["source_class"]
        if self._stale(arrays, "confidence"):
            self._confidence = arrays["confidence"]
        if levels is not self._levels:
            # Levels and Level are tuples: indexed here, not through the Python `arrays`
            # property, so that no Python code runs (and no other thread) mid-refresh.
            base, tail = levels[0], levels[1]
            self._base_keys, self._base_starts = base[0], base[1]
            self._base_rows, self._base_flags = base[2], base[3]
            self._tail_keys, self._tail_starts = tail[0], tail[1]
            self._tail_rows, self._tail_flags = tail[2], tail[3]
            self._levels = levels
        return 0

    def resolve(self, object arrays, levels, Py_ssize_t scan_lo, Py_ssize_t scan_hi, uint64_t key,
                uint64_t subject_key, uint64_t predicate_key, uint64_t as_of, uint64_t epoch_key,
                int64_t lifecycle_mask, bint decay, double now, int mode):
        """As resolve_pair over these columns and levels: (candidates, weights, winner index
        or -1, confidence, conflict score)."""
        cdef Py_ssize_t winner_row
        cdef uint64_t winner_object
        return self.run(arrays, levels, scan_lo, scan_hi, key, subject_key, predicate_key, as_of,
                        epoch_key, lifecycle_mask, decay, now, mode, &winner_row, &winner_object)

    cdef tuple run(self, object arrays, levels, Py_ssize_t scan_lo, Py_ssize_t scan_hi, uint64_t key,
                   uint64_t subject_key, uint64_t predicate_key, uint64_t as_of, uint64_t epoch_key,
                   int64_t lifecycle_mask, bint decay, double now, int mode,
                   Py_ssize_t* winner_row, uint64_t* winner_object):
        # Another thread may refresh the kept views (to an older snapshot's arrays, even)
        # while _select below runs without the GIL: this call works on its own copies of
        # them, taken with no Python code in between (so under the GIL, at one instant).
        self._refresh(arrays, levels)
        cdef const float[:] confidence = self._confidence
        cdef const uint64_t[:] timestamp = self._timestamp
        cdef const uint8_t[:] source_class = self._source_class
        cdef const uint64_t[:] obj = self._object
        cdef IdColumn ids = self._ids
        cand = _select(key, self._base_keys, self._base_starts, self._base_rows, self._base_flags,
                       self._tail_keys, self._tail_starts, self._tail_rows, self._tail_flags,
                       scan_lo, scan_hi, self._pair, self._subject, self._predicate, subject_key,
                       predicate_key, timestamp, as_of, self._target, ids, self._epoch,
                       epoch_key, self._lifecycle, lifecycle_mask)
        cdef Py_ssize_t m = len(cand), index = -1
        cdef double share = 0.0, conflict = 0.0
        weights = np.empty(m + 1, dtype=np.float64)
        cdef const int64_t[::1] rows = cand
        cdef double[::1] weight = weights
        winner_row[0] = -1
        winner_object[0] = 0
        if m:
            _effective(&rows[0], m, confidence, timestamp, source_class, decay, now,
                       self._half_lives, &weight[0])
            _pick(&rows[0], m, &weight[0], obj, timestamp, ids, mode, &index, &share, &conflict)
            if index >= 0:
                winner_row[0] = rows[index]
                winner_object[0] = obj[rows[index]]
        return cand, weights[:m], index, share, conflict
