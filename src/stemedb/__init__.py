"""StemeDB: a database of signed, content-addressed claims, resolved by lenses at read time.

The public API lives here; everything compiled is private (``stemedb._name``).
Every error StemeDB raises, the clients' included, is one of stemedb.errors'
classes, all exported here.

Records and errors load with the package; every other name (the clients,
``open`` and the engine, query results, lenses) loads on first use (PEP 562),
so ``import stemedb`` and ``import stemedb.client`` load neither the engine
nor numba, and work in a client-only install (``pip install stemedb``). The
engine's queries and the server need the ``server`` extra; without it, the
first use of a name that needs it says so (stemedb._extras).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stemedb import _extras
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

# Name -> the module that defines it, imported when the name is first used.
_LAZY = {
    **dict.fromkeys(("connect", "connect_async"), "stemedb.client"),
    **dict.fromkeys(("open", "Database"), "stemedb.database"),
    **dict.fromkeys(("Writer", "FileLayer"), "stemedb.engine"),
    **dict.fromkeys(("Resolution", "Contribution"), "stemedb.results"),
    "VerifyReport": "stemedb.reports",
    "PairConflict": "stemedb.query",
    **dict.fromkeys(("lenses", "Lens", "Recency", "Confidence", "Consensus", "VoteConsensus",
                     "Authority", "Skeptic", "EpochAware", "Layered", "Constraints"), "stemedb.lenses"),
}

if TYPE_CHECKING:  # the same names, eagerly, for type checkers
    from stemedb import lenses
    from stemedb.client import connect, connect_async
    from stemedb.database import Database
    from stemedb.database import open as open  # noqa: A004 - stemedb.open(path) is the API
    from stemedb.engine import FileLayer, Writer
    from stemedb.lenses import (
        Authority,
        Confidence,
        Consensus,
        Constraints,
        EpochAware,
        Layered,
        Lens,
        Recency,
        Skeptic,
        VoteConsensus,
    )
    from stemedb.query import PairConflict
    from stemedb.reports import VerifyReport
    from stemedb.results import Contribution, Resolution


if not TYPE_CHECKING:  # hidden from type checkers, so that a misspelt name is still an error there

    def __getattr__(name: str) -> Any:  # PEP 562: called only for names not yet in globals()
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module 'stemedb' has no attribute {name!r}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            _extras.explain(error, f"stemedb.{name}")
            raise
        value = module if name == "lenses" else getattr(module, name)
        globals()[name] = value  # later uses are plain lookups
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
