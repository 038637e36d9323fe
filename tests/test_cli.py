"""The `stemedb` command on a data directory: every command, and every user mistake as one line."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import (
    ALICE,
    BOB,
    assert_one_line_error,
    clean_environment,  # noqa: F401 - autouse fixture
    jsonl,
    process_environment,
    run,
    run_process,
)

import stemedb
from stemedb.cli import core, main
from stemedb.cli.formats import float32_text, format_time, parse_time

T0 = parse_time("2026-12-01T10:00:00Z", "test")


def key_file(tmp_path, signer=ALICE):
    path = tmp_path / "alice.key"
    path.write_text(json.dumps({"type": "ed25519", "seed": signer.seed.hex(),
                                "public_key": signer.public_key.hex()}))
    return path


def member_id(signer, **fields):
    """The ID of an assertion stored as a member of `signer`'s envelope (the envelope is not in it)."""
    subject, predicate, value = fields.pop("subject"), fields.pop("predicate"), fields.pop("object")
    return stemedb.Assertion(subject, predicate, value, signers=[signer.public_key], **fields).id


@pytest.fixture
def store(tmp_path):
    """A data directory with three assertions about aspirin (two disagree) and one about water."""
    data = tmp_path / "data"
    records = [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.9,
                          timestamp=T0, source_class="clinical").sign(ALICE),
        stemedb.Assertion("aspirin", "treats", "fever", confidence=0.9, timestamp=T0 + 1_000_000).sign(BOB),
        stemedb.Assertion("aspirin", "max_mg", 4000, timestamp=T0 + 2_000_000).sign(ALICE),
        stemedb.Assertion("water", "boils_at", 100.5, confidence=0.3, timestamp=T0 + 3_000_000).sign(BOB),
    ]
    with stemedb.open(data) as db:
        db.put_many(records)
    return data, records


# ------------------------------------------------------------------ demo and keygen

def test_demo(capsys):
    code, out, err = run(capsys, "demo")
    assert code == 0 and err == ""
    assert "aspirin — treats — ref:headache" in out and "signature  verified" in out
    assert "source     clinical, confidence 0.9, lifecycle approved" in out
    assert "1000 records under one signature" in out


def test_keygen_is_owner_only_and_refuses_to_overwrite(tmp_path, capsys):
    key = tmp_path / "a.key"
    code, out, _ = run(capsys, "keygen", str(key))
    assert code == 0 and len(out.strip()) == 64
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert json.loads(key.read_text())["public_key"] == out.strip()
    code, _, err = run(capsys, "keygen", str(key))
    assert code == 1
    assert_one_line_error(err, f"stemedb keygen: error: {key} exists; pass --force")


def test_keygen_into_a_missing_directory_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "keygen", str(tmp_path / "nodir" / "a.key"))
    assert code == 1 and out == ""
    assert_one_line_error(err, f"the directory {tmp_path / 'nodir'} does not exist")


# ------------------------------------------------------------------ put

def test_put_prints_the_ids_it_stored_in_line_order(tmp_path, capsys, monkeypatch):
    key, data = key_file(tmp_path), tmp_path / "data"
    signed = stemedb.Assertion("pre", "signed", 1, timestamp=T0).sign(BOB)
    lines = [
        {"subject": "aspirin", "predicate": "treats", "object": {"ref": "headache"},
         "confidence": 0.9, "source_class": "clinical", "timestamp": T0},
        {"encoded": signed.encode().hex()},
        {"subject": "water", "predicate": "boils_at", "object": 100, "timestamp": "2026-12-01T10:00:01Z"},
    ]
    code, out, err = run(capsys, "put", "--data", str(data), "--key", str(key),
                         stdin=jsonl(*lines), monkeypatch=monkeypatch)
    assert code == 0 and err == ""
    expected = [
        member_id(ALICE, subject="aspirin", predicate="treats", object=stemedb.Ref("headache"),
                  confidence=0.9, source_class="clinical", timestamp=T0),
        signed.id,
        member_id(ALICE, subject="water", predicate="boils_at", object=100, timestamp=T0 + 1_000_000),
    ]
    assert out.splitlines() == [i.hex() for i in expected]
    with stemedb.open(data) as db:
        assert [db.get(i).subject for i in expected] == ["aspirin", "pre", "water"]


