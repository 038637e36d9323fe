"""Type stubs for the compiled wire-protocol codec (ext/stemedb/_protocol.pyx)."""

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from stemedb.errors import FrameError as FrameError
from stemedb.errors import FrameTooLarge as FrameTooLarge

MAGIC: bytes
FRAME_HEADER: int
RESPONSE: int
MORE: int
ACKS_ONE: int
ACKS_ALL: int
PROTOCOL_VERSION: int
MIN_PROTOCOL_VERSION: int
DEFAULT_MAX_FRAME: int
DEFAULT_PREAUTH_FRAME: int
MAX_TOKEN: int
MAX_PING: int
MAX_GET_IDS: int
MAX_SCAN: int

HELLO: int
AUTH: int
PING: int
PUT: int
GET: int
QUERY: int
SCAN: int
VOTE: int
EPOCH: int
STATS: int
AUDIT: int
VERIFY: int
SYNC_FIRST: int
NODE_HELLO: int
SYNC: int
REPLICA_PUT: int
PUSH: int
SYNC_WITH: int
CLUSTER_STATUS: int
CLUSTER_RELOAD: int
SYNC_LAST: int
ERROR: int
OPCODE_NAMES: dict[int, str]

ROLE_NONE: int
ROLE_READ: int
ROLE_WRITE: int
ROLE_ADMIN: int
ROLE_REPLICA: int
ROLE_NAMES: tuple[str, ...]

SERVER_AUTH_REQUIRED: int
SERVER_PROTECTED_MODE: int
SERVER_TLS: int
SERVER_REPLICATION: int
SERVER_CLUSTER: int

ERROR_CODES: dict[int, tuple[str, bool]]
E_PROTOCOL: int
E_UNSUPPORTED_VERSION: int
E_FRAME_TOO_LARGE: int
E_AUTH_REQUIRED: int
E_AUTH_FAILED: int
E_FORBIDDEN: int
E_RATE_LIMITED: int
E_QUOTA_EXCEEDED: int
E_INVALID_REQUEST: int
E_INVALID_RECORD: int
E_SIGNATURE: int
E_NOT_FOUND: int
E_UNSUPPORTED: int
E_STORAGE_FULL: int
E_DURABILITY: int
E_CORRUPTION: int
E_UNAVAILABLE: int
E_TOO_MANY_CONNECTIONS: int
E_TIMEOUT: int
E_INTERNAL: int

def is_request_opcode(opcode: int) -> bool: ...

class Frame:
    opcode: int
    flags: int
    request_id: int
    payload: bytes
    def __init__(self, opcode: int, flags: int, request_id: int, payload: bytes) -> None: ...
    @property
    def more(self) -> bool: ...

class FrameReader:
    max_payload: int
    frames_read: int
    bytes_fed: int
    def __init__(self, max_payload: int = ..., *, from_server: bool = ...) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def pending_size(self) -> int: ...
    def next(self) -> Frame | None: ...
    def frames(self) -> list[Frame]: ...

def frame_header(opcode: int, flags: int, request_id: int, length: int) -> bytes: ...
def encode_frame(opcode: int, flags: int, request_id: int, payload: bytes | bytearray | memoryview = ...) -> bytes: ...

def encode_hello(min_version: int, max_version: int, client_name: str, token: str) -> bytes: ...
def decode_hello(payload: Any) -> tuple[int, int, str, str]: ...
def encode_hello_ok(version: int, role: int, server_flags: int, max_frame: int, max_inflight: int,
                    server_name: str) -> bytes: ...
def decode_hello_ok(payload: Any) -> tuple[int, int, int, int, int, str]: ...
def encode_auth(token: str) -> bytes: ...
def decode_auth(payload: Any) -> str: ...
def encode_role(role: int) -> bytes: ...
def decode_role(payload: Any) -> int: ...

def encode_record_batch(blob: Any, offsets: Any) -> bytes: ...
def split_record_batch(blob: Any, offsets: Any, max_payload: int) -> list[tuple[int, int]]: ...
def decode_record_batch(payload: Any, allow_empty: bool = ..., start: int = ...) -> tuple[memoryview, npt.NDArray[np.int64]]: ...
def encode_ids(ids: npt.NDArray[np.uint8] | Iterable[bytes]) -> bytes: ...
def decode_ids(payload: Any, limit: int = ...) -> npt.NDArray[np.uint8]: ...

def encode_query(subject: str, predicate: str, lens: str, options: str) -> bytes: ...
def decode_query(payload: Any) -> tuple[str, str, str, str]: ...
def encode_query_result(result: str, blob: Any, offsets: Any) -> bytes: ...
def decode_query_result(payload: Any) -> tuple[str, memoryview, npt.NDArray[np.int64]]: ...
def encode_scan(subject: str, predicate: str, kind: int, limit: int) -> bytes: ...
def decode_scan(payload: Any) -> tuple[str, str, int, int]: ...
def encode_u32(value: int) -> bytes: ...
def decode_u32(payload: Any, what: str) -> int: ...
def encode_text(text: str) -> bytes: ...
def decode_text(payload: Any) -> str: ...
def decode_empty(payload: Any, what: str) -> None: ...
def encode_error(code: int, retry_after_ms: int, message: str) -> bytes: ...
def decode_error(payload: Any) -> tuple[int, int, str]: ...

def envelope_members(blob: Any, offsets: Any, signer_key: bytes) -> tuple[bytearray, npt.NDArray[np.int64]]: ...
def set_envelope_id(blob: bytearray, offsets: Any, envelope_id: bytes) -> None: ...
