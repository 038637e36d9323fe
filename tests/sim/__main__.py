"""Replay seeds from the command line: PYTHONPATH=src:tests python -m sim SEED [SEED ...]."""

from __future__ import annotations

import sys
import tempfile

from .run import run_seed


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: PYTHONPATH=src:tests python -m sim SEED [SEED ...]")
        return 2
    with tempfile.TemporaryDirectory(prefix="stemedb-sim-") as base:
        for text in argv:
            report = run_seed(int(text), base)
            print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
