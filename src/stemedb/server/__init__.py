"""StemeDB network server: the binary protocol (docs/protocol.md) on trio, and an HTTP side door.

Owns: nothing itself; re-exports the entry points. `serve(data_dir, ...)` runs a
server process around a store; `Server(db, config)` serves an already open
Database inside a trio program (tests use it with memory streams).
"""

from stemedb.errors import ConfigError
from stemedb.server.app import Server, main, serve
from stemedb.server.config import Limits, RateSpec, ServerConfig, Token, hash_token

__all__ = ["serve", "main", "Server", "ServerConfig", "Limits", "RateSpec", "Token", "ConfigError",
           "hash_token"]
