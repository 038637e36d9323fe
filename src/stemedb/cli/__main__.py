"""`python -m stemedb.cli …`, the same as `stemedb …`."""

import sys

from stemedb.cli import main

sys.exit(main())