def test_put_json_counts_new_and_already_present(tmp_path, capsys, monkeypatch):
    key, data = key_file(tmp_path), tmp_path / "data"
    lines = jsonl(*({"subject": f"s{i}", "predicate": "p", "object": i, "timestamp": T0} for i in range(3)))
    code, out, _ = run(capsys, "put", "--data", str(data), "--key", str(key), "--json",
                       stdin=lines, monkeypatch=monkeypatch)
    first = json.loads(out)
    assert code == 0 and (first["new"], first["already_present"], first["refused"]) == (3, 0, 0)
    more = lines + jsonl({"subject": "s3", "predicate": "p", "object": 3, "timestamp": T0})
    code, out, _ = run(capsys, "put", "--data", str(data), "--key", str(key), "--json",
                       stdin=more, monkeypatch=monkeypatch)
    second = json.loads(out)
    assert code == 0 and (second["new"], second["already_present"], second["refused"]) == (1, 3, 0)
    assert second["ids"][:3] == first["ids"] and len(second["ids"]) == 4


def test_put_reports_the_bad_line_and_writes_nothing_of_its_batch(tmp_path, capsys, monkeypatch):
    key, data = key_file(tmp_path), tmp_path / "data"
    lines = jsonl({"subject": "ok", "predicate": "p", "object": 1},
                  {"subject": "bad", "predicate": "p", "object": 1, "confidence": 7},
                  {"subject": "later", "predicate": "p", "object": 1})
    code, out, err = run(capsys, "put", "--data", str(data), "--key", str(key), "--batch", "2",
                         stdin=lines, monkeypatch=monkeypatch)
    assert code == 1
    assert_one_line_error(err, "stemedb put: error: lines 1-2 not written: line 2: confidence: 7 "
                          "is outside [0, 1]")
    with stemedb.open(data) as db:
        stored = list(db.scan(kind="assertion"))
    assert [r.subject for r in stored] == ["later"]
    assert out.splitlines() == [stored[0].id.hex()]


def test_put_without_key_refuses_unsigned_records(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "put", "--data", str(tmp_path / "d"),
                       stdin=jsonl({"subject": "s", "predicate": "p", "object": 1}),
                       monkeypatch=monkeypatch)
    assert code == 1
    assert_one_line_error(err, "line 1: unsigned record and no --key given")


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not JSON"),
    ('{"subject": "s", "predicate": "p"}', "missing field(s) object"),
    ('{"subject": "s", "predicate": "p", "object": 1, "colour": "red"}', "unknown field(s) colour"),
    ('{"subject": "s", "predicate": "p", "object": {"bytes": "zz"}}', "bytes must be hex"),
    ('{"subject": "s", "predicate": "p", "object": 1, "timestamp": "yesterday"}',
     "line 1: timestamp: 'yesterday' is not a time"),
])
def test_put_line_errors(tmp_path, capsys, monkeypatch, line, message):
    code, _, err = run(capsys, "put", "--data", str(tmp_path / "d"), "--key", str(key_file(tmp_path)),
                       stdin=line, monkeypatch=monkeypatch)
    assert code == 1
    assert_one_line_error(err, message)


def test_put_reads_a_file_and_names_a_line_that_is_not_utf8(tmp_path, capsys):
    key, data, claims = key_file(tmp_path), tmp_path / "data", tmp_path / "claims.jsonl"
    claims.write_bytes(b'{"subject": "caf\xc3\xa9", "predicate": "p", "object": 1, "timestamp": 0}\n'
                       b'{"subject": "caf\xe9", "predicate": "p", "object": 1}\n')
    code, out, err = run(capsys, "put", str(claims), "--data", str(data), "--key", str(key), "--batch", "1")
    assert code == 1
    assert out.splitlines() == [member_id(ALICE, subject="café", predicate="p", object=1,
                                          timestamp=0).hex()]
    assert_one_line_error(err, "lines 2-2 not written: line 2: not UTF-8 text (invalid continuation byte)")
    code, _, err = run(capsys, "put", str(tmp_path / "none.jsonl"), "--data", str(data))
    assert code == 1
    assert_one_line_error(err, f"stemedb put: error: {tmp_path / 'none.jsonl'}: No such file or directory")


