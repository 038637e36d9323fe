"""pytest configuration for the micro-benchmarks (`pytest bench/ --benchmark-only`).

The end-to-end scripts in this directory are plain programs; only `test_micro.py` is
collected. After the run, every benchmark group that holds one of ours and a peer prints
the ratio of their median rates, so a regression shows as a ratio that moved, not only as
an absolute time that depends on the machine.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # workload.py

collect_ignore_glob = ["bench_*.py"]

PEER_PREFIX = "test_peer_"


def _benchmarks(config: pytest.Config) -> list[Any]:
    session = getattr(config, "_benchmarksession", None)
    return list(getattr(session, "benchmarks", []) or [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    by_group: dict[str, dict[str, float]] = {}
    for bench in _benchmarks(config):
        stats = getattr(bench, "stats", None)
        if stats is None or not getattr(stats, "rounds", 0):
            continue
        by_group.setdefault(bench.group or "", {})[bench.name] = stats.median
    rows = []
    for group, medians in sorted(by_group.items()):
        peers = {name: t for name, t in medians.items() if name.startswith(PEER_PREFIX)}
        ours = {name: t for name, t in medians.items() if not name.startswith(PEER_PREFIX)}
        for our_name, our_time in sorted(ours.items()):
            for peer_name, peer_time in sorted(peers.items()):
                rows.append((group, our_name, peer_name, peer_time / our_time))
    if not rows:
        return
    write = terminalreporter.write_line
    write("")
    write("ours vs peer (ratio of median rates, > 1: ours is faster)")
    for group, ours_name, peer_name, ratio in rows:
        write(f"  {group:<18} {ours_name:<34} vs {peer_name[len(PEER_PREFIX):]:<28} {ratio:6.2f}x")
