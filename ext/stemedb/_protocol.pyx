"""The StemeDB wire protocol: frames and message payloads, parsed and built.

Owns: the byte layout of docs/protocol.md — the 12-byte frame header, the
frame reader that cuts frames out of a receive buffer (refusing a frame from
its header alone when it declares more than the reader's limit), and the
encoding and decoding of every message payload. Every read goes through the
bounds-checked Cursor; every malformed input raises FrameError (a
ProtocolError, defined with every other error in stemedb.errors; a frame
above the limit raises its subclass FrameTooLarge), whose class gives the
error code to answer with.

Must never: touch sockets, the clock or the database, or decode record
contents (records travel as opaque, length-delimited byte strings here;
stemedb._codec decodes them). The one exception, group signing on the
client, walks records with _codec's parse_header and parse_proof. Constants
cite docs/protocol.md, and tests/test_protocol.py checks them against the
document. The payloads of the replication opcodes (0x40-0x4F) are built and
parsed by stemedb.replication.framing, on top of this module's record batches.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from stemedb._bytes cimport SIZE_U8, get_u16, get_u32, put_u8, put_u16, put_u32
from stemedb._codec cimport (KEY_SIZE, KIND_ENVELOPE, PROOF_ENVELOPE, PROOF_NONE, Reader,
                             RecordFields, parse_failure, parse_header, parse_proof, write_header)

import numpy as np

from stemedb.errors import (ERROR_CLASSES, AuthError, AuthRequired, ConnectionTimeout,
                            CorruptionError, DurabilityError, Forbidden, FrameError, FrameTooLarge,
                            InvalidRecord, InvalidRequest, NotFound, ProtocolError, QuotaExceeded,
                            RateLimited, SignatureError, StemeError, StorageFull, TooManyConnections,
                            Unavailable, UnsupportedVersion, Unsupported)

# docs/protocol.md, "Frames"
MAGIC = b"SD"
FRAME_HEADER = HEADER_SIZE
RESPONSE = FLAG_RESPONSE
MORE = FLAG_MORE
ACKS_ONE = FLAG_ACKS_ONE            # request flags of PUT / VOTE / EPOCH (docs/protocol.md, "Frames")
ACKS_ALL = FLAG_ACKS_ALL
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

# docs/protocol.md, "Limits"
DEFAULT_MAX_FRAME = 16 << 20        # payload bytes of one frame after authentication
DEFAULT_PREAUTH_FRAME = 4096        # payload bytes of one frame before authentication
MAX_TOKEN = 1024                    # bytes of an API token
MAX_PING = 1024                     # bytes echoed by PING
MAX_GET_IDS = 65536                 # IDs in one GET
MAX_SCAN = 1_000_000                # records one SCAN may return

# docs/protocol.md, "Opcodes"
HELLO = 0x01
AUTH = 0x02
PING = 0x03
PUT = 0x10
GET = 0x11
QUERY = 0x12
SCAN = 0x13
VOTE = 0x14
EPOCH = 0x15
STATS = 0x16
AUDIT = 0x17
VERIFY = 0x18                       # admin: scrub the store (Database.verify), answer the report
SYNC_FIRST = 0x40                   # 0x40..0x4F: replication (docs/protocol.md, "Replication")
NODE_HELLO = 0x40                   # a cluster node says who it is
SYNC = 0x41                         # one step of a reconciliation session
REPLICA_PUT = 0x42                  # a write forwarded by the node that accepted it
PUSH = 0x44                         # records that became durable on the sender
SYNC_WITH = 0x45                    # run a reconciliation session with another server now
CLUSTER_STATUS = 0x46               # the node's view of the cluster (JSON)
CLUSTER_RELOAD = 0x47               # re-read the cluster file
SYNC_LAST = 0x4F
ERROR = 0x7F

OPCODE_NAMES = {
    HELLO: "hello", AUTH: "auth", PING: "ping", PUT: "put", GET: "get", QUERY: "query",
    SCAN: "scan", VOTE: "vote", EPOCH: "epoch", STATS: "stats", AUDIT: "audit", VERIFY: "verify",
    ERROR: "error",
    NODE_HELLO: "node_hello", SYNC: "sync", REPLICA_PUT: "replica_put", PUSH: "push",
    SYNC_WITH: "sync_with", CLUSTER_STATUS: "cluster_status", CLUSTER_RELOAD: "cluster_reload",
}
for _op in range(SYNC_FIRST, SYNC_LAST + 1):
    OPCODE_NAMES.setdefault(_op, f"replication_{_op:02x}")   # reserved: answered `unsupported`

# docs/protocol.md, "Roles"
ROLE_NONE = 0
ROLE_READ = 1
ROLE_WRITE = 2
ROLE_ADMIN = 3
ROLE_REPLICA = 4                    # a cluster node: reads and replication, not read ⊂ write ⊂ admin
ROLE_NAMES = ("none", "read", "write", "admin", "replica")

# docs/protocol.md, "HELLO" (server_flags)
SERVER_AUTH_REQUIRED = 1
SERVER_PROTECTED_MODE = 2
SERVER_TLS = 4
SERVER_REPLICATION = 8              # answers SYNC and SYNC_WITH (reconciliation of its whole store)
SERVER_CLUSTER = 16                 # a node of a cluster: NODE_HELLO, PUSH, REPLICA_PUT, CLUSTER_*

# docs/protocol.md, "Errors": the codes are stemedb.errors' table (each error class carries its
# own); ERROR_CODES is that table as (name, closes the connection), and the E_ names are its
# codes, for the codec and for code that speaks numbers (tests, vectors, other drivers).
ERROR_CODES = {code: (error.name, error.closes) for code, error in ERROR_CLASSES.items()}
E_PROTOCOL = ProtocolError.code
E_UNSUPPORTED_VERSION = UnsupportedVersion.code
E_FRAME_TOO_LARGE = FrameTooLarge.code
E_AUTH_REQUIRED = AuthRequired.code
E_AUTH_FAILED = AuthError.code
E_FORBIDDEN = Forbidden.code
E_RATE_LIMITED = RateLimited.code
E_QUOTA_EXCEEDED = QuotaExceeded.code
E_INVALID_REQUEST = InvalidRequest.code
E_INVALID_RECORD = InvalidRecord.code
E_SIGNATURE = SignatureError.code
E_NOT_FOUND = NotFound.code
E_UNSUPPORTED = Unsupported.code
E_STORAGE_FULL = StorageFull.code
E_DURABILITY = DurabilityError.code
E_CORRUPTION = CorruptionError.code
E_UNAVAILABLE = Unavailable.code
E_TOO_MANY_CONNECTIONS = TooManyConnections.code
E_TIMEOUT = ConnectionTimeout.code
E_INTERNAL = StemeError.code


cdef inline bint known_request(int opcode) noexcept:
    return (opcode == HELLO or opcode == AUTH or opcode == PING or (PUT <= opcode <= VERIFY)
            or (SYNC_FIRST <= opcode <= SYNC_LAST))


cdef inline bint is_write(int opcode) noexcept:
    return opcode == PUT or opcode == VOTE or opcode == EPOCH


def is_request_opcode(int opcode):
    """True for an opcode a client may send (docs/protocol.md, "Opcodes")."""
    return known_request(opcode)


# ----------------------------------------------------------------------------
# The bounds-checked cursor: the only way payload bytes are parsed.

cdef inline void cursor_init(Cursor* c, const uint8_t* base, Py_ssize_t size) noexcept:
    c.base = base
    c.pos = 0
    c.end = size

cdef const uint8_t* take(Cursor* c, Py_ssize_t n, str field) except NULL:
    cdef const uint8_t* p
    if n < 0 or n > c.end - c.pos:
        raise FrameError(f"{field}: truncated: needs {n} bytes at payload offset {c.pos}, "
                         f"only {c.end - c.pos} left")
    p = c.base + c.pos
    c.pos += n
    return p

cdef inline uint8_t take_u8(Cursor* c, str field) except? 0xFF:
    return take(c, 1, field)[0]

cdef inline uint16_t take_u16(Cursor* c, str field) except? 0xFFFF:
    return get_u16(take(c, 2, field))

cdef inline uint32_t take_u32(Cursor* c, str field) except? 0xFFFFFFFF:
    return get_u32(take(c, 4, field))

cdef str take_str(Cursor* c, Py_ssize_t n, str field):
    cdef const uint8_t* p = take(c, n, field)
    try:
        return (<const char*>p)[:n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"{field}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

cdef inline str take_str8(Cursor* c, str field):
    return take_str(c, take_u8(c, field + " length"), field)

cdef inline str take_str16(Cursor* c, str field):
    return take_str(c, take_u16(c, field + " length"), field)

cdef inline str take_str32(Cursor* c, str field):
    return take_str(c, take_u32(c, field + " length"), field)

cdef void finish(Cursor* c, str message) except *:
    if c.pos != c.end:
        raise FrameError(f"{message}: {c.end - c.pos} trailing bytes after the payload")


cdef class _Payload:
    """Holds the buffer a Cursor points into (bytes, bytearray, memoryview)."""
    cdef const uint8_t[::1] view

    def __cinit__(self, data):
        if isinstance(data, str):
            raise TypeError("payload: expected bytes, got str")
        self.view = data

    cdef void cursor(self, Cursor* c) noexcept:
        if self.view.shape[0]:
            cursor_init(c, &self.view[0], self.view.shape[0])
        else:
            cursor_init(c, <const uint8_t*>b"", 0)


# ----------------------------------------------------------------------------
# Building payloads: a growing byte string written in order.

cdef class _Builder:
    cdef bytearray out

    def __cinit__(self):
        self.out = bytearray()

    cdef void u8(self, uint8_t v) except *:
        self.out.append(v)

    cdef void u16(self, uint16_t v) except *:
        cdef uint8_t b[2]
        put_u16(b, v)
        self.out += (<char*>b)[:2]

    cdef void u32(self, uint32_t v) except *:
        cdef uint8_t b[4]
        put_u32(b, v)
        self.out += (<char*>b)[:4]

    cdef void raw(self, data) except *:
        self.out += data

    cdef void text(self, str value, int width, str field, Py_ssize_t limit) except *:
        cdef bytes b = value.encode("utf-8")
        if len(b) > limit:
            raise ValueError(f"{field}: {len(b)} bytes of UTF-8, the limit is {limit}")
        if width == 1:
            self.u8(<uint8_t>len(b))
        elif width == 2:
            self.u16(<uint16_t>len(b))
        else:
            self.u32(<uint32_t>len(b))
        self.out += b

    cdef bytes done(self):
        return bytes(self.out)


# ----------------------------------------------------------------------------
# Frames

cdef class Frame:
    """One frame: opcode, flags, request id and payload bytes."""

    def __init__(self, int opcode, int flags, uint32_t request_id, bytes payload):
        self.opcode = opcode
        self.flags = flags
        self.request_id = request_id
        self.payload = payload

    @property
    def more(self):
        """True when more response frames follow for this request id."""
        return bool(self.flags & FLAG_MORE)

    def __repr__(self):
        name = OPCODE_NAMES.get(self.opcode, f"0x{self.opcode:02x}")
        return (f"<Frame {name} flags={self.flags} request_id={self.request_id} "
                f"payload={len(self.payload)} bytes>")

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.opcode == (<Frame>other).opcode and self.flags == (<Frame>other).flags
                and self.request_id == (<Frame>other).request_id
                and self.payload == (<Frame>other).payload)


def frame_header(int opcode, int flags, uint32_t request_id, Py_ssize_t length):
    """The 12-byte header of a frame whose payload has `length` bytes."""
    cdef uint8_t b[HEADER_SIZE]
    if not 0 <= opcode <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError(f"opcode {opcode} / flags {flags}: must fit one byte each")
    if not 0 <= length <= 0xFFFFFFFF:
        raise ValueError(f"payload of {length} bytes does not fit a frame")
    b[0] = MAGIC_0
    b[1] = MAGIC_1
    b[2] = <uint8_t>opcode
    b[3] = <uint8_t>flags
    put_u32(b + 4, request_id)
    put_u32(b + 8, <uint32_t>length)
    return PyBytes_FromStringAndSize(<char*>b, HEADER_SIZE)


def encode_frame(int opcode, int flags, uint32_t request_id, payload=b""):
    """A whole frame: header then payload."""
    return frame_header(opcode, flags, request_id, len(payload)) + bytes(payload)


cdef class FrameReader:
    """Cuts frames out of received bytes: `feed(data)`, then `next()` until None.

    A frame is refused from its 12-byte header alone (bad magic, unknown
    opcode, reserved flag bits, wrong direction, or a declared length above
    `max_payload`), before any of its payload is buffered, so a peer that
    declares 4 GiB costs nothing. After a FrameError the reader must not be
    used again: the stream has lost its framing.
    """

    def __init__(self, Py_ssize_t max_payload=DEFAULT_PREAUTH_FRAME, *, bint from_server=False):
        self._buffer = bytearray()
        self._start = 0
        self.max_payload = max_payload
        self._from_server = from_server
        self.frames_read = 0
        self.bytes_fed = 0

    def feed(self, data):
        """Append received bytes."""
        if self._start and self._start >= len(self._buffer) // 2:
            del self._buffer[:self._start]
            self._start = 0
        self._buffer += data
        self.bytes_fed += len(data)

    @property
    def buffered(self):
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer) - self._start

    @property
    def pending_size(self):
        """Bytes (header + payload) of the frame being received, once its header is in; else 0.

        Read it after `next()` returned None: the header was then checked (a
        refused header raises there), so the size is at most FRAME_HEADER +
        max_payload. A receiver reserves this much before reading more of it.
        """
        if len(self._buffer) - self._start < HEADER_SIZE:
            return 0
        return HEADER_SIZE + get_u32(<const uint8_t*>(<char*>self._buffer) + self._start + 8)

    def next(self):
        """The next complete frame, or None if more bytes are needed."""
        return self._parse_one()

    def frames(self):
        """Every complete frame buffered now, in order (possibly none)."""
        cdef list out = []
        cdef Frame frame
        while True:
            frame = self._parse_one()
            if frame is None:
                return out
            out.append(frame)

    cdef Frame _parse_one(self):
        cdef Py_ssize_t available = len(self._buffer) - self._start
        cdef const uint8_t* p
        cdef int opcode, flags
        cdef uint32_t request_id, length
        cdef bytes payload
        cdef Frame frame
        if available < HEADER_SIZE:
            return None
        p = <const uint8_t*>(<char*>self._buffer) + self._start
        if p[0] != MAGIC_0 or p[1] != MAGIC_1:
            raise FrameError(f"bad magic {bytes(p[:2]).hex()} (expected 5344, 'SD'); "
                             "is this a StemeDB client?")
        opcode = p[2]
        flags = p[3]
        request_id = get_u32(p + 4)
        length = get_u32(p + 8)
        if flags & ~FLAGS_KNOWN:
            raise FrameError(f"reserved flag bits set ({flags:#04x})", request_id=request_id)
        if self._from_server:
            if not flags & FLAG_RESPONSE or flags & FLAGS_ACKS:
                raise FrameError(f"a server frame carries flags {flags:#04x} (RESPONSE, and "
                                 "maybe MORE, expected)", request_id=request_id)
            if not (known_request(opcode) or opcode == ERROR):
                raise FrameError(f"unknown opcode {opcode:#04x}", request_id=request_id)
        else:
            if not known_request(opcode):
                raise FrameError(f"unknown opcode {opcode:#04x}", request_id=request_id)
            if flags != 0 and not (is_write(opcode) and (flags & ~FLAGS_ACKS) == 0
                                   and flags != FLAGS_ACKS):
                raise FrameError(f"a request carries flags {flags:#04x} (must be 0, or one "
                                 "of ACKS_ONE / ACKS_ALL on PUT, VOTE, EPOCH)", request_id=request_id)
        if length > <uint64_t>self.max_payload:
            raise FrameTooLarge(f"frame declares {length} payload bytes; the limit here is "
                                f"{self.max_payload}", request_id=request_id)
        if available - HEADER_SIZE < <Py_ssize_t>length:
            return None
        payload = PyBytes_FromStringAndSize(<const char*>p + HEADER_SIZE, length)
        self._start += HEADER_SIZE + length
        if self._start == len(self._buffer):
            self._buffer = bytearray()
            self._start = 0
        frame = Frame.__new__(Frame)
        frame.opcode = opcode
        frame.flags = flags
        frame.request_id = request_id
        frame.payload = payload
        self.frames_read += 1
        return frame


# ----------------------------------------------------------------------------
# Handshake: HELLO and AUTH

def encode_hello(int min_version, int max_version, str client_name, str token):
    cdef _Builder b = _Builder()
    b.u16(<uint16_t>min_version)
    b.u16(<uint16_t>max_version)
    b.text(client_name, 1, "client_name", 255)
    b.text(token, 2, "token", MAX_TOKEN)
    return b.done()


def decode_hello(payload):
    """(min_version, max_version, client_name, token)."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    min_version = take_u16(&c, "min_version")
    max_version = take_u16(&c, "max_version")
    client_name = take_str8(&c, "client_name")
    token_length = take_u16(&c, "token length")
    if token_length > MAX_TOKEN:
        raise FrameError(f"token: {token_length} bytes, the limit is {MAX_TOKEN}")
    token = take_str(&c, token_length, "token")
    finish(&c, "HELLO")
    if min_version > max_version:
        raise FrameError(f"HELLO: min_version {min_version} > max_version {max_version}")
    return min_version, max_version, client_name, token


