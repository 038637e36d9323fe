"""A single query runs no numba kernel (issue 11, item 3): its lens work is compiled ahead of time.

Every numba kernel is replaced by one that fails the test; single queries of
every lens must give the answers they gave before, while a whole-store call
(query_many) still reaches the numba kernels (so the replacement is seen).
Authority's trust ranks are a whole-store pass and stay numba: with
trust=False the lens runs on the compiled path alone.
"""

from __future__ import annotations

import pytest

import stemedb
from stemedb import Assertion, Epoch, SourceClass, Vote
from stemedb import query as q
from stemedb.lenses import Authority, Layered, Skeptic, _kernels

SIGNERS = [stemedb.Signer.from_seed(bytes([0x21 + i]) * 32) for i in range(3)]
T0 = 1_700_000_000_000_000
DAY_US = 86_400_000_000


def build(db) -> list[tuple[str, str]]:
    """Pairs with ties, disagreement, votes, an epoch and a revision."""
    epoch = Epoch("trial-2", "the second trial", timestamp=T0).sign(SIGNERS[0])
    db.put(epoch)
    pairs = []
    for k in range(12):
        subject, predicate = f"drug-{k}", "treats" if k % 2 else "causes"
        pairs.append((subject, predicate))
        made = []
        for i, signer in enumerate(SIGNERS):
            record = Assertion(subject, predicate, f"value-{(k + i) % (2 + k % 3)}",
                               confidence=0.25 + 0.25 * i, timestamp=T0 + (k % 4) * DAY_US + i,
                               source_class=list(SourceClass)[(k + i) % len(SourceClass)],
                               epoch=epoch.id if k % 3 == 0 else None).sign(signer)
            made.append(record)
        db.put_many(made)
        for i, signer in enumerate(SIGNERS):
            db.put(Vote(made[(i + k) % len(made)].id, 1.0 if i % 2 == 0 else -0.5,
                        timestamp=T0 + DAY_US * 5 + i).sign(signer))
    return pairs


LENSES = ["recency", "confidence", "consensus", "vote_consensus", "skeptic", "epoch_aware",
          "layered", Authority(trust=False), Skeptic(weighting="votes"), Layered(Authority(trust=False))]


def answers(db, pairs):
    out = []
    for lens in LENSES:
        for subject, predicate in pairs:
            for decay in (False, True):
                r = db.query(subject, predicate, lens=lens, decay=decay, now=T0 + 40 * DAY_US)
                out.append((str(lens), subject, r.winner.id if r.winner else None, r.confidence,
                            r.conflict_score, r.candidates_count))
    return out


def test_single_queries_of_every_lens_call_no_numba_kernel(tmp_path, monkeypatch):
    with stemedb.open(tmp_path / "db", durability="none") as db:
        pairs = build(db)
        expected = answers(db, pairs)
        assert any(row[3] not in (0.0, 1.0) for row in expected)     # the data has disagreement
        called = []

        def numba_kernel(name):
            def fail(*args, **kwargs):
                called.append(name)
                raise AssertionError(f"numba kernel {name} called")
            return fail

        kernels = [name for name in dir(_kernels) if getattr(_kernels, name) in _kernels._KERNELS]
        assert {"resolve_pair", "select_pair", "pick", "resolve_keys"} <= set(kernels)
        for name in kernels:
            monkeypatch.setattr(_kernels, name, numba_kernel(name))
        monkeypatch.setattr(q, "warm_up", lambda **options: None)
        assert answers(db, pairs) == expected and called == []
        with pytest.raises(AssertionError, match="numba kernel"):
            db.query_many(pairs)
        assert called
