"""`stemedb bench`: what it writes where, what it refuses, and that its report adds up."""

from __future__ import annotations

import json

from cli_helpers import (
    Server,
    assert_one_line_error,
    clean_environment,  # noqa: F401 - autouse fixture
    run,
)

import stemedb

SMALL = ("--records", "600", "--batch", "200", "--calls", "50", "--runs", "2")


def test_a_run_on_a_data_directory_stores_every_run_and_reports_medians(capsys, tmp_path):
    data = tmp_path / "bench-store"
    code, out, err = run(capsys, "bench", "--data", str(data), *SMALL, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["where"] == str(data)
    assert set(report["workloads"]) == {"write", "get", "query"}
    for name, row in report["workloads"].items():
        for side in ("ours", "sqlite"):
            assert 0 < row[side]["min"] <= row[side]["median"] <= row[side]["max"], (name, row)
        assert abs(row["ratio"] - row["ours"]["median"] / row["sqlite"]["median"]) < 1e-9
    with stemedb.open(data) as db:  # two runs of new records each, all durable and intact
        assert db.stats()["by_kind"]["assertion"] == 2 * 600
        assert db.verify().ok


def test_only_reads_still_write_one_run_to_read_from(capsys, tmp_path):
    data = tmp_path / "bench-store"
    code, out, err = run(capsys, "bench", "--data", str(data), *SMALL, "--only", "get")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["workload", "ours", "SQLite", "ratio"]
    assert [line.split()[0] for line in lines[2:]] == ["get"]
    with stemedb.open(data) as db:
        assert db.stats()["by_kind"]["assertion"] == 600


def test_a_store_with_records_is_refused_and_left_as_it_was(capsys, tmp_path):
    data = tmp_path / "used"
    with stemedb.open(data) as db:
        db.put(stemedb.Assertion("kept", "as", "is").sign(stemedb.Signer.generate()))
    code, out, err = run(capsys, "bench", "--data", str(data), *SMALL)
    assert code == 1 and out == ""
    assert_one_line_error(err, str(data), "not empty")
    with stemedb.open(data) as db:
        assert db.stats()["records"] == 1


def test_bad_options_are_usage_errors_that_name_them(capsys):
    for argv, fragment in ((("--only", "write,scan"), "--only 'write,scan'"),
                           (("--runs", "0"), "--runs 0"),
                           (("--url", "stemedb://127.0.0.1:9"), "--accept-writes"),
                           (("--token", "x"), "--token applies to a server")):
        code, out, err = run(capsys, "bench", *argv)
        assert code == 2 and out == "", argv
        assert fragment in err, (argv, err)


def test_a_run_against_a_server_stores_its_records_there(capsys, tmp_path):
    server = Server(tmp_path / "served")
    try:
        code, out, err = run(capsys, "bench", "--url", server.url, "--accept-writes", *SMALL, "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["where"] == server.url
        assert report["workloads"]["get"]["ours"]["median"] > 0
    finally:
        server.stop()
    with stemedb.open(tmp_path / "served") as db:
        assert db.stats()["by_kind"]["assertion"] == 2 * 600
