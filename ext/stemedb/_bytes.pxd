# Little-endian loads and stores: byte order lives here and only here.
#
# docs/format.md fixes every integer and float of a record and of a segment
# frame as little-endian, and docs/protocol.md does the same for the wire, so
# _codec, _segment and _protocol all cimport these instead of shifting bytes
# themselves. Each put_* stores at p and returns the byte after it (an encoder
# is a chain of stores); each get_* loads the value at p.
#
# None of them checks bounds: a pointer reaches them only from a bounds-checked
# reader (_codec's Reader, _protocol's Cursor) or from a buffer sized up front.
# The shifts are portable; compilers turn them into single loads and stores on
# little-endian machines.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef enum:
    SIZE_U8 = 1
    SIZE_U16 = 2
    SIZE_U32 = 4
    SIZE_U64 = 8
    SIZE_F32 = 4                # IEEE 754 binary32
    SIZE_F64 = 8                # IEEE 754 binary64


cdef inline uint8_t* put_u8(uint8_t* p, uint8_t v) noexcept nogil:
    p[0] = v
    return p + SIZE_U8

cdef inline uint8_t* put_u16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    return p + SIZE_U16

cdef inline uint8_t* put_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)
    return p + SIZE_U32

cdef inline uint8_t* put_u64(uint8_t* p, uint64_t v) noexcept nogil:
    put_u32(p, <uint32_t>v)
    put_u32(p + SIZE_U32, <uint32_t>(v >> 32))
    return p + SIZE_U64

cdef inline uint8_t* put_f32(uint8_t* p, float v) noexcept nogil:
    cdef uint32_t bits
    memcpy(&bits, &v, SIZE_F32)
    return put_u32(p, bits)

cdef inline uint8_t* put_f64(uint8_t* p, double v) noexcept nogil:
    cdef uint64_t bits
    memcpy(&bits, &v, SIZE_F64)
    return put_u64(p, bits)

cdef inline uint16_t get_u16(const uint8_t* p) noexcept nogil:
    return <uint16_t>p[0] | (<uint16_t>p[1] << 8)

cdef inline uint32_t get_u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline uint64_t get_u64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))

cdef inline float get_f32(const uint8_t* p) noexcept nogil:
    cdef uint32_t bits = get_u32(p)
    cdef float v
    memcpy(&v, &bits, SIZE_F32)
    return v

cdef inline double get_f64(const uint8_t* p) noexcept nogil:
    cdef uint64_t bits = get_u64(p)
    cdef double v
    memcpy(&v, &bits, SIZE_F64)
    return v
