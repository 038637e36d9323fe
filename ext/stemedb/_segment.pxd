# Header of the segment frame codec (docs/format.md, "Segment files").
#
# A frame is 8-byte aligned so that a resynchronising scan after damage only
# has to try every eighth offset.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    SEGMENT_HEADER_SIZE = 64        # magic, version, number, size, created, crc
    SEGMENT_FOOTER_SIZE = 128       # version 2: the seal, in the file's last 128 bytes
    FRAME_HEADER_SIZE = 48          # magic, type, reserved, length, crc, id
    FRAME_ALIGN = 8                 # frames start at multiples of 8
    BATCH_PAYLOAD_SIZE = 24         # batch_seq:u64 record_count:u32 reserved:u32 batch_bytes:u64
    FRAME_MAGIC = 0x31465453        # bytes "STF1"


cdef enum FrameType:
    FRAME_RECORD = 1                # payload is one encoded record; id is its ID
    FRAME_BATCH = 2                 # opens a group-commit batch; id is all zero


cdef enum ScanStop:
    STOP_CLEAN = 0                  # zero magic or end of the scanned range: no more frames
    STOP_BAD = 1                    # a frame failed its magic, length or checksum


# 1 if a valid record or batch frame starts at pos (and fits before end), 0 if
# not, -1 at a clean end; *length_out is the frame's payload length.
cdef int check_frame(const uint8_t* base, Py_ssize_t pos, Py_ssize_t end,
                     uint32_t* length_out) noexcept nogil
