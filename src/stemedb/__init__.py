"""StemeDB: a database of signed, content-addressed claims, resolved by lenses at read time.

The public API lives here; everything compiled is private (``stemedb._name``).
Every error StemeDB raises, the clients' included, is one of stemedb.errors'
classes, all exported here.
"""

from stemedb.client import connect, connect_async
from stemedb.database import Database
from stemedb.database import open as open  # noqa: A004 - stemedb.open(path) is the API
from stemedb.engine import FileLayer, VerifyReport, Writer
from stemedb.errors import (
    AuthError,
    AuthRequired,
    ClientClosed,
    ConfigError,
    ConnectionLost,
    ConnectionTimeout,
    CorruptionError,
    DatabaseClosed,
    DurabilityError,
    Forbidden,
    FrameError,
    FrameTooLarge,
    HeadersTooLarge,
    InvalidRecord,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PeerRefused,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    SignatureError,
    StemeError,
    StorageFull,
    TooManyConnections,
    Unavailable,
    Unsupported,
    UnsupportedVersion,
)
from stemedb.records import (
    Assertion,
    Envelope,
    Epoch,
    Lifecycle,
    RecordKind,
    Ref,
    Signer,
    SourceClass,
    SupersessionKind,
    Vote,
    decode,
    decode_many,
    encode_many,
    ids_of,
    now_us,
    verify_batch,
    verify_many,
)

__version__ = "0.1.0"

# Query results and lenses load on first use, so `import stemedb` does not pull in numba.
_LAZY = {
    "Resolution": "stemedb.query",
    "Contribution": "stemedb.query",
    "PairConflict": "stemedb.query",
    "lenses": "stemedb.lenses",
    **{name: "stemedb.lenses" for name in ("Lens", "Recency", "Confidence", "Consensus",
                                           "VoteConsensus", "Authority", "Skeptic", "EpochAware",
                                           "Layered", "Constraints")},
}


def __getattr__(name: str) -> object:  # PEP 562
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if name == "lenses" else getattr(module, name)
    raise AttributeError(f"module 'stemedb' has no attribute {name!r}")


__all__ = [
    "open",
    "Resolution",
    "Contribution",
    "PairConflict",
    "lenses",
    "Lens",
    "Recency",
    "Confidence",
    "Consensus",
    "VoteConsensus",
    "Authority",
    "Skeptic",
    "EpochAware",
    "Layered",
    "Constraints",
    "connect",
    "connect_async",
    "Database",
    "Writer",
    "VerifyReport",
    "FileLayer",
    "Assertion",
    "Vote",
    "Epoch",
    "Envelope",
    "Ref",
    "RecordKind",
    "SourceClass",
    "Lifecycle",
    "SupersessionKind",
    "Signer",
    "decode",
    "decode_many",
    "encode_many",
    "ids_of",
    "now_us",
    "verify_batch",
    "verify_many",
    "StemeError",
    "ProtocolError",
    "FrameError",
    "UnsupportedVersion",
    "FrameTooLarge",
    "HeadersTooLarge",
    "AuthError",
    "AuthRequired",
    "PeerRefused",
    "Forbidden",
    "RateLimited",
    "QuotaExceeded",
    "InvalidRequest",
    "MethodNotAllowed",
    "InvalidRecord",
    "SignatureError",
    "NotFound",
    "Unsupported",
    "StorageFull",
    "DurabilityError",
    "CorruptionError",
    "Unavailable",
    "TooManyConnections",
    "ConnectionTimeout",
    "DatabaseClosed",
    "RequestTimeout",
    "ConnectionLost",
    "ClientClosed",
    "ConfigError",
]
