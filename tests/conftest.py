import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]  # test_footprint.py runs a small pytest session of its own

# Stores opened by tests use 4 MiB segments unless a test asks for another size:
# every segment is preallocated, and the 64 MiB default made one run of the suite
# leave about 20 GB in the temporary directory. Servers started by tests inherit it.
os.environ.setdefault("STEMEDB_SEGMENT_SIZE", str(4 << 20))

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# What one run of the suite may leave in its temporary directory (pytest keeps the
# last run's): about 5 MiB per test that opens a store (one 4 MiB segment and its
# index), so a run of ~1,300 tests leaves about 2.1 GB. The bound is 3 GiB: room for
# the suite to grow, and still a tenth of what one run left before stores were small.
# STEMEDB_TEST_TMP_LIMIT (bytes) overrides.
TMP_LIMIT = int(os.environ.get("STEMEDB_TEST_TMP_LIMIT", str(3 << 30)))


def disk_usage(root: str) -> int:
    """Bytes of disk the files under `root` occupy (allocated blocks: segments are preallocated)."""
    total = 0
    for directory, _subdirectories, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # removed while we walked (a server thread still closing)
    return total


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the query kernels before the first test (on a fresh install numba has nothing
    cached yet, and compiling takes 10-20 s): no test pays for it inside its own timing, and
    the warm-up's notice on stderr lands here, not in a test that checks its stderr."""
    from stemedb import query

    query.warm_up()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if its temporary directory holds more than TMP_LIMIT bytes."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)  # None: no test asked for a tmp_path
    if basetemp is None or not os.path.isdir(basetemp):
        return
    used = disk_usage(str(basetemp))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"temporary footprint of this run: {used / 2**20:.0f} MiB in {basetemp} "
               f"(limit {TMP_LIMIT / 2**20:.0f} MiB, STEMEDB_TEST_TMP_LIMIT)")
    if reporter is not None:
        reporter.write_line("")  # after the progress line, which has no newline yet
        reporter.write_line(message)
    if used > TMP_LIMIT:
        if reporter is not None:
            reporter.write_line("FAILED: the run's temporary files exceed the limit; open stores with "
                                "small segments (tests/conftest.py) and clean up what tests create",
                                red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
