"""Column extraction agrees with the records it was extracted from."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from strategies import any_record

import stemedb
from stemedb import RecordKind, _codec


@given(st.lists(any_record, min_size=1, max_size=15))
def test_columns_match_record_fields(records):
    blob, offsets, _ = stemedb.encode_many(records)
    columns = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))
    for i, record in enumerate(records):
        kind = RecordKind[type(record).__name__.upper()]
        assert columns["kind"][i] == kind
        assert columns["timestamp"][i] == record.timestamp
        signer = int.from_bytes(record.signers[0][:8], "little") if record.signers else 0
        assert columns["signer"][i] == signer
        if kind == RecordKind.ASSERTION:
            assert columns["subject"][i] == _codec.subject_key(record.subject)
            assert columns["predicate"][i] == _codec.predicate_key(record.predicate)
            assert columns["pair"][i] == _codec.pair_key(record.subject, record.predicate)
            assert columns["confidence"][i] == np.float32(record.confidence)
            assert columns["source_class"][i] == int(record.source_class)
            assert columns["lifecycle"][i] == int(record.lifecycle)
            epoch = _codec.id_key(record.epoch) if record.epoch else 0
            assert columns["epoch"][i] == epoch
        else:
            assert columns["subject"][i] == 0 and columns["source_class"][i] == 255
        if kind == RecordKind.VOTE:
            assert columns["target"][i] == _codec.id_key(record.assertion_id)
            assert columns["confidence"][i] == np.float32(record.weight)


def test_equal_objects_share_an_object_key_and_different_ones_do_not():
    a = stemedb.Assertion("s", "p", "x", timestamp=1)
    b = stemedb.Assertion("t", "q", "x", timestamp=2, confidence=0.5)
    c = stemedb.Assertion("s", "p", stemedb.Ref("x"), timestamp=3)
    blob, offsets, _ = stemedb.encode_many([a, b, c])
    keys = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))["object"]
    assert keys[0] == keys[1] != keys[2]


def test_pair_key_separates_subject_and_predicate_boundaries():
    assert _codec.pair_key("ab", "c") != _codec.pair_key("a", "bc")


# Pinned values: keys are persisted in snapshots, so these must never change.
# Each is also recomputed from the `blake3` package (first 8 bytes, little-endian).
GOLDEN_KEYS = [
    ("", 0xA6A1F9F5B94913AF),
    ("abc", 0x33514638ACB33764),
    ("subject", 0x682E2AD04E72B4FA),
    ("ünïcode predicate", 0x331DF9AC85F2B75D),
    ("x" * 5000, 0x93BAB55ECD12B752),
]


def test_keys_are_pinned_blake3_prefixes():
    import blake3

    for text, expected in GOLDEN_KEYS:
        assert int.from_bytes(blake3.blake3(text.encode()).digest()[:8], "little") == expected
        assert _codec.subject_key(text) == expected
        assert _codec.predicate_key(text) == expected
    record_id = bytes(range(32))
    assert _codec.id_key(record_id) == int.from_bytes(record_id[:8], "little")