def encode_hello_ok(int version, int role, int server_flags, uint32_t max_frame,
                    uint32_t max_inflight, str server_name):
    cdef _Builder b = _Builder()
    b.u16(<uint16_t>version)
    b.u8(<uint8_t>role)
    b.u8(<uint8_t>server_flags)
    b.u32(max_frame)
    b.u32(max_inflight)
    b.text(server_name, 1, "server_name", 255)
    return b.done()


def decode_hello_ok(payload):
    """(version, role, server_flags, max_frame, max_inflight, server_name)."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    version = take_u16(&c, "version")
    role = take_u8(&c, "role")
    server_flags = take_u8(&c, "server_flags")
    max_frame = take_u32(&c, "max_frame")
    max_inflight = take_u32(&c, "max_inflight")
    server_name = take_str8(&c, "server_name")
    finish(&c, "HELLO response")
    if role > ROLE_REPLICA:
        raise FrameError(f"HELLO response: unknown role {role}")
    return version, role, server_flags, max_frame, max_inflight, server_name


def encode_auth(str token):
    cdef _Builder b = _Builder()
    b.text(token, 2, "token", MAX_TOKEN)
    return b.done()


def decode_auth(payload):
    """The token."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    token_length = take_u16(&c, "token length")
    if token_length > MAX_TOKEN:
        raise FrameError(f"token: {token_length} bytes, the limit is {MAX_TOKEN}")
    token = take_str(&c, token_length, "token")
    finish(&c, "AUTH")
    return token


