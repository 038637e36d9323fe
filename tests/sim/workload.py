"""The simulated clients' records: honest, signed, deterministic from the seed.

Owns: `Workload`, which makes write batches the way clients do (envelope
batches of assertions, individually signed assertions, votes on earlier
assertions, epochs), with timestamps from the simulated clock, and remembers
every ID it ever generated (anything else found in a store was not written
by an honest client). Must never: read the wall clock or os.urandom (signing
is Ed25519, deterministic; every key comes from a fixed seed).
"""

from __future__ import annotations

import random

import numpy as np
import trio

from stemedb import _codec
from stemedb.records import Assertion, Epoch, Signer, Vote
from stemedb.replication.framing import RecordBatch

BASE_US = 1_700_000_000_000_000
SIGNERS = [Signer.from_seed(bytes([0x61 + i]) * 32) for i in range(3)]


class Workload:
    def __init__(self, rng: random.Random, subjects: int = 40) -> None:
        self.rng = rng
        self.subjects = [f"subject-{i}" for i in range(subjects)]
        self.generated: set[bytes] = set()
        self.assertions: list[bytes] = []
        self.counter = 0

    def timestamp(self) -> int:
        self.counter += 1
        return BASE_US + int(trio.current_time() * 1_000_000) + self.counter

    def batch(self) -> RecordBatch:
        rng = self.rng
        signer = rng.choice(SIGNERS)
        roll = rng.random()
        if roll < 0.65:
            members = [self._assertion() for _ in range(rng.randint(1, 4))]
            signed, envelope = signer.sign_batch(members, timestamp=self.timestamp())
            records = [envelope, *signed]
        elif roll < 0.85 or not self.assertions:
            records = [self._assertion().sign(signer)]
        elif roll < 0.97:
            records = [Vote(rng.choice(self.assertions), rng.choice([1.0, 0.5, -1.0]),
                            timestamp=self.timestamp()).sign(signer)]
        else:
            records = [Epoch(f"epoch-{self.counter}", timestamp=self.timestamp()).sign(signer)]
        blob, offsets, ids = _codec.encode_many(records)
        for index, record in enumerate(records):
            record_id = bytes(ids[index])
            self.generated.add(record_id)
            if isinstance(record, Assertion):
                self.assertions.append(record_id)
        return RecordBatch(blob, np.asarray(offsets, dtype=np.int64), ids)

    def _assertion(self) -> Assertion:
        rng = self.rng
        return Assertion(rng.choice(self.subjects), rng.choice(["treats", "causes", "dose"]),
                         rng.randint(0, 1000), confidence=rng.choice([0.5, 0.9, 1.0]),
                         timestamp=self.timestamp())
