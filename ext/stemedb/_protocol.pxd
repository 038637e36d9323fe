# Header of the wire-protocol codec (docs/protocol.md).
#
# Every byte the server and the clients exchange is parsed here, through the
# bounds-checked Cursor, and written here; byte order lives in _bytes.pxd
# (little-endian, like docs/format.md).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from stemedb._codec cimport ID_SIZE  # record IDs travel in GET, PUT replies and envelope proofs


cdef enum:
    HEADER_SIZE = 12            # magic:2 opcode:u8 flags:u8 request_id:u32 length:u32
    MAGIC_0 = 0x53              # 'S'
    MAGIC_1 = 0x44              # 'D'


cdef enum FrameFlag:
    FLAG_RESPONSE = 1           # set on every server -> client frame, never on a request
    FLAG_MORE = 2               # more response frames follow for this request id
    FLAGS_KNOWN = 15            # any other bit set is a protocol violation
    FLAG_ACKS_ONE = 4           # PUT / VOTE / EPOCH request: acknowledge once durable on one replica
    FLAG_ACKS_ALL = 8           # ... once durable on every live replica (at most one of the two)
    FLAGS_ACKS = 12


cdef struct Cursor:             # a payload being parsed; every read checks `end`
    const uint8_t* base         # first byte of the payload
    Py_ssize_t pos              # next byte to read
    Py_ssize_t end              # one past the last byte


cdef class Frame:
    cdef readonly int opcode            # Opcode (see _protocol.pyx and docs/protocol.md)
    cdef readonly int flags             # FrameFlag bits
    cdef readonly uint32_t request_id   # chosen by the client; 0 = not tied to a request
    cdef readonly bytes payload         # exactly `length` bytes


cdef class FrameReader:
    cdef bytearray _buffer              # received bytes not yet handed out as frames
    cdef Py_ssize_t _start              # offset of the first unconsumed byte of _buffer
    cdef public Py_ssize_t max_payload  # frames declaring more are refused from the header alone
    cdef bint _from_server              # True in a client: frames must carry FLAG_RESPONSE
    cdef readonly uint64_t frames_read  # frames handed out so far
    cdef readonly uint64_t bytes_fed    # bytes received so far
    cdef Frame _parse_one(self)