def encode_role(int role):
    return bytes([role])


def decode_role(payload):
    if len(payload) != 1 or payload[0] > ROLE_REPLICA:
        raise FrameError("AUTH response: expected one byte holding a role 0..4")
    return payload[0]


# ----------------------------------------------------------------------------
# Record batches and ID lists

def encode_record_batch(blob, offsets):
    """count:u32, length:u32 × count, then the records; offsets has count + 1 entries."""
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef const uint8_t[::1] view = blob
    cdef Py_ssize_t n = offs.shape[0] - 1, i, start, end, size
    cdef bytes out
    cdef uint8_t* p
    if n < 0:
        raise ValueError("offsets: needs at least one entry")
    start = offs[0]
    end = offs[n]
    if start < 0 or end > view.shape[0] or start > end:
        raise ValueError("offsets: outside the blob")
    for i in range(n):
        if offs[i + 1] < offs[i] or offs[i + 1] - offs[i] > <int64_t>0xFFFFFFFF:
            raise ValueError(f"offsets[{i + 1}]: decreasing or too large")
    size = 4 + 4 * n + (end - start)
    out = PyBytes_FromStringAndSize(NULL, size)
    p = <uint8_t*>PyBytes_AS_STRING(out)
    put_u32(p, <uint32_t>n)
    for i in range(n):
        put_u32(p + 4 + 4 * i, <uint32_t>(offs[i + 1] - offs[i]))
    if end > start:
        memcpy(p + 4 + 4 * n, &view[start], end - start)
    return out