def test_put_with_a_missing_key_file_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "put", "--data", str(tmp_path / "d"), "--key", str(tmp_path / "none.key"),
                       stdin="", monkeypatch=monkeypatch)
    assert code == 1
    assert_one_line_error(err, f"--key: {tmp_path / 'none.key'}: no such key file")
    assert not (tmp_path / "d").exists()


def test_ctrl_c_during_put_says_how_many_were_stored(tmp_path):
    key, data = key_file(tmp_path), tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "stemedb", "put", "--data", str(data), "--key", str(key), "--batch", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=process_environment())
    assert process.stdin is not None and process.stdout is not None
    ids = []
    for i in range(3):  # each line is a batch: its ID is printed once it is durable
        process.stdin.write(json.dumps({"subject": f"s{i}", "predicate": "p", "object": i}) + "\n")
        process.stdin.flush()
        ids.append(process.stdout.readline().strip())
    process.send_signal(signal.SIGINT)  # while put waits for the next line
    # stdin stays open until put has ended: closing it could end the read first (EOF)
    process.wait(120)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and out == ""
    assert err == "stemedb put: interrupted: stored 3 so far\n"
    with stemedb.open(data) as db:
        assert sorted(r.id.hex() for r in db.scan(kind="assertion")) == sorted(ids)


def test_a_ctrl_c_during_a_write_waits_for_its_answer():
    answered = []
    with pytest.raises(KeyboardInterrupt):
        with core.writes_finish_first():
            os.kill(os.getpid(), signal.SIGINT)
            answered.append("the write went on")  # not interrupted in the middle
    assert answered == ["the write went on"]
    with pytest.raises(KeyboardInterrupt):
        with core.writes_finish_first():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C interrupts at once
            answered.append("not reached")
    assert answered == ["the write went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ read commands

def test_get_prints_the_record_with_float32_and_iso_time(store, capsys):
    data, records = store
    code, out, err = run(capsys, "get", records[0].id.hex(), "--data", str(data))
    assert code == 0 and err == ""
    assert out.splitlines() == [
        '2026-12-01T10:00:00Z  aspirin — treats — ref:headache  (0.9, clinical, proposed)',
        f"  source_hash {'00' * 32}",
        f"  signer      {ALICE.public_key.hex()}",
        f"  id          {records[0].id.hex()}",
    ]
    code, out, _ = run(capsys, "get", records[3].id.hex()[:8], "--data", str(data), "--json")
    document = json.loads(out)
    assert code == 0 and document["id"] == records[3].id.hex()
    assert document["confidence"] == 0.3 and document["object"] == 100.5
    assert document["timestamp"] == "2026-12-01T10:00:03Z"


def test_id_prefixes_unique_ambiguous_and_wrong(tmp_path, capsys):
    data = tmp_path / "data"
    seen: dict[str, bytes] = {}
    records = []
    for i in range(100_000):  # until two IDs share their first 4 hex digits
        record = stemedb.Assertion("s", "p", i, timestamp=T0).sign(ALICE)
        records.append(record)
        prefix = record.id.hex()[:4]
        if prefix in seen:
            break
        seen[prefix] = record.id
    with stemedb.open(data) as db:
        db.put_many(records)
    shared = records[-1].id.hex()[:4]
    code, _, err = run(capsys, "get", shared, "--data", str(data))
    assert code == 1
    assert_one_line_error(err, f"stemedb get: error: ID: the prefix {shared} matches 2 records; "
                          "give more of its digits")
    unique = records[-1].id.hex()[:12]
    code, out, _ = run(capsys, "get", unique.upper(), "--data", str(data), "--json")
    assert code == 0 and json.loads(out)["id"] == records[-1].id.hex()
    absent = next(f"{n:04x}" for n in range(65536) if f"{n:04x}" not in seen)
    for text, message in [(absent, f"no record with an ID starting {absent}"),
                          ("ab", "'ab' is too short; give at least 4 hex digits"),
                          ("xyz1", "'xyz1' is not hex"),
                          ("a" * 65, "is longer than an ID")]:
        code, _, err = run(capsys, "get", text, "--data", str(data))
        assert code == 1
        assert_one_line_error(err, message)


def test_scan_filters_limit_and_json_lines(store, capsys):
    data, records = store
    code, out, err = run(capsys, "scan", "--data", str(data), "--subject", "aspirin")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{records[0].id.hex()[:16]}  2026-12-01T10:00:00Z  aspirin — treats — ref:headache  "
        "(0.9, clinical, proposed)",
        f"{records[1].id.hex()[:16]}  2026-12-01T10:00:01Z  aspirin — treats — \"fever\"  "
        "(0.9, observational, proposed)",
        f"{records[2].id.hex()[:16]}  2026-12-01T10:00:02Z  aspirin — max_mg — 4000  "
        "(1, observational, proposed)",
    ]
    code, out, err = run(capsys, "list", "--data", str(data), "-p", "treats", "--limit", "1", "--json")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [records[0].id.hex()]
    assert err == "stemedb list: showing the first 1; more match (raise --limit, or pass --all)\n"
    code, out, err = run(capsys, "scan", "--data", str(data), "--all", "--kind", "assertion")
    assert code == 0 and err == "" and len(out.splitlines()) == 4
    code, out, err = run(capsys, "scan", "--data", str(data), "-s", "aspirin", "-p", "max_mg", "-n", "1")
    assert code == 0 and err == "" and len(out.splitlines()) == 1


