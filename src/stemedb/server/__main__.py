"""`python -m stemedb.server --data DIR --listen 127.0.0.1:0`: prints the bound addresses as JSON."""

import sys

from stemedb.server.app import main

sys.exit(main())
