"""numba kernels over the engine's fixed-width columns: candidate selection, weights, claims, picks.

Owns: every loop that runs per candidate or per (subject, predicate) pair —
selecting the candidates of one pair from the query-side CSR index, folding
revised assertions into their revisions, the lifecycle / epoch / as_of
filters, effective confidence with decay, grouping candidates into claims by
object key, the conflict score, the winner picks, and the whole-store passes
(conflict score of every pair, winners of every pair, trust-rank agreement
counts). Must never: decode records, take locks, or touch anything but the
arrays it is given (all kernels are `nopython`, `nogil`, `cache=True`).

Determinism: every result depends only on the *set* of candidates, never on
the order they are read in. Ties are broken by ID (lowest bytes first);
weights are rounded to multiples of 2**-32 and summed as integers, and
entropy terms are rounded to multiples of 2**-40 and summed as integers, so
float addition order cannot change a winner or a score.

Column arguments are the engine's full arrays (the first `count` rows valid);
candidates are int64 record numbers into them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numba import njit

# The rules' constants (lenses/_rules.py), module globals here so that numba folds them in.
from stemedb.lenses._rules import (
    CONFIDENCE,
    CONSENSUS,
    DAY_US,
    ENTROPY_SCALE,
    FLAG_MIXED,
    FLAG_REVISED,
    KIND_VOTE,
    NO_LIMIT,
    RECENCY,
    WEIGHT_CAP,
    WEIGHT_SCALE,
)

Function = TypeVar("Function", bound=Callable[..., Any])
_compile = njit(nogil=True, cache=True)
_KERNELS: list[Any] = []


def kernel(function: Function) -> Function:
    """nopython (njit), the GIL released while it runs, compiled code cached on disk next to
    this module (__pycache__), so a new process loads instead of compiling. Typed as the
    function it wraps, so callers keep its signature."""
    compiled = _compile(function)
    _KERNELS.append(compiled)
    return compiled  # type: ignore[return-value]


def cache_is_cold() -> bool | None:
    """True when some kernel has no compiled code in numba's disk cache (a warm-up will
    compile it), False when every one has; None when the cache cannot be inspected (its
    layout is numba's own and may change)."""
    try:
        return any(not os.path.exists(k._cache._cache_file._index_path) for k in _KERNELS)
    except AttributeError:
        return None



# ----------------------------------------------------------------- helpers

@kernel
def id_less(ids: Any, a: int, b: int) -> bool:
    """True if the ID of record a sorts before that of record b (byte-wise)."""
    for k in range(32):
        x = ids[a, k]
        y = ids[b, k]
        if x != y:
            return bool(x < y)
    return False


@kernel
def id_key(ids: Any, r: int) -> Any:
    """The engine's key of record r's ID: its first 8 bytes, little-endian."""
    value = np.uint64(0)
    for k in range(7, -1, -1):
        value = (value << np.uint64(8)) | np.uint64(ids[r, k])
    return value


@kernel
def more_recent(timestamp: Any, ids: Any, a: int, b: int) -> bool:
    """True if record a is preferred to b by recency: later timestamp, then lower ID."""
    if timestamp[a] != timestamp[b]:
        return bool(timestamp[a] > timestamp[b])
    return id_less(ids, a, b)


@kernel
def heavier(weight_a: float, weight_b: float, timestamp: Any, ids: Any, a: int, b: int) -> bool:
    """True if record a beats b by weight, then recency, then ID."""
    if weight_a != weight_b:
        return bool(weight_a > weight_b)
    return more_recent(timestamp, ids, a, b)


@kernel
def weight_units(weight: float) -> Any:
    """A weight as integer units of 2**-32 (negative and NaN weights count as 0)."""
    if not weight > 0.0:
        return np.int64(0)
    if weight > WEIGHT_CAP:
        weight = WEIGHT_CAP
    return np.int64(math.floor(weight * WEIGHT_SCALE + 0.5))


@kernel
def table_size(n: int) -> int:
    size = 8
    while size < 2 * n:
        size *= 2
    return size


@kernel
def key_set(keys: Any, count: int) -> Any:
    """An open-addressing set of the non-zero uint64 keys[:count] (0 marks an empty slot)."""
    size = table_size(count)
    mask = np.uint64(size - 1)
    slots = np.zeros(size, dtype=np.uint64)
    for i in range(count):
        key = keys[i]
        if key == 0:
            continue
        s = key & mask
        while slots[s] != 0 and slots[s] != key:
            s = (s + np.uint64(1)) & mask
        slots[s] = key
    return slots


@kernel
def in_key_set(slots: Any, key: Any) -> bool:
    if key == 0:
        return False
    mask = np.uint64(len(slots) - 1)
    s = key & mask
    while slots[s] != 0:
        if slots[s] == key:
            return True
        s = (s + np.uint64(1)) & mask
    return False


@kernel
def csr_rows(key: Any, keys: Any, starts: Any, rows: Any, flags: Any) -> Any:
    """(rows of `key`, its flags) in one CSR level (sorted unique keys), or an empty slice and 0."""
    i = np.searchsorted(keys, key)
    if i < len(keys) and keys[i] == key:
        return rows[starts[i]:starts[i + 1]], np.int64(flags[i])
    return rows[0:0], np.int64(0)


# ------------------------------------------------------------- selection

@kernel
def filter_candidates(raw: Any, count: int, flags: int, subject: Any, predicate: Any,
                      subject_key: Any, predicate_key: Any, timestamp: Any, as_of: Any,
                      target: Any, ids: Any, epoch: Any, epoch_key: Any, lifecycle: Any,
                      lifecycle_mask: int) -> np.ndarray:
    """Candidates among raw[:count] (assertion record numbers, ascending).

    Steps, in order: confirm the subject / predicate keys (0 = do not check;
    only done when FLAG_MIXED says the index key is shared by records of
    different subjects or predicates) and timestamp <= as_of; drop every
    assertion that a visible assertion of the same set revises (its parent
    key is the assertion's ID key; only when FLAG_REVISED says some record
    has a parent); keep those in `epoch_key` (0 = any epoch) whose lifecycle
    bit is set in `lifecycle_mask`.

    Candidates sit anywhere in the store, so each column read is a cache
    miss: columns are gathered in tight loops (independent loads the CPU
    overlaps), and only the columns a filter needs are read at all.
    """
    rows = np.empty(count, dtype=np.int64)
    for i in range(count):
        rows[i] = raw[i]
    m = count
    if flags & FLAG_MIXED and (subject_key != 0 or predicate_key != 0):
        m = 0
        for i in range(count):
            r = rows[i]
            if (subject_key == 0 or subject[r] == subject_key) and \
                    (predicate_key == 0 or predicate[r] == predicate_key):
                rows[m] = r
                m += 1
    if as_of != NO_LIMIT:
        times = np.empty(m, dtype=np.uint64)
        for i in range(m):
            times[i] = timestamp[rows[i]]
        n = 0
        for i in range(m):
            if times[i] <= as_of:
                rows[n] = rows[i]
                n += 1
        m = n
    if flags & FLAG_REVISED:
        parents = np.empty(m, dtype=np.uint64)
        for i in range(m):
            parents[i] = target[rows[i]]
        slots = key_set(parents, m)
        n = 0
        for i in range(m):
            if not in_key_set(slots, id_key(ids, rows[i])):
                rows[n] = rows[i]
                n += 1
        m = n
    if epoch_key != 0:
        n = 0
        for i in range(m):
            if epoch[rows[i]] == epoch_key:
                rows[n] = rows[i]
                n += 1
        m = n
    if lifecycle_mask & 0x1F != 0x1F:
        stages = np.empty(m, dtype=np.uint8)
        for i in range(m):
            stages[i] = lifecycle[rows[i]]
        n = 0
        for i in range(m):
            if (lifecycle_mask >> stages[i]) & 1:
                rows[n] = rows[i]
                n += 1
        m = n
    return rows[:m]


@kernel
def key_rows(key: Any, base_keys: Any, base_starts: Any, base_rows: Any, base_flags: Any,
             tail_keys: Any, tail_starts: Any, tail_rows: Any, tail_flags: Any, scan_lo: int,
             scan_hi: int, key_column: Any, target: Any) -> Any:
    """(record numbers of one key, ascending; their flags) from the three index levels.

    Levels: the base CSR, the tail CSR (records indexed since the base was
    built) and the unindexed newest records [scan_lo, scan_hi), scanned (a
    scanned record sets FLAG_MIXED, since nobody checked its keys, and
    FLAG_REVISED if it has a parent).
    """
    first, first_flags = csr_rows(key, base_keys, base_starts, base_rows, base_flags)
    second, second_flags = csr_rows(key, tail_keys, tail_starts, tail_rows, tail_flags)
    flags = first_flags | second_flags
    raw = np.empty(len(first) + len(second) + (scan_hi - scan_lo), dtype=np.int64)
    m = 0
    for r in first:
        raw[m] = r
        m += 1
    for r in second:
        raw[m] = r
        m += 1
    for r in range(scan_lo, scan_hi):
        if key_column[r] == key:
            raw[m] = r
            m += 1
            flags |= FLAG_MIXED
            if target[r] != 0:
                flags |= FLAG_REVISED
    return raw[:m], flags


@kernel
def select_pair(key: Any, base_keys: Any, base_starts: Any, base_rows: Any, base_flags: Any,
                tail_keys: Any, tail_starts: Any, tail_rows: Any, tail_flags: Any, scan_lo: int,
                scan_hi: int, key_column: Any, subject: Any, predicate: Any, subject_key: Any,
                predicate_key: Any, timestamp: Any, as_of: Any, target: Any, ids: Any,
                epoch: Any, epoch_key: Any, lifecycle: Any, lifecycle_mask: int) -> np.ndarray:
    """key_rows then filter_candidates, in one call."""
    raw, flags = key_rows(key, base_keys, base_starts, base_rows, base_flags, tail_keys,
                          tail_starts, tail_rows, tail_flags, scan_lo, scan_hi, key_column, target)
    return filter_candidates(raw, len(raw), flags, subject, predicate, subject_key,
                             predicate_key, timestamp, as_of, target, ids, epoch, epoch_key,
                             lifecycle, lifecycle_mask)


# ---------------------------------------------------------------- weights

@kernel
def effective_confidence(cand: Any, confidence: Any, timestamp: Any, source_class: Any,
                         decay: bool, now: float, half_lives: Any) -> np.ndarray:
    """confidence x 0.5 ** (age_days / half_life[source_class]) (no decay: the confidence)."""
    n = len(cand)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        out[i] = confidence[cand[i]]
    if decay:
        for i in range(n):
            r = cand[i]
            half_life = half_lives[source_class[r]]
            if half_life > 0.0 and half_life < np.inf:
                age = now - np.float64(timestamp[r])
                if age > 0.0:
                    out[i] *= 0.5 ** (age / DAY_US / half_life)
    return out


@kernel
def authority_weights(cand: Any, effective: Any, source_class: Any, signer: Any,
                      multipliers: Any, trust_keys: Any, trust_values: Any,
                      default_trust: float) -> np.ndarray:
    """effective confidence x source-class multiplier x trust rank of the signer."""
    out = np.empty(len(cand), dtype=np.float64)
    for i in range(len(cand)):
        r = cand[i]
        trust = default_trust
        j = np.searchsorted(trust_keys, signer[r])
        if j < len(trust_keys) and trust_keys[j] == signer[r]:
            trust = trust_values[j]
        out[i] = effective[i] * multipliers[source_class[r]] * trust
    return out


@kernel
def net_votes(cand: Any, flat: Any, offsets: Any, kind: Any, timestamp: Any, as_of: Any,
              weight: Any, signer: Any, ids: Any) -> np.ndarray:
    """Per candidate: the summed weight of the latest vote of each agent, floored at 0.

    flat[offsets[i]:offsets[i+1]] are the records whose target is candidate
    i's ID key (votes and revisions); votes after as_of are ignored.
    """
    out = np.zeros(len(cand), dtype=np.float64)
    for i in range(len(cand)):
        lo = offsets[i]
        hi = offsets[i + 1]
        if lo == hi:
            continue
        votes = np.empty(hi - lo, dtype=np.int64)
        m = 0
        for j in range(lo, hi):
            r = np.int64(flat[j])
            if kind[r] == KIND_VOTE and timestamp[r] <= as_of:
                votes[m] = r
                m += 1
        if m == 0:
            continue
        # latest vote per agent: a small open-addressing map agent -> vote
        size = table_size(m)
        mask = np.uint64(size - 1)
        agents = np.zeros(size, dtype=np.uint64)
        chosen = np.full(size, -1, dtype=np.int64)
        for j in range(m):
            r = votes[j]
            agent = signer[r]
            s = agent & mask
            while chosen[s] != -1 and agents[s] != agent:
                s = (s + np.uint64(1)) & mask
            if chosen[s] == -1 or more_recent(timestamp, ids, r, chosen[s]):
                agents[s] = agent
                chosen[s] = r
        total = np.int64(0)
        for s in range(size):
            if chosen[s] != -1:
                value = min(max(float(weight[chosen[s]]), -WEIGHT_CAP), WEIGHT_CAP)
                units = np.int64(math.floor(abs(value) * WEIGHT_SCALE + 0.5))
                total += units if value > 0 else -units
        if total > 0:
            out[i] = total / WEIGHT_SCALE
    return out


# ----------------------------------------------------------------- claims

@kernel
def group_claims(cand: Any, weights: Any, obj: Any, timestamp: Any, ids: Any) -> Any:
    """Group candidates by object key.

    Returns (group of each candidate, group weight units, group sizes, index
    in `cand` of the group's most recent assertion). Group numbering follows
    candidate order; the values per group do not.
    """
    n = len(cand)
    objects = np.empty(n, dtype=np.uint64)
    times = np.empty(n, dtype=np.uint64)
    for i in range(n):
        objects[i] = obj[cand[i]]
    for i in range(n):
        times[i] = timestamp[cand[i]]
    size = table_size(n)
    mask = np.uint64(size - 1)
    slots = np.full(size, -1, dtype=np.int64)
    keys = np.empty(n, dtype=np.uint64)
    group = np.empty(n, dtype=np.int64)
    units = np.zeros(n, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    latest = np.empty(n, dtype=np.int64)
    groups = 0
    # Separate passes: the probe loop, the sums and the latest-per-claim update each
    # stay free of hard-to-predict branches (merged, they ran ~8x slower).
    for i in range(n):
        key = objects[i]
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
            s = (s + np.uint64(1)) & mask
        group[i] = g
    for i in range(n):
        g = group[i]
        units[g] += weight_units(weights[i])
        counts[g] += 1
    for i in range(n):
        g = group[i]
        j = latest[g]
        if times[i] != times[j]:
            latest[g] = i if times[i] > times[j] else j
        elif i != j and id_less(ids, cand[i], cand[j]):  # IDs are read only on a tie
            latest[g] = i
    return group, units[:groups], counts[:groups], latest[:groups]


@kernel
def entropy(units: Any, counts: Any) -> float:
    """Normalised Shannon entropy of the claims' weight shares, in [0, 1].

    Shares are by weight; when every weight is 0, by count. Claims with a
    zero share do not count toward the normaliser ln(k).
    """
    total = np.int64(0)
    for g in range(len(units)):
        total += units[g]
    values = units if total > 0 else counts
    if total <= 0:
        total = np.int64(0)
        for g in range(len(counts)):
            total += counts[g]
    positive = 0
    accumulated = np.int64(0)
    for g in range(len(values)):
        if values[g] > 0:
            positive += 1
            p = values[g] / total
            accumulated += np.int64(math.floor(-p * math.log(p) * ENTROPY_SCALE + 0.5))
    if positive <= 1 or total <= 0:
        return 0.0
    score = accumulated / ENTROPY_SCALE / math.log(positive)
    if score < 0.0:
        return 0.0
    if score > 1.0:
        return 1.0
    return score


@kernel
def better_claim(cand: Any, units: Any, latest: Any, timestamp: Any, ids: Any, a: int,
                 b: int) -> bool:
    """True if claim a ranks above claim b: more weight, then the more recent latest assertion."""
    if units[a] != units[b]:
        return bool(units[a] > units[b])
    return more_recent(timestamp, ids, cand[latest[a]], cand[latest[b]])


@kernel
def rank_claims(cand: Any, units: Any, latest: Any, timestamp: Any, ids: Any) -> np.ndarray:
    """Claim indices, best first (a merge sort with better_claim)."""
    n = len(units)
    order = np.arange(n)
    scratch = np.empty(n, dtype=np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                if better_claim(cand, units, latest, timestamp, ids, order[j], order[i]):
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
        order, scratch = scratch, order
        width *= 2
    return order


@kernel
def pick(cand: Any, weights: Any, obj: Any, timestamp: Any, ids: Any, mode: int) -> Any:
    """(index of the winner in cand or -1, resolution confidence, conflict score)."""
    n = len(cand)
    if n == 0:
        return np.int64(-1), 0.0, 0.0
    group, units, counts, latest = group_claims(cand, weights, obj, timestamp, ids)
    conflict = entropy(units, counts)
    if mode == CONSENSUS:
        best = 0
        for g in range(1, len(units)):
            if better_claim(cand, units, latest, timestamp, ids, g, best):
                best = g
        total = np.int64(0)
        for g in range(len(units)):
            total += units[g]
        share = units[best] / total if total > 0 else 0.0
        return latest[best], share, conflict
    best_i = 0
    if mode == RECENCY:
        best_time = timestamp[cand[0]]
        for i in range(1, n):
            t = timestamp[cand[i]]
            if t > best_time or (t == best_time and id_less(ids, cand[i], cand[best_i])):
                best_i = i
                best_time = t
    else:
        for i in range(1, n):
            if heavier(weights[i], weights[best_i], timestamp, ids, cand[i], cand[best_i]):
                best_i = i
    value = weights[best_i]
    return np.int64(best_i), min(max(value, 0.0), 1.0), conflict


@kernel
def resolve_pair(key: Any, base_keys: Any, base_starts: Any, base_rows: Any, base_flags: Any,
                 tail_keys: Any, tail_starts: Any, tail_rows: Any, tail_flags: Any, scan_lo: int,
                 scan_hi: int, key_column: Any, subject: Any, predicate: Any, subject_key: Any,
                 predicate_key: Any, timestamp: Any, as_of: Any, target: Any, ids: Any,
                 epoch: Any, epoch_key: Any, lifecycle: Any, lifecycle_mask: int,
                 confidence: Any, source_class: Any, decay: bool, now: float, half_lives: Any,
                 obj: Any, mode: int) -> Any:
    """select_pair, effective_confidence and pick in one call (Recency, Confidence, Consensus).

    Returns (candidates, weights, winner index or -1, confidence, conflict score).
    """
    cand = select_pair(key, base_keys, base_starts, base_rows, base_flags, tail_keys,
                       tail_starts, tail_rows, tail_flags, scan_lo, scan_hi, key_column, subject,
                       predicate, subject_key, predicate_key, timestamp, as_of, target, ids,
                       epoch, epoch_key, lifecycle, lifecycle_mask)
    weights = effective_confidence(cand, confidence, timestamp, source_class, decay, now,
                                   half_lives)
    winner, share, conflict = pick(cand, weights, obj, timestamp, ids, mode)
    return cand, weights, winner, share, conflict


@kernel
def resolve_keys(keys: Any, subject_keys: Any, predicate_keys: Any, base_keys: Any,
                 base_starts: Any, base_rows: Any, base_flags: Any, tail_keys: Any,
                 tail_starts: Any, tail_rows: Any, tail_flags: Any, scan_lo: int, scan_hi: int,
                 key_column: Any, subject: Any, predicate: Any, timestamp: Any, as_of: Any,
                 target: Any, ids: Any, epoch: Any, epoch_key: Any, lifecycle: Any,
                 lifecycle_mask: int, confidence: Any, source_class: Any, decay: bool,
                 now: float, half_lives: Any, obj: Any, mode: int) -> Any:
    """resolve_pair for many keys: (winner record or -1, confidence, conflict, candidates) each."""
    count = len(keys)
    winners = np.full(count, -1, dtype=np.int64)
    shares = np.zeros(count, dtype=np.float64)
    scores = np.zeros(count, dtype=np.float64)
    sizes = np.zeros(count, dtype=np.int64)
    for j in range(count):
        cand = select_pair(keys[j], base_keys, base_starts, base_rows, base_flags, tail_keys,
                           tail_starts, tail_rows, tail_flags, scan_lo, scan_hi, key_column,
                           subject, predicate, subject_keys[j], predicate_keys[j], timestamp,
                           as_of, target, ids, epoch, epoch_key, lifecycle, lifecycle_mask)
        if len(cand) == 0:
            continue
        weights = effective_confidence(cand, confidence, timestamp, source_class, decay, now,
                                       half_lives)
        winner, share, conflict = pick(cand, weights, obj, timestamp, ids, mode)
        winners[j] = cand[winner]
        shares[j] = share
        scores[j] = conflict
        sizes[j] = len(cand)
    return winners, shares, scores, sizes


# ------------------------------------------------------- whole-store passes

@kernel
def conflicts_all(keys: Any, starts: Any, rows: Any, flags: Any, timestamp: Any, as_of: Any,
                  target: Any, ids: Any, lifecycle: Any, lifecycle_mask: int, confidence: Any,
                  obj: Any) -> Any:
    """Per key of a CSR level: (conflict score, candidates, claims, a record of the key).

    Weights are the confidences (the Consensus lens without decay).
    """
    count = len(keys)
    scores = np.zeros(count, dtype=np.float64)
    sizes = np.zeros(count, dtype=np.int64)
    claims = np.zeros(count, dtype=np.int64)
    sample = np.full(count, -1, dtype=np.int64)
    for p in range(count):
        segment = rows[starts[p]:starts[p + 1]]
        if len(segment) == 0:
            continue
        sample[p] = segment[0]
        if len(segment) == 1 and as_of == NO_LIMIT:
            sizes[p] = 1 if (lifecycle_mask >> lifecycle[segment[0]]) & 1 else 0
            claims[p] = sizes[p]
            continue
        cand = filter_candidates(segment, len(segment), flags[p] & FLAG_REVISED, rows, rows,
                                 np.uint64(0), np.uint64(0), timestamp, as_of, target, ids, rows,
                                 np.uint64(0), lifecycle, lifecycle_mask)
        if len(cand) == 0:
            continue
        weights = np.empty(len(cand), dtype=np.float64)
        for i in range(len(cand)):
            weights[i] = confidence[cand[i]]
        group, units, counts, latest = group_claims(cand, weights, obj, timestamp, ids)
        scores[p] = entropy(units, counts)
        sizes[p] = len(cand)
        claims[p] = len(units)
    return scores, sizes, claims, sample


@kernel
def resolve_all(keys: Any, starts: Any, rows: Any, flags: Any, timestamp: Any, target: Any,
                ids: Any, lifecycle: Any, confidence: Any, source_class: Any, signer: Any,
                obj: Any, mode: int, authority: bool, multipliers: Any, trust_keys: Any,
                trust_values: Any, default_trust: float) -> Any:
    """Per key: (winner record or -1, confidence, conflict score, candidates), default filters."""
    count = len(keys)
    winners = np.full(count, -1, dtype=np.int64)
    shares = np.zeros(count, dtype=np.float64)
    scores = np.zeros(count, dtype=np.float64)
    sizes = np.zeros(count, dtype=np.int64)
    for p in range(count):
        segment = rows[starts[p]:starts[p + 1]]
        cand = filter_candidates(segment, len(segment), flags[p] & FLAG_REVISED, rows, rows,
                                 np.uint64(0), np.uint64(0), timestamp, NO_LIMIT, target, ids,
                                 rows, np.uint64(0), lifecycle, 0xFF)
        if len(cand) == 0:
            continue
        weights = np.empty(len(cand), dtype=np.float64)
        for i in range(len(cand)):
            weights[i] = confidence[cand[i]]
        if authority:
            weights = authority_weights(cand, weights, source_class, signer, multipliers,
                                        trust_keys, trust_values, default_trust)
        winner, share, conflict = pick(cand, weights, obj, timestamp, ids, mode)
        winners[p] = cand[winner]
        shares[p] = share
        scores[p] = conflict
        sizes[p] = len(cand)
    return winners, shares, scores, sizes


@kernel
def trust_votes(keys: Any, starts: Any, rows: Any, flags: Any, timestamp: Any, target: Any,
                ids: Any, lifecycle: Any, confidence: Any, signer: Any, obj: Any) -> Any:
    """Agreement marks for the trust rank: (signer keys, +1 agree / -1 disagree).

    For each pair with claims from at least two signers: the Consensus
    winner (confidence weights, default filters) against each signer's
    latest claim in the pair.
    """
    out_signers = np.empty(len(rows), dtype=np.uint64)
    out_marks = np.empty(len(rows), dtype=np.int8)
    emitted = 0
    for p in range(len(keys)):
        segment = rows[starts[p]:starts[p + 1]]
        if len(segment) < 2:
            continue
        cand = filter_candidates(segment, len(segment), flags[p] & FLAG_REVISED, rows, rows,
                                 np.uint64(0), np.uint64(0), timestamp, NO_LIMIT, target, ids,
                                 rows, np.uint64(0), lifecycle, 0xFF)
        n = len(cand)
        if n < 2:
            continue
        size = table_size(n)
        mask = np.uint64(size - 1)
        agents = np.zeros(size, dtype=np.uint64)
        latest = np.full(size, -1, dtype=np.int64)
        distinct = 0
        for i in range(n):
            r = cand[i]
            agent = signer[r]
            s = agent & mask
            while latest[s] != -1 and agents[s] != agent:
                s = (s + np.uint64(1)) & mask
            if latest[s] == -1:
                distinct += 1
                agents[s] = agent
                latest[s] = r
            elif more_recent(timestamp, ids, r, latest[s]):
                latest[s] = r
        if distinct < 2:
            continue
        weights = np.empty(n, dtype=np.float64)
        for i in range(n):
            weights[i] = confidence[cand[i]]
        winner, share, conflict = pick(cand, weights, obj, timestamp, ids, CONSENSUS)
        for s in range(size):
            if latest[s] != -1:
                out_signers[emitted] = agents[s]
                out_marks[emitted] = 1 if obj[latest[s]] == obj[cand[winner]] else -1
                emitted += 1
    return out_signers[:emitted], out_marks[:emitted]


# ------------------------------------------------------------------ warm-up

def warm_up() -> None:
    """Compile (or load from the cache) every kernel once, on tiny inputs."""
    n = 4
    u8 = np.array([1, 1, 1, 2], dtype=np.uint8)
    u64 = np.array([5, 5, 7, 0], dtype=np.uint64)
    f32 = np.array([0.5, 0.25, 1.0, 1.0], dtype=np.float32)
    ids = np.arange(n * 32, dtype=np.uint64).astype(np.uint8).reshape(n, 32)
    rows32 = np.arange(n, dtype=np.uint32)
    lifecycle = np.array([0, 2, 2, 255], dtype=np.uint8)
    keys = np.array([5, 7], dtype=np.uint64)
    starts = np.array([0, 2, 3], dtype=np.int64)
    csr = np.array([0, 1, 2], dtype=np.uint32)
    flags = np.array([FLAG_REVISED | FLAG_MIXED, 0], dtype=np.uint8)
    level = (keys, starts, csr, flags)
    empty = (keys[:0], starts[:1], csr[:0], flags[:0])
    half_lives = np.full(7, 30.0)
    multipliers = np.ones(7)
    zero = np.uint64(0)
    cand = select_pair(np.uint64(5), *level, *empty, 3, n, u64, u64, u64, zero, zero, u64,
                       NO_LIMIT, u64, ids, u64, zero, lifecycle, 0x1F)
    raw, raw_flags = key_rows(np.uint64(5), *level, *empty, 3, n, u64, u64)
    filter_candidates(raw, len(raw), raw_flags, u64, u64, np.uint64(5), np.uint64(5), u64,
                      np.uint64(3), u64, ids, u64, np.uint64(5), lifecycle, 0x1F)
    weights = effective_confidence(cand, f32, u64, u8, True, 1e6, half_lives)
    resolve_pair(np.uint64(5), *level, *empty, 3, n, u64, u64, u64, zero, zero, u64, NO_LIMIT,
                 u64, ids, u64, zero, lifecycle, 0x1F, f32, u8, False, 0.0, half_lives, u64,
                 CONSENSUS)
    resolve_keys(keys, keys, keys, *level, *empty, 3, n, u64, u64, u64, u64, NO_LIMIT, u64, ids,
                 u64, zero, lifecycle, 0x1F, f32, u8, False, 0.0, half_lives, u64, RECENCY)
    weights = authority_weights(cand, weights, u8, u64, multipliers, keys, np.ones(2), 0.5)
    net_votes(cand, rows32, np.zeros(len(cand) + 1, dtype=np.int64), u8, u64, NO_LIMIT, f32, u64,
              ids)
    for mode in (RECENCY, CONFIDENCE, CONSENSUS):
        pick(cand, weights, u64, u64, ids, mode)
    group, units, counts, latest = group_claims(cand, weights, u64, u64, ids)
    rank_claims(cand, units, latest, u64, ids)
    conflicts_all(*level, u64, NO_LIMIT, u64, ids, lifecycle, 0x1F, f32, u64)
    resolve_all(*level, u64, u64, ids, lifecycle, f32, u8, u64, u64, CONSENSUS, True,
                multipliers, keys, np.ones(2), 0.5)
    trust_votes(*level, u64, u64, ids, lifecycle, f32, u64, u64)