def split_record_batch(blob, offsets, Py_ssize_t max_payload):
    """Record batches of at most `max_payload` bytes each that together hold every record.

    Returns a list of (first, end) index pairs (records first..end-1); at
    least one pair, even for zero records. A record too big for any batch
    raises ValueError.
    """
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef Py_ssize_t n = offs.shape[0] - 1, i, first = 0, size = 4, record
    cdef list out = []
    for i in range(n):
        record = 4 + offs[i + 1] - offs[i]
        if 4 + record > max_payload:
            raise ValueError(f"record {i}: {record - 4} bytes do not fit a {max_payload}-byte frame")
        if size + record > max_payload:
            out.append((first, i))
            first = i
            size = 4
        size += record
    out.append((first, n))
    return out


def decode_record_batch(payload, bint allow_empty=False, Py_ssize_t start=0):
    """(blob, offsets) of a record batch at payload[start:], which it must fill exactly.

    `blob` is a memoryview of `payload` (no copy); record i is
    blob[offsets[i]:offsets[i+1]]. A zero length is refused unless
    `allow_empty` (GET responses use it for "absent").
    """
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    cdef uint32_t count
    cdef Py_ssize_t i, total = 0, length
    cdef const uint8_t* lengths
    cdef int64_t[::1] offs
    data.cursor(&c)
    if start < 0 or start > c.end:
        raise ValueError("start: outside the payload")
    c.pos = start
    count = take_u32(&c, "record count")
    # Checked before allocating: each record needs at least its 4-byte length.
    if <uint64_t>count * 4 > <uint64_t>(c.end - c.pos):
        raise FrameError(f"record count {count} does not fit the {c.end - c.pos} bytes left")
    lengths = take(&c, 4 * <Py_ssize_t>count, "record lengths")
    out = np.empty(count + 1, dtype=np.int64)
    offs = out
    offs[0] = 0
    for i in range(count):
        length = get_u32(lengths + 4 * i)
        if length == 0 and not allow_empty:
            raise FrameError(f"record {i}: length 0")
        total += length
        if total > c.end - c.pos:
            raise FrameError(f"record {i}: lengths add up to more than the {c.end - c.pos} "
                             "bytes left")
        offs[i + 1] = total
    if total != c.end - c.pos:
        raise FrameError(f"record batch: {c.end - c.pos - total} trailing bytes after the records")
    return memoryview(payload)[c.pos:], out


