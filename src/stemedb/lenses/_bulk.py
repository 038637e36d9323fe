"""The numba kernels of the whole-store passes, imported on first use.

Owns: `kernels()`, the one way the query layer reaches lenses/_kernels.py
(query_many, query_encoded, conflicts, materialize, trust ranks, the
warm-up), so that a single query — which runs stemedb._pair — never imports
numba. Must never: import lenses/_kernels at import time.
Error handling: in a client-only install (no numba) the ModuleNotFoundError
names what needed it and the extra that brings it (stemedb._extras).
"""

from __future__ import annotations

from types import ModuleType

from stemedb import _extras

WHOLE_STORE = "stemedb.lenses._kernels (the whole-store calls: query_many, conflicts, materialize, trust ranks)"


def kernels() -> ModuleType:
    """lenses/_kernels (numba), imported by the first call."""
    try:
        from stemedb.lenses import _kernels
    except ModuleNotFoundError as error:
        _extras.explain(error, WHOLE_STORE)
        raise
    return _kernels
