"""Authentication and authorisation: tokens, roles, protected mode.

Owns: checking a presented API token against the configured ones (by
SHA-256, compared in constant time, with expiry), the role each operation
needs, and protected mode (no tokens configured: loopback clients only).
`new_token()` makes the secrets operators hand out (`stemedb token` prints
one and the sha256 the config stores). Must never: log or store a presented
token, say which part of a failed credential was wrong beyond "unknown" /
"expired", or name a configured token to a peer that has not authenticated
(an expired token's name goes to the server log only).

Error handling: a refused credential raises AuthError (auth_failed), a role
too low for the operation Forbidden; the request pipeline answers them
through the one error table (an error frame, or HTTP 401 / 403).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from stemedb import _protocol
from stemedb.errors import AuthError, Forbidden, PeerRefused
from stemedb.server.config import Token, hash_token

log = logging.getLogger("stemedb.server.auth")

TOKEN_PREFIX = "sdb_"  # marks a StemeDB secret for secret scanners and for whoever finds one
TOKEN_BYTES = 32

Peer: TypeAlias = "tuple[Any, ...] | str | bytes | None"
"""A client's address: a socket address tuple, an AF_UNIX path (bytes: Linux's abstract
namespace), or None (unknown)."""

# docs/protocol.md, "Roles": the least role each request needs.
REQUIRED_ROLE = {
    _protocol.PING: _protocol.ROLE_READ,
    _protocol.GET: _protocol.ROLE_READ,
    _protocol.QUERY: _protocol.ROLE_READ,
    _protocol.SCAN: _protocol.ROLE_READ,
    _protocol.STATS: _protocol.ROLE_READ,
    _protocol.PUT: _protocol.ROLE_WRITE,
    _protocol.VOTE: _protocol.ROLE_WRITE,
    _protocol.EPOCH: _protocol.ROLE_WRITE,
    _protocol.AUDIT: _protocol.ROLE_ADMIN,
    _protocol.VERIFY: _protocol.ROLE_ADMIN,
    _protocol.NODE_HELLO: _protocol.ROLE_REPLICA,
    _protocol.SYNC: _protocol.ROLE_REPLICA,
    _protocol.REPLICA_PUT: _protocol.ROLE_REPLICA,
    _protocol.PUSH: _protocol.ROLE_REPLICA,
    _protocol.CLUSTER_STATUS: _protocol.ROLE_READ,
    _protocol.SYNC_WITH: _protocol.ROLE_ADMIN,
    _protocol.CLUSTER_RELOAD: _protocol.ROLE_ADMIN,
}


def new_token() -> tuple[str, str]:
    """(a new random API token, the hex SHA-256 the config's `sha256` field takes)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return token, hash_token(token).hex()


def required_role(opcode: int) -> int:
    """The least role `opcode` needs (REQUIRED_ROLE); reserved opcodes need admin."""
    return REQUIRED_ROLE.get(opcode, _protocol.ROLE_ADMIN)


def role_allows(role: int, needed: int) -> bool:
    """Whether a principal of `role` may send what needs `needed`.

    Read ⊂ write ⊂ admin nest; replica (a cluster node's token) stands
    beside them: reads and the node-to-node replication requests, no client
    writes, nothing of admin. Admin may do everything, replication included.
    """
    if role == _protocol.ROLE_REPLICA:
        return needed in (_protocol.ROLE_READ, _protocol.ROLE_REPLICA)
    if needed == _protocol.ROLE_REPLICA:
        return role == _protocol.ROLE_ADMIN
    return role >= needed


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's name and role, or a loopback client in protected mode."""

    name: str
    role: int

    @property
    def role_name(self) -> str:
        return str(_protocol.ROLE_NAMES[self.role])


def is_loopback(peer: Peer) -> bool:
    """True for 127.0.0.0/8, ::1 and Unix sockets (peer is a sockaddr, a str, or None)."""
    if peer is None or isinstance(peer, bytes):
        return False
    host = peer[0] if isinstance(peer, tuple) else peer
    if isinstance(host, str) and (host == "" or host.startswith("/")):
        return True  # AF_UNIX
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def describe_peer(peer: Peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class Authenticator:
    """Maps presented tokens to principals; decides who may connect without one."""

    def __init__(self, tokens: list[Token], *, metrics_tokens: list[bytes] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens = list(tokens)
        self.metrics_tokens = list(metrics_tokens or [])  # SHA-256s ([http] metrics_token_sha256)
        self.clock = clock

    @property
    def protected_mode(self) -> bool:
        return not self.tokens

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid, unexpired token; AuthError otherwise."""
        digest = hash_token(token)
        found: Token | None = None
        for entry in self.tokens:  # compare with every entry: time does not depend on which matched
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        if found is None:
            raise AuthError("unknown token")
        if found.expires is not None and self.clock() >= found.expires:
            log.info("refused the expired token %r (expired at %s)", found.name,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.expires)),
                     extra={"token_name": found.name})
            raise AuthError("token has expired")
        return Principal(found.name, found.role)

    @property
    def metrics_protected(self) -> bool:
        """True when /metrics needs one of the configured metrics tokens."""
        return bool(self.metrics_tokens)

    def authenticate_scraper(self, token: str) -> None:
        """Nothing if `token` is a configured metrics token; AuthError ("unknown token") otherwise."""
        digest = hash_token(token)
        matched = False
        for entry in self.metrics_tokens:  # every entry compared: time does not depend on which
            matched |= hmac.compare_digest(entry, digest)
        if not matched:
            raise AuthError("unknown token")

    def anonymous(self, peer: Peer) -> Principal | None:
        """The principal of a client that presented no token, or None if it must authenticate.

        In protected mode a loopback client is an admin (as with a local
        embedded store); any other peer is refused with AuthError. The
        principal is named after the peer's address, not its port: rate
        limits count per client, and a client is an address here, however
        many connections it opens. Any other peer: PeerRefused.
        """
        if not self.protected_mode:
            return None
        if not is_loopback(peer):
            raise PeerRefused(
                f"protected mode: no tokens are configured, so only loopback clients are served "
                f"({describe_peer(peer)} is not); configure [[tokens]] to serve the network")
        host = peer[0] if isinstance(peer, tuple) else peer  # a loopback peer: never bytes
        return Principal(f"local:{host!s}", _protocol.ROLE_ADMIN)

    @staticmethod
    def authorize(principal: Principal, opcode: int) -> None:
        """Forbidden unless the principal's role is at least the one `opcode` needs."""
        needed = required_role(opcode)
        if not role_allows(principal.role, needed):
            op = _protocol.OPCODE_NAMES.get(opcode, f"0x{opcode:02x}")
            raise Forbidden(f"{op} needs the {_protocol.ROLE_NAMES[needed]} role; "
                            f"{principal.name!r} has {principal.role_name}")