def test_query_and_conflicts(store, capsys):
    data, records = store
    code, out, _ = run(capsys, "query", "aspirin", "treats", "--data", str(data), "--lens", "skeptic",
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["analysis"]["status"] == "Contested"
    assert result["winner"]["timestamp"] == "2026-12-01T10:00:01Z"
    code, out, _ = run(capsys, "query", "aspirin", "treats", "--data", str(data),
                       "--as-of", "2026-12-01T10:00:00.5Z", "--json")
    assert json.loads(out)["winner"]["id"] == records[0].id.hex()
    assert json.loads(out)["filters"]["as_of"] == "2026-12-01T10:00:00.500000Z"
    code, out, _ = run(capsys, "query", "aspirin", "treats", "--data", str(data), "--as-of", str(T0))
    assert code == 0 and out.splitlines()[1].startswith("  winner      ref:headache")
    code, out, _ = run(capsys, "query", "aspirin", "--data", str(data))
    assert code == 0 and "aspirin / treats" in out and "aspirin / max_mg" in out
    code, out, _ = run(capsys, "conflicts", "--data", str(data), "--top", "5")
    assert code == 0 and out.splitlines() == [" score  claims   cands  subject / predicate",
                                              " 1.000       2       2  aspirin / treats"]
    code, out, _ = run(capsys, "conflicts", "--data", str(data), "--json")
    assert json.loads(out) == [{"subject": "aspirin", "predicate": "treats", "conflict_score": 1.0,
                                "candidates_count": 2, "claims_count": 2}]


@pytest.mark.parametrize("argv, message", [
    (["query", "aspirin", "treats", "--lens", "nope"], "stemedb query: error: lens: 'nope', expected one of"),
    (["query", "aspirin", "treats", "--lifecycle", "zz"], "lifecycle: 'zz', expected one of"),
    (["query", "aspirin", "treats", "--as-of", "soon"], "--as-of: 'soon' is not a time"),
    (["query", "aspirin", "treats", "--epoch", "beef"], "--epoch: no record with an ID starting beef"),
    (["conflicts", "--lifecycle", "zz"], "stemedb conflicts: error: lifecycle: 'zz', expected one of"),
])
def test_query_and_conflicts_mistakes_are_one_line(store, capsys, argv, message):
    data, _ = store
    code, out, err = run(capsys, *argv, "--data", str(data))
    assert code == 1 and out == ""
    assert_one_line_error(err, message)


def test_stats_and_verify(store, capsys):
    data, _ = store
    code, out, _ = run(capsys, "stats", "--data", str(data), "--json")
    assert code == 0 and json.loads(out)["by_kind"]["assertion"] == 4
    code, out, _ = run(capsys, "stats", "--data", str(data))
    assert code == 0 and out.splitlines()[1] == "records     4  assertion 4  vote 0  epoch 0  envelope 0"
    code, out, err = run(capsys, "verify", "--data", str(data))
    assert code == 0 and err == "" and out.startswith("OK: 4 records checked in ")
    code, out, _ = run(capsys, "verify", "--data", str(data), "--json")
    report = json.loads(out)
    assert (report["ok"], report["records_checked"], report["problems"]) == (True, 4, [])


def test_verify_finds_a_flipped_byte(tmp_path, capsys):
    data = tmp_path / "data"
    records = [stemedb.Assertion("s", "p", i, timestamp=i).sign(ALICE) for i in range(20)]
    with stemedb.open(data, segment_size=1 << 16) as db:
        db.put_many(records)
    segment = data / "segments" / "00000000.seg"
    raw = bytearray(segment.read_bytes())
    raw[64 + 48 + 300] ^= 0x40
    segment.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "verify", "--data", str(data))
    assert code == 1 and "00000000.seg at offset" in out and "DAMAGED" in out