def encode_ids(ids):
    """count:u32 then 32-byte IDs; `ids` is an (n, 32) uint8 array or a list of 32-byte strings."""
    cdef uint8_t head[4]
    if isinstance(ids, np.ndarray):
        if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_SIZE:
            raise ValueError(f"ids: expected an (n, 32) uint8 array, got {ids.dtype} {ids.shape}")
        raw = np.ascontiguousarray(ids).tobytes()
    else:
        parts = []
        for index, value in enumerate(ids):
            if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != ID_SIZE:
                raise ValueError(f"ids[{index}]: expected 32 bytes")
            parts.append(bytes(value))
        raw = b"".join(parts)
    put_u32(head, <uint32_t>(len(raw) // ID_SIZE))
    return (<char*>head)[:4] + raw


def decode_ids(payload, Py_ssize_t limit=0xFFFFFFFF):
    """An (n, 32) uint8 array; at most `limit` IDs."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    cdef uint32_t count
    data.cursor(&c)
    count = take_u32(&c, "ID count")
    if count > <uint64_t>limit:
        raise FrameError(f"{count} IDs; the limit is {limit}")
    if <uint64_t>count * ID_SIZE != <uint64_t>(c.end - c.pos):
        raise FrameError(f"ID list: count {count} needs {count * ID_SIZE} bytes, "
                         f"the payload has {c.end - c.pos}")
    take(&c, count * ID_SIZE, "IDs")
    return np.frombuffer(memoryview(payload)[4:], dtype=np.uint8).reshape(-1, ID_SIZE)


# ----------------------------------------------------------------------------
# QUERY, SCAN, AUDIT, PING, STATS

def encode_query(str subject, str predicate, str lens, str options):
    cdef _Builder b = _Builder()
    b.text(subject, 2, "subject", 0xFFFF)
    b.text(predicate, 2, "predicate", 0xFFFF)
    b.text(lens, 1, "lens", 255)
    b.text(options, 4, "options", 0xFFFFFFFF)
    return b.done()


def decode_query(payload):
    """(subject, predicate, lens, options JSON text); empty strings mean "not given"."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    subject = take_str16(&c, "subject")
    predicate = take_str16(&c, "predicate")
    lens = take_str8(&c, "lens")
    options = take_str32(&c, "options")
    finish(&c, "QUERY")
    return subject, predicate, lens, options


def encode_query_result(str result, blob, offsets):
    """result:str32 (JSON) then a record batch of the contributing records."""
    cdef _Builder b = _Builder()
    b.text(result, 4, "result", 0xFFFFFFFF)
    b.raw(encode_record_batch(blob, offsets))
    return b.done()


def decode_query_result(payload):
    """(result JSON text, blob, offsets)."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    result = take_str32(&c, "result")
    blob, offsets = decode_record_batch(payload, False, c.pos)
    return result, blob, offsets


def encode_scan(str subject, str predicate, int kind, uint32_t limit):
    cdef _Builder b = _Builder()
    b.text(subject, 2, "subject", 0xFFFF)
    b.text(predicate, 2, "predicate", 0xFFFF)
    b.u8(<uint8_t>kind)
    b.u32(limit)
    return b.done()


def decode_scan(payload):
    """(subject, predicate, kind 0..4, limit)."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    subject = take_str16(&c, "subject")
    predicate = take_str16(&c, "predicate")
    kind = take_u8(&c, "kind")
    limit = take_u32(&c, "limit")
    finish(&c, "SCAN")
    if kind > KIND_ENVELOPE:
        raise FrameError(f"SCAN: unknown record kind {kind}")
    return subject, predicate, kind, limit


def encode_u32(uint32_t value):
    cdef uint8_t b[4]
    put_u32(b, value)
    return (<char*>b)[:4]


def decode_u32(payload, str what):
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    value = take_u32(&c, what)
    finish(&c, what)
    return value


def encode_text(str text):
    """str32: a JSON document (STATS, AUDIT responses)."""
    cdef _Builder b = _Builder()
    b.text(text, 4, "text", 0xFFFFFFFF)
    return b.done()


def decode_text(payload):
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    text = take_str32(&c, "text")
    finish(&c, "text")
    return text


def decode_empty(payload, str what):
    if len(payload):
        raise FrameError(f"{what}: expects an empty payload, got {len(payload)} bytes")


# ----------------------------------------------------------------------------
# ERROR

def encode_error(int code, uint32_t retry_after_ms, str message):
    cdef _Builder b = _Builder()
    cdef bytes text = message.encode("utf-8")
    if len(text) > 4096:  # keep errors small; cut at a character boundary
        text = text[:4093].decode("utf-8", "ignore").encode("utf-8") + b"..."
    b.u16(<uint16_t>code)
    b.u32(retry_after_ms)
    b.u16(<uint16_t>len(text))
    b.raw(text)
    return b.done()


def decode_error(payload):
    """(code, retry_after_ms, message)."""
    cdef _Payload data = _Payload(payload)
    cdef Cursor c
    data.cursor(&c)
    code = take_u16(&c, "error code")
    retry_after_ms = take_u32(&c, "retry_after_ms")
    message = take_str16(&c, "message")
    finish(&c, "ERROR")
    return code, retry_after_ms, message


# ----------------------------------------------------------------------------
# Group signing on the client, byte for byte (docs/format.md, "Record
# encoding"): the one place this module touches records. It rewrites
# already-encoded unsigned records into members of an envelope — signer key
# inserted in the content, proof = envelope reference — without building a
# Python object per record. The records are walked with the codec's own
# parse_header / parse_proof (stemedb._codec.pxd), so the layout is not
# described here again. tests/test_protocol.py checks the bytes against
# Signer.sign_batch.

def envelope_members(blob, offsets, bytes signer_key):
    """(members blob, offsets): the records as members of an envelope by `signer_key`.

    Each record must be unsigned (proof kind 0) and declare no signer or only
    `signer_key`. The envelope ID in each proof is left zero: hash the
    contents (stemedb._codec.hash_encoded), sign the envelope, then
    set_envelope_id().
    """
    cdef const uint8_t[::1] view = blob
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef Py_ssize_t n = offs.shape[0] - 1, i, length, size = 0
    cdef Reader r
    cdef RecordFields f
    cdef const uint8_t* key
    cdef uint8_t* q
    cdef uint8_t* p
    if len(signer_key) != KEY_SIZE:
        raise ValueError("signer_key: expected 32 bytes")
    key = <const uint8_t*>PyBytes_AS_STRING(signer_key)
    if n < 0 or (n > 0 and (offs[0] < 0 or offs[n] > view.shape[0])):
        raise ValueError("offsets: outside the blob")
    for i in range(n):
        length = offs[i + 1] - offs[i]
        if length < 0:
            raise ValueError(f"offsets[{i + 1}]: decreasing")
        parse_header(&r, &f, &view[0] + offs[i], length)
        if not parse_proof(&r, &f):
            raise ValueError(f"records[{i}]: {parse_failure(&r)}")
        if f.proof.kind != PROOF_NONE or r.pos != length:
            raise ValueError(f"records[{i}]: not an unsigned record (proof kind {f.proof.kind}, "
                             f"{length - r.pos} bytes after the proof)")
        if f.signers.size == 0:
            size += KEY_SIZE  # the signer key goes into the content
        elif f.signers.size != KEY_SIZE or memcmp(f.signers.data, key, KEY_SIZE) != 0:
            raise ValueError(f"records[{i}]: declares other signers than the envelope's")
        size += length + ID_SIZE  # the proof gains the envelope ID
    out = bytearray(size)
    result = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] out_offs = result
    q = <uint8_t*>(<char*>out) if size else NULL
    p = q
    out_offs[0] = 0
    for i in range(n):
        parse_header(&r, &f, &view[0] + offs[i], offs[i + 1] - offs[i])  # checked above
        parse_proof(&r, &f)
        if f.signers.size == 0:
            p = write_header(p, f.version, f.kind, <uint32_t>(f.content.size + KEY_SIZE), 1)
            memcpy(p, key, KEY_SIZE)
            memcpy(p + KEY_SIZE, f.body.data, f.body.size)
            p += KEY_SIZE + f.body.size
        else:
            memcpy(p, f.content.data, f.content.size)
            p += f.content.size
        p = put_u8(p, PROOF_ENVELOPE)
        memset(p, 0, ID_SIZE)  # the envelope ID, known once the members are hashed
        p += ID_SIZE
        out_offs[i + 1] = p - q
    return out, result


def set_envelope_id(bytearray blob, offsets, bytes envelope_id):
    """Write `envelope_id` into the proof of every record of `blob` (envelope members)."""
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef Py_ssize_t i, n = offs.shape[0] - 1, start, length
    cdef uint8_t* q = <uint8_t*>(<char*>blob)
    cdef Reader r
    cdef RecordFields f
    if len(envelope_id) != ID_SIZE:
        raise ValueError("envelope_id: expected 32 bytes")
    for i in range(n):
        start = offs[i]
        length = offs[i + 1] - start
        if start < 0 or length < 0 or offs[i + 1] > len(blob):
            raise ValueError(f"records[{i}]: offsets outside the blob")
        parse_header(&r, &f, q + start, length)
        if not parse_proof(&r, &f) or r.pos != length or f.proof.kind != PROOF_ENVELOPE:
            raise ValueError(f"records[{i}]: not an envelope member")
        memcpy(<uint8_t*>f.proof.envelope, PyBytes_AS_STRING(envelope_id), ID_SIZE)
