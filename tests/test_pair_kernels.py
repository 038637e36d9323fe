"""The compiled per-pair lens steps (stemedb._pair) give the numba kernels' answers, bit for bit.

A single query runs `_pair`; the whole-store passes run `_kernels` (numba),
whose loops call the same rules. Random columns are built with many ties
(timestamps, objects, signers, ID prefixes), revisions, votes and every
filter, and each step is compared on both.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemedb import RecordKind, _pair
from stemedb.lenses import _kernels
from stemedb.lenses.base import HALF_LIVES

SEEDS = range(60)


def columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    ids[rng.random(n) < 0.3, :8] = 7                     # shared 8-byte prefixes: ties on ID keys
    id_keys = np.ascontiguousarray(ids[:, :8]).view("<u8").ravel()
    target = np.zeros(n, dtype=np.uint64)
    revises = rng.random(n) < 0.15
    target[revises] = id_keys[rng.integers(0, n, size=int(revises.sum()))]
    kind = np.full(n, int(RecordKind.ASSERTION), dtype=np.uint8)
    kind[rng.random(n) < 0.2] = int(RecordKind.VOTE)
    return {
        "id": ids, "target": target, "kind": kind,
        "timestamp": rng.integers(1, 6, size=n).astype(np.uint64) * 1_000_000_000,
        "object": rng.integers(1, 5, size=n).astype(np.uint64),
        "subject": rng.integers(1, 3, size=n).astype(np.uint64),
        "predicate": rng.integers(1, 3, size=n).astype(np.uint64),
        "pair": rng.integers(1, 4, size=n).astype(np.uint64),
        "epoch": rng.integers(0, 3, size=n).astype(np.uint64),
        "lifecycle": rng.integers(0, 5, size=n).astype(np.uint8),
        "confidence": np.where(rng.random(n) < 0.1, 0.0, rng.random(n) * 1.5 - 0.2).astype(np.float32),
        "source_class": rng.integers(0, len(HALF_LIVES), size=n).astype(np.uint8),
        "signer": rng.integers(1, 5, size=n).astype(np.uint64),
    }


def level(rng: np.random.Generator, key_column: np.ndarray, rows: np.ndarray):
    """A CSR level over `rows` (keys ascending, rows ascending per key, random flags)."""
    rows = np.sort(rows)
    keys = key_column[rows]
    order = np.argsort(keys, kind="stable")
    unique, starts = np.unique(keys[order], return_index=True)
    return (unique.astype(np.uint64), np.append(starts, len(rows)).astype(np.int64),
            rows[order].astype(np.uint32), rng.integers(0, 4, size=len(unique)).astype(np.uint8))


def store(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    a = columns(rng, n)
    cut_base, cut_tail = sorted(rng.integers(0, n + 1, size=2).tolist())
    base = level(rng, a["pair"], np.arange(cut_base))
    tail = level(rng, a["pair"], np.arange(cut_base, cut_tail))
    return rng, n, a, base, tail, cut_tail


def same(left, right) -> None:
    if isinstance(left, tuple):
        assert isinstance(right, tuple) and len(left) == len(right)
        for x, y in zip(left, right):
            same(x, y)
        return
    if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
        x, y = np.asarray(left), np.asarray(right)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (x, y)
        return
    assert np.float64(left).tobytes() == np.float64(right).tobytes(), (left, right)


def filters(rng: np.random.Generator) -> tuple:
    as_of = _kernels.NO_LIMIT if rng.random() < 0.5 else np.uint64(int(rng.integers(1, 6)) * 1_000_000_000)
    epoch_key = np.uint64(0 if rng.random() < 0.6 else int(rng.integers(1, 3)))
    mask = 0x1F if rng.random() < 0.5 else int(rng.integers(0, 32))
    subject_key = np.uint64(int(rng.integers(0, 3)))
    predicate_key = np.uint64(int(rng.integers(0, 3)))
    return as_of, epoch_key, mask, subject_key, predicate_key


@pytest.mark.parametrize("seed", SEEDS)
def test_selection_is_the_same(seed):
    rng, n, a, base, tail, scan_lo = store(seed)
    for key in (1, 2, 3, 9):
        key = np.uint64(key)
        args = (key, *base, *tail, scan_lo, n, a["pair"], a["target"])
        same(_pair.key_rows(*args), _kernels.key_rows(*args))
        raw, flags = _kernels.key_rows(*args)
        for _ in range(4):
            as_of, epoch_key, mask, subject_key, predicate_key = filters(rng)
            for flag in (int(flags), 0, 1, 2, 3):
                args = (raw, len(raw), flag, a["subject"], a["predicate"], subject_key, predicate_key,
                        a["timestamp"], as_of, a["target"], a["id"], a["epoch"], epoch_key,
                        a["lifecycle"], mask)
                same(_pair.filter_candidates(*args), _kernels.filter_candidates(*args))
            args = (key, *base, *tail, scan_lo, n, a["pair"], a["subject"], a["predicate"],
                    subject_key, predicate_key, a["timestamp"], as_of, a["target"], a["id"],
                    a["epoch"], epoch_key, a["lifecycle"], mask)
            same(_pair.select_pair(*args), _kernels.select_pair(*args))


@pytest.mark.parametrize("seed", SEEDS)
def test_weights_claims_and_picks_are_the_same(seed):
    rng, n, a, base, tail, scan_lo = store(seed)
    for _ in range(6):
        cand = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False)).astype(np.int64)
        decay = bool(rng.random() < 0.7)
        now = float(rng.integers(0, 8)) * 86_400_000_000.0 * 30
        args = (cand, a["confidence"], a["timestamp"], a["source_class"], decay, now, HALF_LIVES)
        same(_pair.effective_confidence(*args), _kernels.effective_confidence(*args))
        effective = _kernels.effective_confidence(*args)
        trust_keys = np.unique(rng.integers(1, 6, size=3)).astype(np.uint64)
        trust_values = rng.random(len(trust_keys))
        multipliers = rng.random(len(HALF_LIVES)) * 2
        args = (cand, effective, a["source_class"], a["signer"], multipliers, trust_keys,
                trust_values, 0.5)
        same(_pair.authority_weights(*args), _kernels.authority_weights(*args))
        counts = rng.integers(0, 6, size=len(cand))
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        flat = rng.integers(0, n, size=int(offsets[-1])).astype(np.uint32)
        as_of = filters(rng)[0]
        args = (cand, flat, offsets, a["kind"], a["timestamp"], as_of, a["confidence"], a["signer"],
                a["id"])
        same(_pair.net_votes(*args), _kernels.net_votes(*args))
        votes = _kernels.net_votes(*args)
        for weights in (effective, votes, np.zeros(len(cand)), rng.random(len(cand)) * 70_000):
            weights = np.ascontiguousarray(weights, dtype=np.float64)
            args = (cand, weights, a["object"], a["timestamp"], a["id"])
            same(_pair.group_claims(*args), _kernels.group_claims(*args))
            group, units, counts_, latest = _kernels.group_claims(*args)
            same(_pair.entropy(units, counts_), _kernels.entropy(units, counts_))
            same(_pair.rank_claims(cand, units, latest, a["timestamp"], a["id"]),
                 _kernels.rank_claims(cand, units, latest, a["timestamp"], a["id"]))
            for mode in (_pair.RECENCY, _pair.CONFIDENCE, _pair.CONSENSUS):
                same(_pair.pick(*args, mode), _kernels.pick(*args, mode))


@pytest.mark.parametrize("seed", SEEDS)
def test_the_fused_pair_is_the_same(seed):
    rng, n, a, base, tail, scan_lo = store(seed)
    for key in (1, 2, 3):
        as_of, epoch_key, mask, subject_key, predicate_key = filters(rng)
        for mode in (_pair.RECENCY, _pair.CONFIDENCE, _pair.CONSENSUS):
            args = (np.uint64(key), *base, *tail, scan_lo, n, a["pair"], a["subject"], a["predicate"],
                    subject_key, predicate_key, a["timestamp"], as_of, a["target"], a["id"],
                    a["epoch"], epoch_key, a["lifecycle"], mask, a["confidence"], a["source_class"],
                    True, 3.0 * 86_400_000_000.0 * 365, HALF_LIVES, a["object"], mode)
            same(_pair.resolve_pair(*args), _kernels.resolve_pair(*args))


def test_the_constants_agree():
    assert (_pair.RECENCY, _pair.CONFIDENCE, _pair.CONSENSUS) == (
        _kernels.RECENCY, _kernels.CONFIDENCE, _kernels.CONSENSUS)
    assert (_pair.FLAG_REVISED, _pair.FLAG_MIXED) == (_kernels.FLAG_REVISED, _kernels.FLAG_MIXED)


_ONE_QUERY = _pair.PairQuery(HALF_LIVES)    # one instance for every seed: its views must follow


@pytest.mark.parametrize("seed", SEEDS)
def test_the_pair_query_with_kept_views_is_the_fused_pair(seed):
    # What a single query calls: resolve_pair with the views of the columns and levels kept
    # between calls. Each seed brings new arrays (and every second call a replaced one),
    # so a view kept past its array would give another store's answer.
    from stemedb.lenses._state import Level, Levels
    rng, n, a, base, tail, scan_lo = store(seed)
    levels = Levels(Level(*base, 0, scan_lo), Level(*tail, 0, scan_lo))
    for round_ in range(3):
        if round_ == 1:                      # the engine grows a column: a new array, same rows
            a = dict(a, confidence=a["confidence"].copy(), id=a["id"].copy())
        for key in (1, 2, 3):
            as_of, epoch_key, mask, subject_key, predicate_key = filters(rng)
            decay = bool(rng.random() < 0.5)
            for mode in (_pair.RECENCY, _pair.CONFIDENCE, _pair.CONSENSUS):
                expected = _pair.resolve_pair(
                    np.uint64(key), *base, *tail, scan_lo, n, a["pair"], a["subject"], a["predicate"],
                    subject_key, predicate_key, a["timestamp"], as_of, a["target"], a["id"],
                    a["epoch"], epoch_key, a["lifecycle"], mask, a["confidence"], a["source_class"],
                    decay, 3.0 * 86_400_000_000.0 * 365, HALF_LIVES, a["object"], mode)
                got = _ONE_QUERY.resolve(a, levels, scan_lo, n, key, int(subject_key),
                                         int(predicate_key), int(as_of), int(epoch_key), mask, decay,
                                         3.0 * 86_400_000_000.0 * 365, mode)
                same(got, expected)
