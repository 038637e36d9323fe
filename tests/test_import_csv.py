"""`stemedb import` of CSV rows: assertions' fields, signed with --key, checked like JSON Lines.

Covers: an exported CSV imports back (every object type, optional fields)
as records with the same fields, and again as already present; a bad row is
listed with its line (a quoted multi-line cell counts its lines) and nothing
is stored without --skip-bad; a header with an unknown or missing column,
and CSV without --key, are refused before anything is stored.
"""

from __future__ import annotations

from cli_helpers import (
    ALICE,
    assert_one_line_error,
    clean_environment,  # noqa: F401 - autouse fixture
    run,
)

import stemedb

T0 = 1_764_547_200_000_000   # 2025-12-01T00:00:00Z
FIELDS = ("subject", "predicate", "object", "confidence", "timestamp", "source_class", "lifecycle",
          "source_hash", "parent_hash", "epoch", "visual_hash", "vector")


def fields_of(record) -> tuple:
    return tuple(getattr(record, name) for name in FIELDS)


def key_file(tmp_path, capsys):
    key = tmp_path / "k.key"
    assert run(capsys, "keygen", str(key))[0] == 0
    return key


def test_an_exported_csv_imports_back_with_the_same_fields(tmp_path, capsys):
    records = [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.5,
                          timestamp=T0, source_class="clinical", lifecycle="approved",
                          source_hash=b"\x05" * 32),
        stemedb.Assertion("aspirin", "dose_mg", 500.25, timestamp=T0 + 1, vector=[0.25, -1.5]),
        stemedb.Assertion("aspirin", "safe", False, timestamp=T0 + 2, visual_hash=b"\x07" * 8),
        stemedb.Assertion("line\nbreak, \"quoted\"", "treats", "fever", timestamp=T0 + 3,
                          parent_hash=b"\x09" * 32, epoch=b"\x0a" * 32),
        stemedb.Assertion("ibuprofen", "blob", b"\x00\x01\xff", timestamp=T0 + 4),
    ]
    source = tmp_path / "source"
    with stemedb.open(str(source)) as db:
        members, envelope = ALICE.sign_batch(records)
        db.put_many(members, envelope=envelope)
    table = tmp_path / "rows.csv"
    assert run(capsys, "export", "--data", str(source), "--format", "csv", "--out", str(table))[0] == 0
    key = key_file(tmp_path, capsys)
    target = tmp_path / "target"
    code, out, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key), "--json")
    assert code == 0, err
    assert '"new": 5' in out and '"rejected": 0' in out
    with stemedb.open(str(source)) as db:
        expected = sorted(fields_of(r) for r in db.scan(kind="assertion"))
    with stemedb.open(str(target)) as db:
        imported = list(db.scan(kind="assertion"))
        assert sorted(fields_of(r) for r in imported) == expected
        assert db.verify().ok
    code, out, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key), "--json")
    assert code == 0, err
    assert '"new": 0' in out and '"already_present": 5' in out


def test_bad_rows_are_listed_with_their_lines_and_nothing_is_stored(tmp_path, capsys):
    table = tmp_path / "rows.csv"
    table.write_text("subject,predicate,object,object_type,confidence\n"
                     "tea,is,hot,,0.9\n"
                     "\"two\nlines\",is,x,ref,\n"
                     "milk,weighs,heavy,number,\n"
                     "a,b,c,colour,\n"
                     "a,b,c,text,high\n"
                     "short,row\n")
    key = key_file(tmp_path, capsys)
    target = tmp_path / "target"
    code, _, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key))
    assert code == 1
    assert "line 5: object: 'heavy' is not a finite number" in err
    assert "line 6: object_type: 'colour' is not one of" in err
    assert "line 7: confidence: 'high' is not a number" in err
    assert "line 8: 2 cells, but the header names 5 columns" in err
    assert "4 of 6 lines are bad" in err
    if target.exists():
        with stemedb.open(str(target)) as db:
            assert not list(db.scan())
    code, out, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key),
                         "--skip-bad", "--json")
    assert code == 0, err
    assert '"new": 2' in out and '"rejected": 4' in out
    with stemedb.open(str(target)) as db:
        assert {r.subject for r in db.scan(kind="assertion")} == {"tea", "two\nlines"}


def test_a_bad_header_or_no_key_is_refused_before_anything(tmp_path, capsys):
    key = key_file(tmp_path, capsys)
    target = tmp_path / "target"
    table = tmp_path / "rows.csv"
    table.write_text("subject,predicate,obj\ntea,is,hot\n")
    code, _, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key))
    assert code == 1
    assert_one_line_error(err, "unknown column(s) 'obj'")
    table.write_text("subject,object\ntea,hot\n")
    code, _, err = run(capsys, "import", str(table), "--data", str(target), "--key", str(key))
    assert_one_line_error(err, "lacks column(s) predicate")
    table.write_text("subject,predicate,object\ntea,is,hot\n")
    code, _, err = run(capsys, "import", str(table), "--data", str(target))
    assert code == 2
    assert_one_line_error(err, "give --key KEYFILE")
    # --format csv reads a file of any name (and standard input) as CSV
    other = tmp_path / "rows.txt"
    other.write_text("subject,predicate,object\ntea,is,hot\n")
    code, out, err = run(capsys, "import", str(other), "--format", "csv", "--data", str(target),
                         "--key", str(key), "--json")
    assert code == 0, err
    assert '"new": 1' in out
