"""The constants of the lens rules, shared by the compiled single-pair path and the numba kernels.

Owns: the lens modes (RECENCY, CONFIDENCE, CONSENSUS), the fixed-point
scales, the "no limit" timestamp and the query index's key flags. A module
of its own so that the lenses and a single query can use them without
importing numba (lenses/_bulk.py imports the kernels on first use). Must
never: import numba, or anything of ours but records.
"""

from __future__ import annotations

import numpy as np

from stemedb.records import RecordKind

# Lens modes understood by `resolve` and `resolve_all` (and stemedb._pair).
RECENCY = 0        # latest timestamp, then lowest ID
CONFIDENCE = 1     # highest weight, then latest, then lowest ID
CONSENSUS = 2      # heaviest claim (group of equal objects), then the claim holding the latest assertion

WEIGHT_SCALE = 2.0 ** 32      # weight units per 1.0 of weight
WEIGHT_CAP = 65536.0          # one candidate's weight is capped here (votes can be large)
ENTROPY_SCALE = 2.0 ** 40     # entropy units per nat
DAY_US = 86_400_000_000.0
NO_LIMIT = np.uint64(0xFFFFFFFFFFFFFFFF)
FLAG_REVISED = 1              # index key flag: some record of the key has a parent (revisions)
FLAG_MIXED = 2                # index key flag: its records differ in subject / predicate key
KIND_VOTE = np.uint8(RecordKind.VOTE)   # the kind column of a Vote
