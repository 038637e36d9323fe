"""The benchmark workload of BENCHMARKS.md, deterministic from a seed.

Assertions of realistic shape (~200 canonical bytes): 20 K subjects with a
Zipf-skewed choice, 50 predicates, mixed object types, 1-3 declared signers
among 1 000 agents, 10 % with an epoch; votes on 20 % of the assertions.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

import stemedb

SUBJECTS = 20_000
PREDICATES = 50
AGENTS = 1_000
EPOCHS = 32
BASE_TIME = 1_700_000_000_000_000


@dataclass
class Workload:
    assertions: list[stemedb.Assertion]
    votes: list[stemedb.Vote]
    agents: list[stemedb.Signer]
    epochs: list[stemedb.Epoch]


def agent_signers(count: int = AGENTS) -> list[stemedb.Signer]:
    return [stemedb.Signer.from_seed(i.to_bytes(4, "little") * 8) for i in range(count)]


def generate(n: int, seed: int = 42, *, votes: bool = True, signers: int | None = None) -> Workload:
    """n assertions (and 0.2 n votes); `signers` fixes the signer count per record."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    shape = _shape()
    out = _assertions(shape, rng, nprng, 0, n, signers)
    vote_list = _votes(shape, rng, out, n // 5, 0) if votes else []
    return Workload(out, vote_list, shape.agents, shape.epochs)


def chunks(n: int, size: int, seed: int = 42, *, votes: bool = True,
           signers: int | None = None) -> Iterator[Workload]:
    """The workload of n assertions as consecutive chunks of `size`, for stores too big to hold as objects.

    Chunk k has its own generators (seeded from seed and k), so any chunk can
    be made without the ones before it; timestamps run on across chunks, and
    each chunk's votes (0.2 of its size) target assertions of that chunk.
    Not the same records as generate(n): the random streams differ.
    """
    shape = _shape()
    for index, start in enumerate(range(0, n, size)):
        count = min(size, n - start)
        rng = random.Random(f"{seed}/{index}")
        nprng = np.random.default_rng([seed, index])
        out = _assertions(shape, rng, nprng, start, count, signers)
        vote_list = _votes(shape, rng, out, count // 5, start // 5) if votes else []
        yield Workload(out, vote_list, shape.agents, shape.epochs)


@dataclass
class _Shape:
    agents: list[stemedb.Signer]
    keys: list[bytes]
    subjects: list[str]
    predicates: list[str]
    epochs: list[stemedb.Epoch]
    epoch_ids: list[bytes]
    classes: list[stemedb.SourceClass]


@functools.lru_cache(maxsize=1)
def _shape() -> _Shape:
    agents = agent_signers()
    epochs = [stemedb.Epoch(f"epoch-{i}", f"period {i}", timestamp=BASE_TIME + i,
                            supersedes=[] if i == 0 else [bytes(32)]) for i in range(EPOCHS)]
    return _Shape(agents, [a.public_key for a in agents],
                  [f"entity/{i:06d}/{'subject-name-' + str(i % 97)}" for i in range(SUBJECTS)],
                  [f"predicate_{i:02d}_{'has_property'}" for i in range(PREDICATES)],
                  epochs, [e.id for e in epochs], list(stemedb.SourceClass))


def _assertions(shape: _Shape, rng: random.Random, nprng: np.random.Generator, start: int, count: int,
                signers: int | None) -> list[stemedb.Assertion]:
    subject_ranks = np.minimum(nprng.zipf(1.3, size=count), SUBJECTS) - 1
    subjects, predicates, classes, keys = shape.subjects, shape.predicates, shape.classes, shape.keys
    out = []
    for offset in range(count):
        kind = (start + offset) % 4
        value: object
        if kind == 0:
            value = f"value text number {rng.randrange(1000)} with some words"
        elif kind == 1:
            value = rng.random() * 1000
        elif kind == 2:
            value = stemedb.Ref(f"entity/{rng.randrange(SUBJECTS):06d}")
        else:
            value = rng.random() < 0.5
        number = signers if signers is not None else rng.choice((1, 1, 1, 2, 3))
        out.append(stemedb.Assertion(
            subjects[subject_ranks[offset]], predicates[rng.randrange(PREDICATES)], value,
            confidence=rng.random(), timestamp=BASE_TIME + (start + offset) * 1000,
            source_class=classes[rng.randrange(7)], lifecycle=rng.randrange(5),
            source_hash=rng.randbytes(32),
            epoch=shape.epoch_ids[rng.randrange(EPOCHS)] if rng.random() < 0.1 else None,
            signers=rng.sample(keys, number),
        ))
    return out


def _votes(shape: _Shape, rng: random.Random, targets: list[stemedb.Assertion], count: int,
           start: int) -> list[stemedb.Vote]:
    return [stemedb.Vote(targets[rng.randrange(len(targets))].id, rng.choice((1.0, 0.5, -1.0)),
                         timestamp=BASE_TIME + start + i, signers=[rng.choice(shape.keys)])
            for i in range(count)]


def in_threads(work: Callable[[int], None], count: int) -> float:
    """Seconds for `count` threads to run work(index), started together; the first error raised."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed
