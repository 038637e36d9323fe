"""The `stemedb` command against a running server (--url, STEMEDB_URL, tokens), as a process
and in-process: the same output as on a data directory, and every mistake as one line."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

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
    run_process,
)

import stemedb
from stemedb.cli.formats import parse_time

T0 = parse_time("2026-12-01T10:00:00Z", "test")
CAROL = stemedb.Signer.from_seed(b"\x03" * 32)
EPOCH = stemedb.Epoch("2026-guidelines", "the December review", timestamp=T0).sign(ALICE)
RECORDS = [
    stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.9, timestamp=T0,
                      source_class="clinical", lifecycle="approved").sign(ALICE),
    stemedb.Assertion("aspirin", "treats", "fever", confidence=0.4, timestamp=T0 + 1,
                      source_class="anecdotal").sign(BOB),
    stemedb.Assertion("aspirin", "treats", "fever", confidence=0.7, timestamp=T0 + 2,
                      epoch=EPOCH.id).sign(CAROL),
    stemedb.Assertion("aspirin", "max_mg", 4000, confidence=0.8, timestamp=T0 + 3,
                      source_class="regulatory", vector=[0.1, 0.25]).sign(ALICE),
    stemedb.Assertion("aspirin", "max_mg", 3000, confidence=0.6, timestamp=T0 + 4).sign(BOB),
    stemedb.Assertion("water", "boils_at", 100, timestamp=T0 + 5).sign(CAROL),
    EPOCH,
]
VOTE = stemedb.Vote(RECORDS[1], 0.3, timestamp=T0 + 6).sign(CAROL)
LINES = jsonl(*({"encoded": record.encode().hex()} for record in [*RECORDS, VOTE]))
UNSIGNED = jsonl({"subject": "tea", "predicate": "is", "object": "hot", "confidence": 0.9,
                  "timestamp": "2026-12-01T10:00:07Z"})


def key_file(tmp_path):
    path = tmp_path / "alice.key"
    path.write_text(json.dumps({"type": "ed25519", "seed": ALICE.seed.hex()}))
    return path


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same records, in the same order, on a data directory and on a server.

    The data directory's records (the unsigned one signed by put, with an
    envelope of its own) are copied to the server as they are, one a batch,
    so that envelopes arrive before their members.
    """
    root = tmp_path_factory.mktemp("twins")
    local, served = root / "local", root / "served"
    for lines in (LINES, UNSIGNED):
        result = run_process("put", "--data", str(local), "--key", str(key_file(root)), stdin=lines)
        assert result.returncode == 0, result.stderr
    with stemedb.open(local) as db:
        copy = jsonl(*({"encoded": record.encode().hex()} for record in db.scan()))
    server = Server(served)
    try:
        result = run_process("put", "--url", server.url, "--batch", "1", stdin=copy)
        assert result.returncode == 0, result.stderr
        yield local, server
    finally:
        server.stop()


PARITY = [
    ["get", RECORDS[3].id.hex(), "--json"],
    ["get", RECORDS[3].id.hex()[:10]],
    ["get", EPOCH.id.hex()[:10]],
    ["get", VOTE.id.hex()],
    ["scan", "--all", "--json"],
    ["scan", "-s", "aspirin", "-p", "treats"],
    ["list", "--kind", "vote"],
    ["scan", "-n", "2"],
    ["query", "aspirin", "treats"],
    ["query", "aspirin", "treats", "--lens", "skeptic", "--json"],
    ["query", "aspirin", "treats", "--lens", "vote_consensus", "--json"],
    ["query", "aspirin", "treats", "--lens", "layered"],
    ["query", "aspirin", "treats", "--lens", "epoch_aware", "--json"],
    ["query", "aspirin", "--lens", "consensus", "--json"],
    ["query", "aspirin", "treats", "--lifecycle", "approved", "--json"],
    ["query", "aspirin", "treats", "--as-of", "2026-12-01T10:00:00.000001Z", "--json"],
    ["query", "aspirin", "treats", "--epoch", EPOCH.id.hex()[:8], "--json"],
    ["query", "aspirin", "treats", "--decay", "--now", "2027-12-01T10:00:00Z", "--json"],
    ["query", "nothing", "here"],
    ["conflicts"],
    ["conflicts", "--json", "--top", "1"],
    ["conflicts", "--json", "--as-of", "2026-12-01T10:00:00.000002Z"],
    ["conflicts", "--min-score", "0.99"],
]


@pytest.mark.parametrize("argv", PARITY, ids=" ".join)
def test_a_server_answers_what_the_data_directory_does(twins, capsys, argv):
    local, server = twins
    code, on_disk, err = run(capsys, *argv, "--data", str(local))
    assert code == 0 and err in ("", "stemedb scan: showing the first 2; more match (raise --limit, "
                                     "or pass --all)\n"), err
    code, remote, remote_err = run(capsys, *argv, "--url", server.url)
    assert code == 0 and remote_err == err
    assert remote == on_disk
    assert on_disk.strip()


def test_put_over_the_network_prints_ids_and_counts(twins, tmp_path, capsys, monkeypatch):
    _, server = twins
    fresh = jsonl({"subject": "new", "predicate": "p", "object": 1, "timestamp": T0})
    code, out, err = run(capsys, "put", "--url", server.url, "--key", str(key_file(tmp_path)),
                         "--json", stdin=LINES + fresh, monkeypatch=monkeypatch)
    summary = json.loads(out)
    assert code == 0 and err == ""
    assert (summary["new"], summary["already_present"], summary["refused"]) == (1, 8, 0)
    assert summary["ids"][:8] == [r.id.hex() for r in [*RECORDS, VOTE]]
    with stemedb.connect(server.url) as client:
        assert client.get(bytes.fromhex(summary["ids"][8])).subject == "new"


