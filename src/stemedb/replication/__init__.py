"""Replication: range-based set reconciliation between stores, push, and the cluster.

The native kernel (`stemedb._reconcile`) keeps the fingerprint trees and does
the byte-level work of each step; this package holds the sessions, their
transport, and (later) cluster membership and placement.
"""

from stemedb.replication.reconcile import (
    GLOBAL_PARTITION,
    WHOLE_STORE,
    Reconciler,
    decode_message,
    encode_message,
    partition_scope,
)

__all__ = ["GLOBAL_PARTITION", "WHOLE_STORE", "Reconciler", "decode_message", "encode_message",
           "partition_scope"]
