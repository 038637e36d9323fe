"""The session-finish check of tests/conftest.py: a run whose temporary files exceed the limit fails."""

from __future__ import annotations

import pathlib

import pytest

CONFTEST = (pathlib.Path(__file__).parent / "conftest.py").read_text()

ONE_STORE = """
import stemedb

def test_opens_a_store(tmp_path):
    with stemedb.open(tmp_path / "db") as db:
        assert len(db) == 0
"""


@pytest.mark.parametrize("limit, fails", [(1 << 20, True), (1 << 30, False)])
def test_a_run_over_the_temporary_limit_fails(pytester, monkeypatch, limit, fails):
    """One store preallocates a 4 MiB segment: over a 1 MiB limit the run fails, under 1 GiB it passes."""
    monkeypatch.setenv("STEMEDB_TEST_TMP_LIMIT", str(limit))
    monkeypatch.setenv("STEMEDB_SEGMENT_SIZE", str(4 << 20))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_store=ONE_STORE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)  # the test itself passes either way
    result.stdout.fnmatch_lines([f"temporary footprint of this run: * MiB in * (limit {limit >> 20} MiB*"])
    if fails:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["FAILED: the run's temporary files exceed the limit*"])
    else:
        assert result.ret == pytest.ExitCode.OK


def test_disk_usage_counts_allocated_blocks(tmp_path):
    from conftest import disk_usage

    (tmp_path / "a").mkdir()
    with open(tmp_path / "a" / "dense", "wb") as f:
        f.write(b"x" * (1 << 20))
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(64 << 20)  # a hole: no blocks (which is why stores preallocate)
    used = disk_usage(str(tmp_path))
    assert (1 << 20) <= used < (2 << 20)
