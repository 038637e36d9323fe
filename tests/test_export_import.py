"""`stemedb export` and `stemedb import`: every record kind out and back byte for byte.

Covers: a round trip of assertions (batch-signed, individually signed,
co-signed, every object type and optional field), votes, epochs and
envelopes with equal IDs and bytes and a store that verifies; filters,
with the envelopes that filtered members need; CSV; every bad line listed
with its number and nothing stored; --skip-bad and the reject file;
re-import reporting 0 new; lines signed with --key (and refused without);
progress lines; Ctrl-C; and --url against a real server process.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_helpers import (
    ALICE,
    BOB,
    Server,
    assert_one_line_error,
    clean_environment,  # noqa: F401 - autouse fixture
    jsonl,
    process_environment,
    run,
)

import stemedb
from stemedb.cli import dataio

DAY = 86_400_000_000
T0 = 1_764_547_200_000_000   # 2025-12-01T00:00:00Z


def every_kind() -> list[tuple[list, object]]:
    """Writes (records, envelope) covering every record kind, proof and field."""
    batch = [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.9,
                          timestamp=T0, source_class="clinical", lifecycle="approved",
                          source_hash=b"\x05" * 32),
        stemedb.Assertion("aspirin", "dose_mg", 500, timestamp=T0 + DAY, vector=[0.25, -1.5, 3.0]),
        stemedb.Assertion("aspirin", "safe", True, timestamp=T0 + 2 * DAY, visual_hash=b"\x07" * 8),
        stemedb.Assertion("ibuprofen", "treats", "fever", timestamp=T0 + 3 * DAY,
                          parent_hash=b"\x09" * 32),
        stemedb.Assertion("ibuprofen", "blob", b"\x00\x01\xff", timestamp=T0 + 4 * DAY),
    ]
    members, envelope = ALICE.sign_batch(batch, timestamp=T0 + 5 * DAY)
    single = stemedb.Assertion("aspirin", "treats", "pain", timestamp=T0 + 6 * DAY).sign(BOB)
    cosigned = stemedb.Assertion("tea", "is", "hot", timestamp=T0 + 7 * DAY,
                                 signers=[ALICE.public_key, BOB.public_key]).sign(ALICE).sign(BOB)
    epoch = stemedb.Epoch("v2", "the second guideline", timestamp=T0 + 8 * DAY).sign(ALICE)
    later = stemedb.Epoch("v3", supersedes=[epoch], supersession_kind="refines",
                          timestamp=T0 + 9 * DAY).sign(ALICE)
    vote = stemedb.Vote(members[0].id, 0.75, timestamp=T0 + 10 * DAY).sign(BOB)
    return [(members, envelope), ([single, cosigned, epoch, later, vote], None)]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source"
    with stemedb.open(str(path)) as db:
        for records, envelope in every_kind():
            db.put_many(records, envelope=envelope)
    return path


def stored_bytes(path) -> dict[bytes, bytes]:
    """Every record of a store: ID → its exact stored bytes."""
    with stemedb.open(str(path)) as db:
        return {record.id: db.get_encoded(record.id) for record in db.scan()}


def export_lines(capsys, *argv) -> list[dict]:
    code, out, err = run(capsys, "export", *argv)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ------------------------------------------------------------------ round trip

def test_every_kind_round_trips_byte_for_byte(source, tmp_path, capsys):
    dump = tmp_path / "all.jsonl"
    code, out, err = run(capsys, "export", "--data", str(source), "--out", str(dump))
    assert (code, out) == (0, "")
    assert "exported 11 records" in err
    assert not (tmp_path / "all.jsonl.partial").exists()
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["envelope"] + ["assertion"] * 7 + ["epoch"] * 2 + ["vote"]

    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 0, err
    assert out == "stored 11 records: 11 new, 0 already present; 0 lines rejected\n"
    original, copy = stored_bytes(source), stored_bytes(tmp_path / "copy")
    assert copy == original and len(copy) == 11
    for line in lines:  # the line's raw is the stored bytes; its readable id is the record's
        assert base64.b64decode(line["raw"]) == original[bytes.fromhex(line["id"])]
    with stemedb.open(str(tmp_path / "copy")) as db:
        report = db.verify()
        assert report.ok, report.problems
        envelope = next(db.scan(kind="envelope"))
        members = [db.get(member) for member in envelope.members]
        stemedb.verify_batch(envelope, members)


def test_the_readable_fields_say_what_the_record_does(source, capsys):
    lines = export_lines(capsys, "--data", str(source), "--kind", "assertion", "--subject", "aspirin")
    dose = next(line for line in lines if line.get("predicate") == "dose_mg")
    assert dose["object"] == 500 and dose["vector"] == [0.25, -1.5, 3.0]
    assert dose["timestamp"] == "2025-12-02T00:00:00Z"
    assert dose["signers"] == [ALICE.public_key.hex()] and dose["envelope"] == lines[0]["id"]


def test_reimport_is_idempotent_and_reports_nothing_new(source, tmp_path, capsys):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    target = str(tmp_path / "copy")
    assert run(capsys, "import", str(dump), "--data", target, "--json")[1] == \
        '{"lines": 11, "records": 11, "new": 11, "already_present": 0, "rejected": 0}\n'
    code, out, err = run(capsys, "import", str(dump), "--data", target, "--json")
    assert code == 0, err
    assert json.loads(out) == {"lines": 11, "records": 11, "new": 0, "already_present": 11,
                               "rejected": 0}
    assert stored_bytes(target) == stored_bytes(source)
    with stemedb.open(target) as db:
        assert len(db) == 11


def test_a_file_with_a_record_twice_counts_it_once(source, tmp_path, capsys):
    lines = export_lines(capsys, "--data", str(source))
    dump = tmp_path / "twice.jsonl"
    dump.write_text(jsonl(*lines, lines[3]))
    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"), "--json")
    assert code == 0, err
    assert json.loads(out)["new"] == 11 and json.loads(out)["already_present"] == 1


# ------------------------------------------------------------------ filters

def test_a_filtered_export_carries_the_envelope_its_members_need(source, tmp_path, capsys):
    code, out, err = run(capsys, "export", "--data", str(source), "--subject", "ibuprofen")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["kind"] for line in lines] == ["envelope", "assertion", "assertion"]
    assert [line["predicate"] for line in lines[1:]] == ["treats", "blob"]
    assert "exported 2 records (1 envelopes their members need)" in err
    dump = tmp_path / "ibuprofen.jsonl"
    dump.write_text(out)
    assert run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))[0] == 0
    with stemedb.open(str(tmp_path / "copy")) as db:
        assert sorted(r.predicate for r in db.scan(kind="assertion")) == ["blob", "treats"]
        assert db.verify().ok


def label(line: dict) -> str:
    if line["kind"] == "assertion":
        return f"{line['subject']}/{line['predicate']}"
    return line["name"] if line["kind"] == "epoch" else line["kind"]


@pytest.mark.parametrize(("argv", "expected"), [
    (("--predicate", "treats"), ["envelope", "aspirin/treats", "ibuprofen/treats", "aspirin/treats"]),
    (("--subject", "aspirin", "--predicate", "safe"), ["envelope", "aspirin/safe"]),
    (("--kind", "epoch"), ["v2", "v3"]),
    (("--kind", "vote"), ["vote"]),
    (("--kind", "envelope"), ["envelope"]),
    # [since, until): the envelope (2025-12-06) is in the window, the record of 12-07 is not
    (("--since", "2025-12-03", "--until", "2025-12-07T00:00:00Z"),
     ["envelope", "aspirin/safe", "ibuprofen/treats", "ibuprofen/blob"]),
    # the envelope is outside the window, but its member needs it
    (("--until", "2025-12-02"), ["envelope", "aspirin/treats"]),
    (("--since", str(T0 + 8 * DAY)), ["v2", "v3", "vote"]),
])
def test_filters(source, capsys, argv, expected):
    assert [label(line) for line in export_lines(capsys, "--data", str(source), *argv)] == expected


def test_time_filters_are_since_inclusive_until_exclusive(source, capsys):
    lines = export_lines(capsys, "--data", str(source), "--kind", "assertion",
                         "--since", "2025-12-03", "--until", "2025-12-07")
    assert [line["timestamp"] for line in lines if line["kind"] == "assertion"] == [
        "2025-12-03T00:00:00Z", "2025-12-04T00:00:00Z", "2025-12-05T00:00:00Z"]
    # the three are members: their envelope (dated 2025-12-06, inside the window anyway) first
    assert lines[0]["kind"] == "envelope"
    lines = export_lines(capsys, "--data", str(source), "--kind", "assertion", "--since",
                         "2025-12-07", "--until", "2025-12-08")
    assert [(line["kind"], line["object"]) for line in lines] == [("assertion", "pain")]


def test_csv_holds_the_assertions_fields(source, capsys):
    code, out, err = run(capsys, "export", "--data", str(source), "--format", "csv",
                         "--subject", "aspirin")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["predicate"], r["object"], r["object_type"]) for r in rows] == [
        ("treats", "headache", "ref"), ("dose_mg", "500", "number"), ("safe", "true", "boolean"),
        ("treats", "pain", "text")]
    assert rows[0]["confidence"] == "0.9" and rows[0]["source_class"] == "clinical"
    assert rows[1]["vector"] == "[0.25,-1.5,3]" and rows[2]["visual_hash"] == "07" * 8
    assert rows[3]["signers"] == BOB.public_key.hex()
    code, _out, err = run(capsys, "export", "--data", str(source), "--format", "csv", "--kind", "vote")
    assert code == 2
    assert_one_line_error(err, "--format csv holds assertions only")


# ------------------------------------------------------------------ bad lines

def test_every_bad_line_is_listed_and_nothing_is_stored(source, tmp_path, capsys):
    lines = export_lines(capsys, "--data", str(source))
    tampered = dict(lines[2], id="00" * 32)
    member_of_nothing = lines[1]   # listed after a line that refuses its envelope
    raw = base64.b64decode(lines[7]["raw"])
    flipped = dict(lines[7], raw=base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode())
    text = "\n".join([
        json.dumps(dict(lines[0], raw=lines[0]["raw"][:-8] + "AAAAAAA=")),  # 1: envelope, bad signature
        json.dumps(member_of_nothing),                                       # 2: its envelope is bad
        json.dumps(tampered),                                                # 3: id is not the raw's
        "{not json",                                                         # 4
        "",                                                                  # blank: not a line
        "[1, 2]",                                                            # 6
        json.dumps({"raw": "@@@"}),                                          # 7
        json.dumps({"raw": base64.b64encode(b"\x01\x01junk").decode()}),     # 8
        json.dumps(flipped),                                                 # 9: signature broken
        json.dumps(lines[9]),                                                # 10: good
    ]) + "\n"
    dump = tmp_path / "bad.jsonl"
    dump.write_text(text)
    target = tmp_path / "copy"
    code, out, err = run(capsys, "import", str(dump), "--data", str(target))
    assert (code, out) == (1, "")
    reported = err.splitlines()
    assert [line.split(":")[1].strip() for line in reported[:-1]] == [
        f"line {n}" for n in (1, 2, 3, 4, 6, 7, 8, 9)]
    assert "line 2: its envelope" in reported[1] and "(line 1) is bad" in reported[1]
    assert f"line 3: id {'00' * 32} is not the ID of its raw bytes" in reported[2]
    assert "line 4: not JSON" in reported[3]
    assert "line 6: expected a JSON object" in reported[4]
    assert "line 7: raw: expected base64" in reported[5]
    assert "line 8: raw: not a record" in reported[6]
    assert "line 9:" in reported[7] and "signature" in reported[7]
    assert reported[-1] == ("stemedb import: error: 8 of 9 lines are bad (listed above); nothing "
                            "stored: fix them, or pass --skip-bad to store the rest")
    with stemedb.open(str(target)) as db:
        assert len(db) == 0


def test_skip_bad_stores_the_rest_and_writes_the_rejects(source, tmp_path, capsys):
    lines = export_lines(capsys, "--data", str(source))
    text = jsonl(*lines[:3]) + "nope\n" + jsonl(*lines[3:8]) + '{"subject": "x"}\n' + jsonl(*lines[8:])
    dump, rejects = tmp_path / "some-bad.jsonl", tmp_path / "rejects.jsonl"
    dump.write_text(text)
    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"),
                         "--skip-bad", "--rejects", str(rejects), "--key", str(tmp_path / "none"))
    assert code == 1
    assert_one_line_error(err, "--key", "no such key file")
    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"),
                         "--skip-bad", "--rejects", str(rejects), "--json")
    assert code == 0, err
    assert json.loads(out) == {"lines": 13, "records": 11, "new": 11, "already_present": 0,
                               "rejected": 2}
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(e["line"], e["input"]) for e in entries] == [(4, "nope"), (10, '{"subject": "x"}')]
    assert entries[0]["reason"].startswith("line 4: not JSON")
    assert entries[1]["reason"] == "line 10: missing field(s) object, predicate"
    assert err.splitlines() == [f"stemedb import: {e['reason']}" for e in entries]
    assert stored_bytes(tmp_path / "copy") == stored_bytes(source)


def test_a_member_without_its_envelope_is_refused(source, tmp_path, capsys):
    lines = export_lines(capsys, "--data", str(source))
    dump = tmp_path / "orphan.jsonl"
    dump.write_text(jsonl(lines[1]))
    code, _out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 1
    assert f"line 1: its envelope {lines[0]['id']} is neither earlier in the file nor stored" in err
    # once the envelope is stored, the same line imports
    dump.write_text(jsonl(lines[0]))
    assert run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))[0] == 0
    dump.write_text(jsonl(lines[1]))
    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 0, err
    assert "1 new" in out


# ------------------------------------------------------------------ readable lines and --key

def test_lines_without_raw_are_signed_with_the_key(tmp_path, capsys):
    key = tmp_path / "alice.key"
    key.write_text(json.dumps({"type": "ed25519", "seed": ALICE.seed.hex(),
                               "public_key": ALICE.public_key.hex()}))
    dump = tmp_path / "fields.jsonl"
    dump.write_text(jsonl({"subject": "tea", "predicate": "is", "object": "hot",
                           "timestamp": "2026-12-01T10:00:00Z"},
                          {"kind": "assertion", "subject": "tea", "predicate": "costs",
                           "object": 3, "timestamp": 5}))
    target = str(tmp_path / "copy")
    code, out, err = run(capsys, "import", str(dump), "--data", target)
    assert code == 1
    assert err.count("no raw record, and no --key to sign its fields: give --key KEYFILE") == 2
    assert "line 1:" in err and "line 2:" in err
    code, out, err = run(capsys, "import", str(dump), "--data", target, "--key", str(key))
    assert code == 0, err
    assert out == "stored 2 records: 2 new, 0 already present; 0 lines rejected\n"
    with stemedb.open(target) as db:
        records = list(db.scan())
        assert [type(r).__name__ for r in records] == ["Envelope", "Assertion", "Assertion"]
        assert all(r.signers == (ALICE.public_key,) for r in records)
        stemedb.verify_batch(records[0], records[1:])
        assert records[1].timestamp == 1_796_119_200_000_000
    code, out, err = run(capsys, "import", str(dump), "--data", target, "--key", str(key))
    assert (code, out) == (0, "stored 2 records: 0 new, 2 already present; 0 lines rejected\n")
    with stemedb.open(target) as db:
        assert len(db) == 3   # no second envelope for records already stored


def test_proof_fields_without_raw_are_refused(source, tmp_path, capsys):
    line = export_lines(capsys, "--data", str(source))[1]
    del line["raw"]
    dump = tmp_path / "no-raw.jsonl"
    dump.write_text(jsonl(line, {"kind": "vote", "assertion_id": "00" * 32}))
    key = tmp_path / "k.key"
    assert run(capsys, "keygen", str(key))[0] == 0
    code, _out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"), "--key", str(key))
    assert code == 1
    assert ("line 1: envelope, id, signatures, signers describe a signed record, but the line has "
            "no raw") in err
    assert "line 2: a vote needs its raw bytes" in err


# ------------------------------------------------------------------ progress and Ctrl-C

def test_progress_lines_when_stderr_is_not_a_terminal(source, tmp_path, capsys, monkeypatch):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    monkeypatch.setattr(dataio, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(dataio, "CHUNK_LINES", 4)
    code, _out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 0, err
    checked = [line for line in err.splitlines() if "checked" in line]
    stored = [line for line in err.splitlines() if " stored " in line]
    assert [line.split(",")[0] for line in checked] == [
        "stemedb import: checked 4 records", "stemedb import: checked 8 records",
        "stemedb import: checked 11 records"]
    assert checked[-1].endswith("100% of the file, 0 s to go")
    assert [line.split(",")[0] for line in stored] == [
        "stemedb import: stored 4 records", "stemedb import: stored 8 records",
        "stemedb import: stored 11 records"]


def test_progress_line_figures():
    progress = dataio.Progress("import", "stored", 1000)
    assert progress.line(250, 5000, 2.0) == "stored 5,000 records, 2,500/s, 25% of the file, 6 s to go"
    assert dataio.Progress("import", "stored", None).line(0, 10, 1.0) == "stored 10 records, 10/s"


def test_ctrl_c_says_how_many_were_stored(source, tmp_path, capsys, monkeypatch):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    monkeypatch.setattr(dataio, "CHUNK_LINES", 4)
    real_write = dataio.BatchWriter.write
    calls = []

    def write_then_interrupt(self, chunk, tally):
        real_write(self, chunk, tally)
        calls.append(len(chunk.ids))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(dataio.BatchWriter, "write", write_then_interrupt)
    code, _out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 130
    assert err == ("stemedb import: interrupted: stored 8 records so far (8 new); importing again "
                   "is safe\n")
    with stemedb.open(str(tmp_path / "copy")) as db:
        assert len(db) == 8


def test_a_file_too_large_to_hold_is_read_twice(source, tmp_path, capsys, monkeypatch):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    monkeypatch.setattr(dataio, "RETAIN_BYTES", 100)
    monkeypatch.setattr(dataio, "CHUNK_LINES", 3)
    code, out, err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 0, err
    assert stored_bytes(tmp_path / "copy") == stored_bytes(source)


# ------------------------------------------------------------------ over the network

def test_export_and_import_through_a_server(source, tmp_path, capsys):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    server = Server(tmp_path / "served")
    try:
        code, out, err = run(capsys, "import", str(dump), "--url", server.url)
        assert code == 0, err
        assert out == "stored 11 records: 11 new, 0 already present; 0 lines rejected\n"
        code, out, err = run(capsys, "import", str(dump), "--url", server.url)
        assert out == "stored 11 records: 0 new, 11 already present; 0 lines rejected\n"
        code, out, err = run(capsys, "export", "--url", server.url)
        assert code == 0, err
        assert out == dump.read_text()
        code, out, err = run(capsys, "export", "--url", server.url, "--subject", "ibuprofen")
        assert [json.loads(line)["kind"] for line in out.splitlines()] == [
            "envelope", "assertion", "assertion"]
    finally:
        server.stop()
    assert stored_bytes(tmp_path / "served") == stored_bytes(source)


def test_ctrl_c_in_a_real_process(source, tmp_path):
    """SIGINT to `stemedb import` reading a slow pipe: one line, exit 130, nothing stored."""
    process = subprocess.Popen([sys.executable, "-m", "stemedb", "import", "-",
                                "--data", str(tmp_path / "copy")],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=process_environment())
    assert process.stdin is not None
    process.stdin.write('{"raw": "')
    process.stdin.flush()
    time.sleep(1.0)  # the command is reading its input by now (any moment would do)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err == "stemedb import: interrupted: nothing stored (checked 0 lines)\n"


def test_membership_in_order_out_of_order_and_absent():
    from stemedb.cli.jsonl import _listed

    listed = np.arange(10 * 32, dtype=np.uint8).reshape(10, 32)
    assert _listed(listed[3:7], listed).tolist() == [True] * 4            # a run, in order
    shuffled = listed[[7, 2, 9]]
    assert _listed(shuffled, listed).tolist() == [True] * 3               # out of order
    stranger = np.full((1, 32), 255, dtype=np.uint8)
    assert _listed(np.concatenate([listed[8:], stranger]), listed).tolist() == [True, True, False]
    assert _listed(stranger, listed).tolist() == [False]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_progress_bar_on_a_terminal(source, tmp_path, capsys, monkeypatch):
    dump = tmp_path / "all.jsonl"
    run(capsys, "export", "--data", str(source), "--out", str(dump))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(dataio, "CHUNK_LINES", 4)
    code, out, _err = run(capsys, "import", str(dump), "--data", str(tmp_path / "copy"))
    assert code == 0
    bar = terminal.getvalue()
    assert "checked" in bar and "stored" in bar            # one bar per pass
    assert "100%" in bar and "11 records" in bar            # the file's share, and the count
    assert "/s" in bar                                      # a rate
