"""Type stubs for stemedb._pair (ext/stemedb/_pair.pyx): the lens work of one pair, compiled."""

from collections.abc import Mapping
from typing import Any

import numpy as np

RECENCY: int
CONFIDENCE: int
CONSENSUS: int
FLAG_REVISED: int
FLAG_MIXED: int

def key_rows(key: Any, base_keys: np.ndarray, base_starts: np.ndarray, base_rows: np.ndarray,
             base_flags: np.ndarray, tail_keys: np.ndarray, tail_starts: np.ndarray,
             tail_rows: np.ndarray, tail_flags: np.ndarray, scan_lo: int, scan_hi: int,
             key_column: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int]: ...
def filter_candidates(raw: np.ndarray, count: int, flags: int, subject: np.ndarray,
                      predicate: np.ndarray, subject_key: Any, predicate_key: Any,
                      timestamp: np.ndarray, as_of: Any, target: np.ndarray, ids: np.ndarray,
                      epoch: np.ndarray, epoch_key: Any, lifecycle: np.ndarray,
                      lifecycle_mask: int) -> np.ndarray: ...
def select_pair(key: Any, *arrays_and_filters: Any) -> np.ndarray: ...
def effective_confidence(cand: np.ndarray, confidence: np.ndarray, timestamp: np.ndarray,
                         source_class: np.ndarray, decay: bool, now: float,
                         half_lives: np.ndarray) -> np.ndarray: ...
def authority_weights(cand: np.ndarray, effective: np.ndarray, source_class: np.ndarray,
                      signer: np.ndarray, multipliers: np.ndarray, trust_keys: np.ndarray,
                      trust_values: np.ndarray, default_trust: float) -> np.ndarray: ...
def net_votes(cand: np.ndarray, flat: np.ndarray, offsets: np.ndarray, kind: np.ndarray,
              timestamp: np.ndarray, as_of: Any, weight: np.ndarray, signer: np.ndarray,
              ids: np.ndarray) -> np.ndarray: ...
def group_claims(cand: np.ndarray, weights: np.ndarray, obj: np.ndarray, timestamp: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
def entropy(units: np.ndarray, counts: np.ndarray) -> float: ...
def rank_claims(cand: np.ndarray, units: np.ndarray, latest: np.ndarray, timestamp: np.ndarray,
                ids: np.ndarray) -> np.ndarray: ...
def pick(cand: np.ndarray, weights: np.ndarray, obj: np.ndarray, timestamp: np.ndarray,
         ids: np.ndarray, mode: int) -> tuple[int, float, float]: ...
def resolve_pair(key: Any, *arrays_and_filters: Any) -> tuple[np.ndarray, np.ndarray, int, float, float]: ...

class PairQuery:
    def __init__(self, half_lives: np.ndarray) -> None: ...
    def resolve(self, arrays: Mapping[str, np.ndarray], levels: Any, scan_lo: int, scan_hi: int,
                key: Any, subject_key: Any, predicate_key: Any, as_of: int, epoch_key: int,
                lifecycle_mask: int, decay: bool, now: float, mode: int
                ) -> tuple[np.ndarray, np.ndarray, int, float, float]: ...
