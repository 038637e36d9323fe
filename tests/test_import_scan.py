"""The native import-line scan (_lines.scan) against the JSON parser of the Python path.

The scan may leave any line to the Python path (LINE_OTHER), but a line it
reads as an export line (LINE_RECORD) must be one orjson parses, with the
same `raw` bytes and `id`. Checked on export lines, on every kind of
deviation from them, and on random mutations of real lines.
"""

from __future__ import annotations

import base64
import json
import random

import orjson
import pytest

import stemedb
from stemedb import _lines

RECORD = stemedb.Assertion("tea", "is", "hot", timestamp=1).sign(stemedb.Signer.from_seed(b"\x03" * 32))
RAW = base64.b64encode(RECORD.encode()).decode()
GOOD = json.dumps({"raw": RAW, "kind": "assertion", "id": RECORD.id.hex(), "subject": "té",
                   "n": [1, -2.5e3, {"x": None}], "t": True, "f": False}, ensure_ascii=False)


def agrees(line: bytes) -> str:
    """'record' or 'other' as the scan reads `line`, asserting it agrees with orjson."""
    scanned = _lines.scan(line + b"\n", 0, 10, True)
    if not len(scanned["kinds"]):
        return "blank"
    if scanned["kinds"][0] == _lines.LINE_OTHER:
        return "other"
    document = orjson.loads(line)   # raises if the scan accepted what orjson refuses
    assert isinstance(document, dict)
    blob = scanned["blob"][scanned["offsets"][0]:scanned["offsets"][1]]
    assert blob == base64.b64decode(document["raw"], validate=True)
    claimed = document.get("id")
    assert bool(scanned["claimed"][0]) == (claimed is not None)
    if claimed is not None:
        assert bytes(scanned["claims"][0]).hex() == claimed.lower()
    return "record"


def test_export_lines_are_records():
    assert agrees(GOOD.encode()) == "record"
    assert agrees(b'{"raw":"' + RAW.encode() + b'"}') == "record"
    assert agrees(b' {"id": null, "raw":"' + RAW.encode() + b'"}\r') == "record"
    assert agrees(b'{"raw":"' + RAW.encode() + b'","id":"' + RECORD.id.hex().upper().encode() + b'"}') == "record"


@pytest.mark.parametrize("line", [
    b'{"raw":"' + RAW.encode() + b'","raw":"' + RAW.encode() + b'"}',      # given twice
    b'{"r\\u0061w":"' + RAW.encode() + b'"}',                               # a name with escapes
    b'{"raw":"' + RAW[:10].encode() + b'*' + RAW[11:].encode() + b'"}',      # not base64
    b'{"raw":"abc"}',                                                        # not a multiple of 4
    b'{"raw":"' + RAW.encode() + b'","id":"abc"}',                           # id not 64 hex
    b'{"raw":"' + RAW.encode() + b'","id":5}',
    b'{"raw":5}',
    b'{"raw":"' + RAW.encode() + b'","x":1e400}',                            # overflows a double
    b'{"raw":"' + RAW.encode() + b'","x":"\\ud800"}',                        # a lone surrogate
    b'{"raw":"' + RAW.encode() + b'","x":"\xff"}',                           # not UTF-8
    b'{"raw":"' + RAW.encode() + b'","x":"\xed\xa0\x80"}',                   # an encoded surrogate
    b'{"raw":"' + RAW.encode() + b'","x":01}',
    b'{"raw":"' + RAW.encode() + b'","x":[1,]}',
    b'{"raw":"' + RAW.encode() + b'"} x',
    b'{"raw":"' + RAW.encode() + b'","x":"\x1f"}',
    b'[{"raw":"' + RAW.encode() + b'"}]',
    b'\xef\xbb\xbf{"raw":"' + RAW.encode() + b'"}',
    b'{"raw":"' + RAW.encode() + b'"' + b',"x":' + b"[" * 70 + b"]" * 70 + b"}",   # deeper than 64
    b'{"subject":"tea","predicate":"is","object":"hot"}',
    b"   ",
])
def test_lines_outside_the_subset_are_left_to_python(line):
    assert agrees(line) in ("other", "blank")


def test_blank_lines_and_line_numbers_match_readlines():
    text = b"\n" + GOOD.encode() + b"\n \n   \n" + GOOD.encode()
    scanned = _lines.scan(text, 0, 100, True)
    assert scanned["lines"] == 5
    assert scanned["index"].tolist() == [1, 3, 4]        # "   \n" is not blank: the Python path says why
    assert scanned["kinds"].tolist() == [_lines.LINE_RECORD, _lines.LINE_OTHER, _lines.LINE_RECORD]
    partial = _lines.scan(text, 0, 100, False)
    assert partial["lines"] == 4 and partial["consumed"] == len(text) - len(GOOD.encode())
    later = _lines.scan(text, partial["consumed"], 100, True)
    assert later["index"].tolist() == [0] and later["starts"].tolist() == [partial["consumed"]]


def test_random_mutations_never_disagree_with_orjson():
    rng = random.Random(7)
    alphabet = b'{}[]":,\\ \t\nu0aA9+/=-.eE\x00\x1f\x7f\x80\xc3\xa9\xff' + bytes(range(32, 127))
    base = GOOD.encode()
    outcomes = {"record": 0, "other": 0, "blank": 0}
    for _ in range(4000):
        line = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line))
            action = rng.random()
            if action < 0.4:
                line[at] = rng.choice(alphabet)
            elif action < 0.7:
                del line[at]
            else:
                line.insert(at, rng.choice(alphabet))
        line = bytes(line).replace(b"\n", b" ")
        outcomes[agrees(line)] += 1
    assert outcomes["record"] > 100 and outcomes["other"] > 100, outcomes
