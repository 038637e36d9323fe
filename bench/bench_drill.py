"""B10, the disaster-recovery drill (docs/operations.md, "Backup and archival"): see
stemedb.backup.drill. `python bench/bench_drill.py --records 20000` is the CI size;
the B10 figure is `--records 1000000` on an idle machine."""

import sys

from stemedb.cli import main

if __name__ == "__main__":
    sys.exit(main(["drill", *sys.argv[1:]]))
