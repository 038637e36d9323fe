"""StemeDB network server: the binary protocol (docs/protocol.md) on trio, and an HTTP side door.

Owns: nothing itself; re-exports the entry points. `serve(data_dir, ...)` runs a
server process around a store; `Server(db, config)` serves an already open
Database inside a trio program (tests use it with memory streams). Its
dependencies come with the `server` extra: without them, importing it says so.
"""

from stemedb import _extras
from stemedb.errors import ConfigError

try:
    from stemedb.server.app import Server, main, serve
    from stemedb.server.config import Limits, RateSpec, ServerConfig, Token, hash_token
except ModuleNotFoundError as error:
    _extras.explain(error, "stemedb.server")
    raise

__all__ = ["serve", "main", "Server", "ServerConfig", "Limits", "RateSpec", "Token", "ConfigError",
           "hash_token"]