def test_stats_and_verify_over_the_network(twins, capsys):
    _, server = twins
    code, out, _ = run(capsys, "stats", "--url", server.url, "--json")
    stats = json.loads(out)
    assert code == 0 and stats["server"]["listen"] == server.address
    code, out, _ = run(capsys, "stats", "--url", server.url)
    assert code == 0 and f"server      stemedb at {server.address}, protocol 1" in out
    code, out, err = run(capsys, "verify", "--url", server.url, "--json")
    report = json.loads(out)
    assert code == 0 and err == "" and report["ok"] and report["scope"] == "segments"
    assert report["records_checked"] == stats["records"]


def test_the_environment_names_the_server(twins, capsys, monkeypatch):
    local, server = twins
    monkeypatch.setenv("STEMEDB_URL", server.url)
    code, out, _ = run(capsys, "get", RECORDS[0].id.hex()[:8], "--json")
    assert code == 0 and json.loads(out)["id"] == RECORDS[0].id.hex()
    code, out, _ = run(capsys, "stats", "--data", str(local), "--json")  # an option beats it
    assert code == 0 and "server" not in json.loads(out)


def test_a_store_held_by_a_server_names_its_address(twins, capsys):
    _, server = twins
    served = server.announcement  # the server process holds the LOCK of its data directory
    data = str(twins[0].parent / "served")
    code, out, err = run(capsys, "scan", "--data", data)
    assert code == 1 and out == ""
    assert_one_line_error(err, f"stemedb scan: error: {data} is open in process {served['pid']}, the "
                          f"StemeDB server at {server.address}: reach it with --url {server.url}")


def test_ctrl_c_during_put_over_the_network(twins, tmp_path):
    _, server = twins
    process = subprocess.Popen(
        [sys.executable, "-m", "stemedb", "put", "--url", server.url, "--key", str(key_file(tmp_path)),
         "--batch", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=process_environment())
    assert process.stdin is not None and process.stdout is not None
    ids = []
    for i in range(2):
        process.stdin.write(json.dumps({"subject": "interrupted", "predicate": "n", "object": i}) + "\n")
        process.stdin.flush()
        ids.append(process.stdout.readline().strip())
    process.send_signal(signal.SIGINT)
    # stdin stays open until put has ended: closing it could end the read first (EOF)
    process.wait(120)
    out, err = process.communicate(timeout=120)
    assert (process.returncode, out, err) == (130, "", "stemedb put: interrupted: stored 2 so far\n")
    with stemedb.connect(server.url) as client:
        assert [r.object for r in client.get_many([bytes.fromhex(i) for i in ids])] == [0.0, 1.0]


def test_mistakes_against_a_server_are_one_line(twins, capsys):
    _, server = twins
    for argv, message in [
        (["query", "aspirin", "treats", "--lens", "nope"], "lens: 'nope', expected one of"),
        (["query", "aspirin", "treats", "--agent", "me"], "--agent: a server records the name of your token"),
        (["get", "0000000000"], "no record with an ID starting 0000000000"),
        (["get", RECORDS[0].id.hex()[:2]], "is too short"),
    ]:
        code, out, err = run(capsys, *argv, "--url", server.url)
        assert code in (1, 2) and out == ""
        assert_one_line_error(err, message)


def test_an_unreachable_server_is_one_line(capsys):
    code, out, err = run(capsys, "stats", "--url", "stemedb://127.0.0.1:1")
    assert code == 1 and out == ""
    assert_one_line_error(err, "stemedb stats: error: cannot connect to stemedb://127.0.0.1:1",
                          "is a server running there?")


def test_tokens_from_the_option_and_the_environment(tmp_path, capsys, monkeypatch):
    secret = "cli-read-token-0123456789"
    config = tmp_path / "stemedb.toml"
    config.write_text(f'[[tokens]]\nname = "reader"\nrole = "read"\n'
                      f'sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n')
    server = Server(tmp_path / "data", config)
    try:
        code, out, err = run(capsys, "stats", "--url", server.url)
        assert code == 1
        assert_one_line_error(err, f"stemedb stats: error: the server at {server.url} requires a "
                              "token: give --token or set STEMEDB_TOKEN")
        code, out, err = run(capsys, "stats", "--url", server.url, "--token", "wrong-token-000000000")
        assert code == 1
        assert_one_line_error(err, "stemedb stats: error: unknown token (the token given by --token "
                              "or STEMEDB_TOKEN)")
        monkeypatch.setenv("STEMEDB_TOKEN", secret)
        code, out, err = run(capsys, "stats", "--url", server.url, "--json")
        assert code == 0 and json.loads(out)["records"] == 0
        code, out, err = run(capsys, "stats", "--url", server.url, "--token", "wrong-token-000000000")
        assert code == 1  # the option beats the environment
        result = run_process("put", "--url", server.url, "--key", str(key_file(tmp_path)),
                             stdin=UNSIGNED, STEMEDB_TOKEN=secret)
        assert result.returncode == 1 and result.stdout == ""  # a read token cannot write
        assert_one_line_error(result.stderr, "stemedb put: error: put needs the write role; 'reader' "
                              "has read (0 records stored before it)")
        code, _, err = run(capsys, "stats", "--data", str(tmp_path / "data"))
        assert code == 1
        assert_one_line_error(err, f"the StemeDB server at {server.address}")  # asked without a token
    finally:
        server.stop()
