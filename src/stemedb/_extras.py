"""The optional part of the package, and the error that says how to install it.

`pip install stemedb` is the client: records, signing, the codec and both
clients (numpy, pynacl, anyio). The `server` extra adds what running the
database needs, embedded or served: numba for the query kernels, trio, h11
and prometheus_client for the server (and two backports on Python 3.10).

Owns: the top-level module names that only the `server` extra brings.
Must never: import any of them.
Error handling: `explain` turns the ModuleNotFoundError of one of those
modules into one that names what needed it and the command that installs it;
any other error it leaves to its caller to re-raise unchanged.
"""

from __future__ import annotations

SERVER_EXTRA = "stemedb[server]"

# llvmlite is numba's own dependency; tomli and exceptiongroup are needed on Python 3.10 only.
SERVER_EXTRA_IMPORTS = frozenset({"numba", "llvmlite", "trio", "h11", "prometheus_client",
                                  "exceptiongroup", "tomli"})


def explain(error: ModuleNotFoundError, needed_by: str) -> None:
    """Raise a clearer error if `error` is a module of the server extra; else return."""
    missing = (error.name or "").partition(".")[0]
    if missing in SERVER_EXTRA_IMPORTS:
        raise ModuleNotFoundError(
            f"{needed_by} needs {missing}, which the client-only install (pip install stemedb) "
            f"leaves out: pip install '{SERVER_EXTRA}'", name=error.name) from error