# ------------------------------------------------------------------ no store is created by a read

READ_COMMANDS = [["get", "abcd"], ["scan"], ["list"], ["query", "s", "p"], ["conflicts"], ["stats"],
                 ["verify"]]


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=lambda argv: argv[0])
def test_read_commands_never_create_a_store(tmp_path, capsys, argv):
    typo = tmp_path / "typo-dir"
    code, out, err = run(capsys, *argv, "--data", str(typo))
    assert code == 1 and out == ""
    assert_one_line_error(err, f"stemedb {argv[0]}: error: no StemeDB store at {typo} (no such directory)")
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, *argv, "--data", str(empty))
    assert code == 1 and out == ""
    assert_one_line_error(err, f"no StemeDB store at {empty} (an empty directory)")
    assert os.listdir(empty) == []


def test_verify_of_a_missing_path_fails_as_a_process(tmp_path):
    result = run_process("verify", str(tmp_path / "typo2"))
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result.stderr, f"no StemeDB store at {tmp_path / 'typo2'}")
    assert not (tmp_path / "typo2").exists()


def test_the_deprecated_positional_directory(store, capsys):
    data, _ = store
    code, out, err = run(capsys, "stats", str(data), "--json")
    assert code == 0 and json.loads(out)["records"] == 4
    assert err == (f"stemedb stats: warning: a data directory as an argument is deprecated; "
                   f"use --data {data}\n")
    code, _, err = run(capsys, "verify", str(data), "--data", str(data))
    assert code == 2
    assert_one_line_error(err, "give the store once, with --data or --url")


def test_a_store_open_in_another_process_is_named(store, capsys):
    data, _ = store
    with stemedb.open(data):  # the LOCK is held (here, by this process: no server to suggest)
        code, out, err = run(capsys, "stats", "--data", str(data))
    assert code == 1 and out == ""
    assert_one_line_error(err, f"stemedb stats: error: {data} is open in another process (its LOCK "
                          "is held); if that is a server, reach it with --url (default "
                          "stemedb://127.0.0.1:7440), or stop it first")


# ------------------------------------------------------------------ where: options, environment, default

def test_the_default_data_directory_is_under_home(capsys):
    default = os.path.join(os.environ["HOME"], ".stemedb", "data")  # HOME: the test's own
    code, _, err = run(capsys, "stats")
    assert code == 1
    assert_one_line_error(err, f"no StemeDB store at {default} (no such directory)")
    assert not os.path.exists(default)


def test_an_option_beats_the_environment(store, tmp_path, capsys, monkeypatch):
    data, _ = store
    monkeypatch.setenv("STEMEDB_DATA", str(data))
    code, out, _ = run(capsys, "stats", "--json")
    assert code == 0 and json.loads(out)["path"] == str(data)
    code, _, err = run(capsys, "stats", "--data", str(tmp_path / "other"))
    assert code == 1 and str(tmp_path / "other") in err
    monkeypatch.setenv("STEMEDB_URL", "stemedb://127.0.0.1:1")
    code, _, err = run(capsys, "stats", "--data", str(data), "--json")
    assert code == 0, err
    code, _, err = run(capsys, "stats")
    assert code == 2
    assert_one_line_error(err, "both STEMEDB_DATA and STEMEDB_URL are set")


