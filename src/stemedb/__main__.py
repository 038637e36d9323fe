import sys

from stemedb.cli import main

sys.exit(main())
