"""The reconciliation kernel against range lists built from docs/protocol.md alone.

tests/vectors/generate_reconcile.py writes tests/vectors/reconcile.json with
plain Python and the `blake3` package (no stemedb); the compiled kernel must
produce the same bytes from the same items.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from stemedb import _reconcile

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "reconcile.json").read_text())


def columns(items: list[dict]) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]:
    n = len(items)
    timestamps = np.array([item["ms"] * 1000 + 999 for item in items], dtype=np.uint64).reshape(n)
    ids = np.array([list(bytes.fromhex(item["id"])) for item in items], dtype=np.uint8).reshape(n, 32)
    tree = _reconcile.RangeTree()
    tree.add(np.arange(n, dtype=np.uint32), timestamps, ids)
    return tree, timestamps, ids


@pytest.mark.parametrize("vector", VECTORS["fingerprints"], ids=lambda v: v["name"])
def test_fingerprints(vector):
    items = [{"ms": 5, "id": record_id} for record_id in vector["ids"]]
    tree, timestamps, ids = columns(items)
    salt = bytes.fromhex(vector["salt"])
    assert tree.fingerprint((0, b""), None, timestamps, ids, salt).hex() == vector["fingerprint16"]


@pytest.mark.parametrize("vector", VECTORS["cases"], ids=lambda v: v["name"])
def test_initiating_range_lists(vector):
    tree, timestamps, ids = columns(vector["items"])
    reply, send, done = _reconcile.reconcile(
        tree, timestamps, ids, b"", bytes.fromhex(vector["salt"]), {}, can_send=True,
        can_receive=True, branching=vector["branching"], list_threshold=vector["list_threshold"],
        initiate=True)
    assert reply.hex() == vector["initiate"]
    assert len(send) == 0 and not done


@pytest.mark.parametrize("vector", VECTORS["replies"], ids=lambda v: v["name"])
def test_replies(vector):
    tree, timestamps, ids = columns(vector["items"])
    reply, send, done = _reconcile.reconcile(
        tree, timestamps, ids, bytes.fromhex(vector["message"]), bytes.fromhex(vector["salt"]), {},
        can_send=True, can_receive=True, branching=vector["branching"],
        list_threshold=vector["list_threshold"])
    assert reply.hex() == vector["reply"]
    assert sorted(bytes(ids[row]).hex() for row in send) == sorted(vector["sends"])
    assert done == (reply == b"\x00\x00")