@pytest.mark.parametrize("argv, message", [
    (["stats", "--data", "x", "--url", "stemedb://127.0.0.1:1"], "--data and --url exclude each other"),
    (["--data", "x", "stats", "--url", "stemedb://127.0.0.1:1"], "--data and --url exclude each other"),
    (["stats", "--data", "x", "--token", "t"], "--token applies to a server"),
    (["stats", "--url", "http://example.com"], "--url: 'http://example.com': expected stemedb://"),
    (["--url", "stemedb://127.0.0.1:1", "serve"], "serve works on a data directory"),
    (["serve", "--url", "stemedb://127.0.0.1:1"], "unrecognized arguments: --url"),
    (["query", "DIR", "aspirin", "treats"], "query takes SUBJECT [PREDICATE]; a data directory goes in --data"),
    (["scan", "--limit", "0"], "argument -n/--limit: 0 must be at least 1"),
    (["scan", "--kind", "cat"], "argument -k/--kind: invalid choice: 'cat'"),
    (["get"], "the following arguments are required: id"),
    (["stats", "--colour"], "unrecognized arguments: --colour"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_mistakes_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, message)


def test_help_and_version_still_print(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(capsys, "--version")
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"stemedb {stemedb.__version__}\n"


# ------------------------------------------------------------------ closed pipes

class ClosedPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_quietly(store, capsys, monkeypatch):
    data, _ = store
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["scan", "--data", str(data)])
    assert code == core.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_scan_into_head_ends_quietly(tmp_path):
    data = tmp_path / "data"
    with stemedb.open(data) as db:  # far more output than a pipe holds
        db.put_many([stemedb.Assertion("sensor", "reading", i, timestamp=T0 + i).sign(ALICE)
                     for i in range(3000)])
    process = subprocess.Popen([sys.executable, "-m", "stemedb", "scan", "--all", "--data", str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=process_environment())
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # what `| head -1` does
    err = process.stderr.read()
    process.wait(120)
    assert "sensor — reading — 0" in first
    assert err == "" and process.returncode == core.EXIT_BROKEN_PIPE


# ------------------------------------------------------------------ times and floats

@pytest.mark.parametrize("text, microseconds", [
    ("2026-12-01T10:00:00Z", T0),
    ("2026-12-01T10:00:00", T0),
    ("2026-12-01 10:00:00z", T0),
    ("2026-12-01T10:00Z", T0),
    ("2026-12-01T12:00:00+02:00", T0),
    ("2026-12-01T05:30:00-0430", T0),
    ("2026-12-01T10:00:00.5Z", T0 + 500_000),
    ("2026-12-01T10:00:00,000001Z", T0 + 1),
    ("2026-12-01T10:00:00.123456000Z", T0 + 123_456),
    ("2026-12-01", T0 - 10 * 3600 * 1_000_000),
    ("1970-01-01T00:00:00Z", 0),
    ("1796817600000000", 1_796_817_600_000_000),
    ("0", 0),
])
def test_times_in(text, microseconds):
    assert parse_time(text, "t") == microseconds


@pytest.mark.parametrize("text, message", [
    ("2026-13-01T00:00:00Z", "month must be in 1..12"),
    ("2026-12-01T10:00:00.1234567Z", "finer than a microsecond"),
    ("1969-12-31T23:59:59Z", "before 1970-01-01"),
    ("18446744073709551616", "beyond the largest timestamp"),
    ("next tuesday", "not a time"),
    ("-5", "not a time"),
])
def test_times_in_refused(text, message):
    with pytest.raises(core.CliError, match=message):
        parse_time(text, "t")


def test_times_out():
    assert format_time(T0) == "2026-12-01T10:00:00Z"
    assert format_time(T0 + 1) == "2026-12-01T10:00:00.000001Z"
    assert format_time(T0 + 250_000) == "2026-12-01T10:00:00.250000Z"
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(2**64 - 1) == str(2**64 - 1)  # beyond year 9999
    for value in (0, 1, T0, T0 + 999_999, 253_402_300_799_999_999):
        assert parse_time(format_time(value), "t") == value


def test_float32_values_print_as_written():
    assert float(np.float32(0.9)) == 0.8999999761581421  # what used to be printed
    examples = {0.9: "0.9", 0.1: "0.1", 0.3: "0.3", 1 / 3: "0.33333334", 1.0: "1", 0.0: "0",
                0.75: "0.75", 1e-7: "0.0000001"}
    for value, text in examples.items():
        assert float32_text(float(np.float32(value))) == text
    rng = np.random.default_rng(11)
    for value in rng.random(2000, dtype=np.float32):
        text = float32_text(float(value))
        assert np.float32(float(text)) == value, (value, text)  # reads back as the same float32
