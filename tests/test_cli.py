"""The `stemedb` command: demo, keygen, put, get, stats, verify."""

from __future__ import annotations

import io
import json
import os
import stat
import sys

import pytest

import stemedb
from stemedb.cli import main


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "aspirin — treats" in out and "signature  verified" in out
    assert "1000 records under one signature" in out


def test_keygen_is_owner_only_and_refuses_to_overwrite(tmp_path, capsys):
    key = tmp_path / "a.key"
    code, out, _ = run(capsys, "keygen", str(key))
    assert code == 0 and len(out.strip()) == 64
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    code, _, err = run(capsys, "keygen", str(key))
    assert code == 1 and "--force" in err


def test_put_get_stats_verify(tmp_path, capsys, monkeypatch):
    key, data = tmp_path / "a.key", tmp_path / "data"
    run(capsys, "keygen", str(key))
    signed = stemedb.Assertion("pre", "signed", 1).sign(stemedb.Signer.from_seed(b"\x05" * 32))
    lines = "\n".join([
        json.dumps({"subject": "aspirin", "predicate": "treats", "object": {"ref": "headache"},
                    "confidence": 0.9, "source_class": "clinical"}),
        json.dumps({"subject": "water", "predicate": "boils_at", "object": 100}),
        json.dumps({"encoded": signed.encode().hex()}),
    ])
    code, out, err = run(capsys, "put", "--data", str(data), "--key", str(key), "--json",
                         stdin=lines, monkeypatch=monkeypatch)
    assert code == 0, err
    assert json.loads(out) == {"lines": 3, "stored": 3, "failed_batches": 0}
    code, out, _ = run(capsys, "get", signed.id.hex(), "--data", str(data), "--json")
    assert code == 0 and json.loads(out)["id"] == signed.id.hex()
    code, out, _ = run(capsys, "stats", str(data), "--json")
    assert json.loads(out)["by_kind"]["assertion"] == 3
    code, out, _ = run(capsys, "verify", str(data))
    assert code == 0 and out.startswith("OK: 4 records checked")


def test_put_reports_the_bad_line_and_writes_nothing_of_its_batch(tmp_path, capsys, monkeypatch):
    key, data = tmp_path / "a.key", tmp_path / "data"
    run(capsys, "keygen", str(key))
    lines = "\n".join([
        json.dumps({"subject": "ok", "predicate": "p", "object": 1}),
        json.dumps({"subject": "bad", "predicate": "p", "object": 1, "confidence": 7}),
        json.dumps({"subject": "later", "predicate": "p", "object": 1}),
    ])
    code, out, err = run(capsys, "put", "--data", str(data), "--key", str(key), "--batch", "2",
                         stdin=lines, monkeypatch=monkeypatch)
    assert code == 1
    assert "lines 1-2 not written: line 2: confidence: 7 is outside [0, 1]" in err
    with stemedb.open(data) as db:
        subjects = [r.subject for r in db.scan(kind="assertion")]
    assert subjects == ["later"]


def test_put_without_key_refuses_unsigned_records(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "put", "--data", str(tmp_path / "d"),
                       stdin=json.dumps({"subject": "s", "predicate": "p", "object": 1}),
                       monkeypatch=monkeypatch)
    assert code == 1 and "no --key" in err


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not JSON"),
    ('{"subject": "s", "predicate": "p"}', "missing field(s) object"),
    ('{"subject": "s", "predicate": "p", "object": 1, "colour": "red"}', "unknown field(s) colour"),
    ('{"subject": "s", "predicate": "p", "object": {"bytes": "zz"}}', "bytes must be hex"),
])
def test_put_line_errors(tmp_path, capsys, monkeypatch, line, message):
    key = tmp_path / "a.key"
    run(capsys, "keygen", str(key))
    code, _, err = run(capsys, "put", "--data", str(tmp_path / "d"), "--key", str(key),
                       stdin=line, monkeypatch=monkeypatch)
    assert code == 1 and message in err


def test_verify_finds_a_flipped_byte(tmp_path, capsys):
    data = tmp_path / "data"
    signer = stemedb.Signer.from_seed(b"\x06" * 32)
    records = [stemedb.Assertion("s", "p", i, timestamp=i).sign(signer) for i in range(20)]
    with stemedb.open(data, segment_size=1 << 16) as db:
        db.put_many(records)
    segment = data / "segments" / "00000000.seg"
    raw = bytearray(segment.read_bytes())
    raw[64 + 48 + 300] ^= 0x40
    segment.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "verify", str(data))
    assert code == 1 and "00000000.seg at offset" in out and "DAMAGED" in out


def test_query_and_conflicts(tmp_path, capsys):
    data = tmp_path / "data"
    a, b = stemedb.Signer.from_seed(b"\x01" * 32), stemedb.Signer.from_seed(b"\x02" * 32)
    with stemedb.open(data) as db:
        db.put_many([
            stemedb.Assertion("aspirin", "treats", "headache", confidence=0.9, timestamp=1).sign(a),
            stemedb.Assertion("aspirin", "treats", "fever", confidence=0.9, timestamp=2).sign(b),
            stemedb.Assertion("aspirin", "max_mg", 4000, timestamp=3).sign(a),
        ])
    code, out, _ = run(capsys, "query", str(data), "aspirin", "treats", "--lens", "skeptic", "--json")
    result = json.loads(out)
    assert code == 0 and result["analysis"]["status"] == "Contested"
    assert result["conflict_score"] >= 0.88
    code, out, _ = run(capsys, "query", str(data), "aspirin", "treats", "--as-of", "1", "--json")
    assert json.loads(out)["winner"]["object"] == "headache"
    code, out, _ = run(capsys, "conflicts", str(data), "--top", "5")
    assert code == 0 and "aspirin / treats" in out and "max_mg" not in out
    code, out, _ = run(capsys, "conflicts", str(data), "--json")
    assert [row["predicate"] for row in json.loads(out)] == ["treats"]
