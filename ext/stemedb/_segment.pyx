"""Segment frames: building them for a batch, scanning and checking them.

Owns: the frame layout of docs/format.md ("Segment files"): the segment
header, the seal footer of a sealed segment (format version 2), record frames
and batch frames, their CRC-32C checksums, and the scans that recovery and
`verify` run over a mapped segment. Must never: open,
write or sync files (stemedb.engine does the I/O through its injectable file
layer), and never trust a length before checking that it fits.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memmove, memset

from stemedb._hash cimport stm_blake3, stm_crc32c
from stemedb._threads cimport pthread_create, pthread_join, pthread_t

import numpy as np

SEGMENT_MAGIC = b"STEMESEG"
SEGMENT_VERSION = 2           # 2: a sealed segment ends with a footer; 1 (no footer) is still read
SEGMENT_VERSIONS = (1, 2)
FOOTER_MAGIC = b"STEMEEND"
FOOTER_VERSION = 1
HEADER_SIZE = SEGMENT_HEADER_SIZE
FOOTER_SIZE = SEGMENT_FOOTER_SIZE
FRAME_HEADER = FRAME_HEADER_SIZE
ALIGN = FRAME_ALIGN
RECORD = FRAME_RECORD
BATCH = FRAME_BATCH
CLEAN = STOP_CLEAN
BAD = STOP_BAD


# Byte order: stemedb/_bytes.pxd, shared with the record and wire codecs.
from stemedb._bytes cimport get_u32, get_u64, put_u32, put_u64

cdef inline Py_ssize_t aligned(Py_ssize_t n) noexcept nogil:
    return (n + FRAME_ALIGN - 1) & ~(<Py_ssize_t>FRAME_ALIGN - 1)


cdef inline uint32_t frame_crc(const uint8_t* frame, uint32_t length) noexcept nogil:
    # Covers the header up to the crc field, the ID, and the payload.
    cdef uint32_t crc = stm_crc32c(0, frame, 12)
    return stm_crc32c(crc, frame + 16, 32 + length)


cdef inline void write_frame_header(uint8_t* p, uint8_t frame_type, uint32_t length,
                                    const uint8_t* record_id) noexcept nogil:
    put_u32(p, FRAME_MAGIC)
    p[4] = frame_type
    p[5] = 0
    p[6] = 0
    p[7] = 0
    put_u32(p + 8, length)
    if record_id != NULL:
        memcpy(p + 16, record_id, 32)
    else:
        memset(p + 16, 0, 32)


def frame_size(Py_ssize_t payload_length):
    """Bytes a frame with this payload occupies, padding included."""
    return aligned(FRAME_HEADER_SIZE + payload_length)


def segment_header(uint64_t number, uint64_t size, uint64_t created_us,
                   uint32_t version=SEGMENT_VERSION):
    """The 64-byte header that starts every segment file (version 1 only for tests)."""
    if version not in SEGMENT_VERSIONS:
        raise ValueError(f"segment version {version}: expected one of {SEGMENT_VERSIONS}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, SEGMENT_HEADER_SIZE)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memset(p, 0, SEGMENT_HEADER_SIZE)
    memcpy(p, <const char*>SEGMENT_MAGIC, 8)
    put_u32(p + 8, version)
    put_u64(p + 16, number)
    put_u64(p + 24, size)
    put_u64(p + 32, created_us)
    put_u32(p + 60, stm_crc32c(0, p, 60))
    return out


def parse_segment_header(data):
    """(number, size, created_us, version) from a segment header; ValueError saying what is wrong."""
    cdef const uint8_t[::1] view = data
    if view.shape[0] < SEGMENT_HEADER_SIZE:
        raise ValueError(f"segment header truncated: {view.shape[0]} bytes")
    cdef const uint8_t* p = &view[0]
    if bytes(data[:8]) != SEGMENT_MAGIC:
        raise ValueError("segment header: bad magic (not a StemeDB segment)")
    if get_u32(p + 60) != stm_crc32c(0, p, 60):
        raise ValueError("segment header: checksum mismatch")
    if get_u32(p + 8) not in SEGMENT_VERSIONS:
        raise ValueError(f"segment header: unknown version {get_u32(p + 8)}")
    return get_u64(p + 16), get_u64(p + 24), get_u64(p + 32), get_u32(p + 8)


def segment_footer(uint64_t number, uint64_t end, uint64_t records, uint64_t batches,
                   uint64_t first_batch, uint64_t last_batch, uint64_t successor, uint32_t digest):
    """The 128-byte seal written over the last bytes of a segment when it is sealed.

    `end` is the offset just past the last frame, `digest` the CRC-32C of
    bytes [HEADER_SIZE, end); see docs/format.md, "Segment footer".
    """
    cdef bytes out = PyBytes_FromStringAndSize(NULL, SEGMENT_FOOTER_SIZE)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memset(p, 0, SEGMENT_FOOTER_SIZE)
    memcpy(p, <const char*>FOOTER_MAGIC, 8)
    put_u32(p + 8, FOOTER_VERSION)
    put_u64(p + 16, number)
    put_u64(p + 24, end)
    put_u64(p + 32, records)
    put_u64(p + 40, batches)
    put_u64(p + 48, first_batch)
    put_u64(p + 56, last_batch)
    put_u64(p + 64, successor)
    put_u32(p + 72, digest)
    put_u32(p + SEGMENT_FOOTER_SIZE - 4, stm_crc32c(0, p, SEGMENT_FOOTER_SIZE - 4))
    return out


def parse_segment_footer(data):
    """The fields of a segment footer as a dict, or None if these bytes are all zero (unsealed).

    Raises ValueError saying what is wrong with a footer that is present but
    damaged (bad magic, checksum, version).
    """
    cdef const uint8_t[::1] view = data
    if view.shape[0] != SEGMENT_FOOTER_SIZE:
        raise ValueError(f"segment footer: {view.shape[0]} bytes, expected {SEGMENT_FOOTER_SIZE}")
    cdef const uint8_t* p = &view[0]
    cdef Py_ssize_t i
    for i in range(SEGMENT_FOOTER_SIZE):
        if p[i]:
            break
    else:
        return None
    if bytes(data[:8]) != FOOTER_MAGIC:
        raise ValueError("segment footer: bad magic")
    if get_u32(p + SEGMENT_FOOTER_SIZE - 4) != stm_crc32c(0, p, SEGMENT_FOOTER_SIZE - 4):
        raise ValueError("segment footer: checksum mismatch")
    if get_u32(p + 8) != FOOTER_VERSION:
        raise ValueError(f"segment footer: unknown version {get_u32(p + 8)}")
    return {
        "number": get_u64(p + 16), "end": get_u64(p + 24), "records": get_u64(p + 32),
        "batches": get_u64(p + 40), "first_batch": get_u64(p + 48),
        "last_batch": get_u64(p + 56), "successor": get_u64(p + 64), "digest": get_u32(p + 72),
    }


def build_batch(blob, offsets, ids, uint64_t batch_seq):
    """Frame a group-commit batch: one batch frame, then one record frame per record.

    `blob[offsets[i]:offsets[i+1]]` is record i's encoding and `ids[i]` its ID.
    Returns (frames, payload_positions, payload_lengths): positions are relative
    to the start of `frames`, so the caller adds the file offset it writes at.
    """
    cdef const uint8_t[::1] src = blob
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef const uint8_t[:, ::1] idv = ids
    cdef Py_ssize_t n = offs.shape[0] - 1, i, total, pos, length
    if idv.shape[0] != n:
        raise ValueError(f"ids: {idv.shape[0]} rows for {n} records")
    total = aligned(FRAME_HEADER_SIZE + BATCH_PAYLOAD_SIZE)
    for i in range(n):
        total += aligned(FRAME_HEADER_SIZE + offs[i + 1] - offs[i])
    positions = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.uint32)
    cdef int64_t[::1] posv = positions
    cdef uint32_t[::1] lenv = lengths
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* base = <uint8_t*>PyBytes_AS_STRING(out)
    cdef uint8_t* p
    with nogil:
        memset(base, 0, total)
        write_frame_header(base, FRAME_BATCH, BATCH_PAYLOAD_SIZE, NULL)
        put_u64(base + FRAME_HEADER_SIZE, batch_seq)
        put_u32(base + FRAME_HEADER_SIZE + 8, <uint32_t>n)
        put_u64(base + FRAME_HEADER_SIZE + 16, <uint64_t>total)
        put_u32(base + 12, frame_crc(base, BATCH_PAYLOAD_SIZE))
        pos = aligned(FRAME_HEADER_SIZE + BATCH_PAYLOAD_SIZE)
        for i in range(n):
            length = offs[i + 1] - offs[i]
            p = base + pos
            write_frame_header(p, FRAME_RECORD, <uint32_t>length, &idv[i, 0])
            if length:
                memcpy(p + FRAME_HEADER_SIZE, &src[offs[i]], length)
            put_u32(p + 12, frame_crc(p, <uint32_t>length))
            posv[i] = pos + FRAME_HEADER_SIZE
            lenv[i] = <uint32_t>length
            pos += aligned(FRAME_HEADER_SIZE + length)
    return out, positions, lengths


cdef int check_frame(const uint8_t* base, Py_ssize_t pos, Py_ssize_t end,
                     uint32_t* length_out) noexcept nogil:
    """1 if a valid frame starts at pos (and fits before end), 0 if not, -1 if clean end."""
    cdef uint32_t magic, length
    if end - pos < FRAME_HEADER_SIZE:
        return -1 if end - pos < 4 or get_u32(base + pos) == 0 else 0
    magic = get_u32(base + pos)
    if magic == 0:
        return -1
    if magic != FRAME_MAGIC or base[pos + 4] < FRAME_RECORD or base[pos + 4] > FRAME_BATCH:
        return 0
    length = get_u32(base + pos + 8)
    if <Py_ssize_t>length > end - pos - FRAME_HEADER_SIZE:
        return 0
    if get_u32(base + pos + 12) != frame_crc(base + pos, length):
        return 0
    if base[pos + 4] == FRAME_BATCH and length != BATCH_PAYLOAD_SIZE:
        return 0
    length_out[0] = length
    return 1


cdef object _grown(array, Py_ssize_t count, Py_ssize_t cap):
    """`array`'s first `count` items in a new array of `cap` (np.resize would tile-fill it)."""
    out = np.empty(cap, dtype=array.dtype)
    out[:count] = array[:count]
    return out


def scan(buffer, Py_ssize_t start, Py_ssize_t end, bint verify_ids=False):
    """Walk the frames of buffer[start:end].

    Returns a dict: `types`, `positions` (frame starts), `lengths` (payloads)
    as arrays, `stop` (offset where the walk ended), `reason` (CLEAN or BAD),
    and, with verify_ids, `id_mismatch` — frame positions whose stored ID is not
    the BLAKE3 of the record's content (the checksum matched, so the frame was
    written that way: a bug or a forged file, reported like corruption).
    """
    cdef const uint8_t[::1] view = buffer
    cdef const uint8_t* base = &view[0]
    # Room for frames of 256 bytes or more (records are ~200 B and batches add a frame): one growth at most
    cdef Py_ssize_t pos = start, count = 0, cap = 1024 + max(end - start, 0) // 256
    cdef uint32_t length = 0
    cdef int state = -1
    if end > view.shape[0]:
        raise ValueError(f"scan end {end} beyond buffer of {view.shape[0]} bytes")
    types = np.empty(cap, dtype=np.uint8)
    positions = np.empty(cap, dtype=np.int64)
    lengths = np.empty(cap, dtype=np.uint32)
    cdef uint8_t[::1] tv = types
    cdef int64_t[::1] pv = positions
    cdef uint32_t[::1] lv = lengths
    while True:
        with nogil:
            while pos < end and count < cap:
                state = check_frame(base, pos, end, &length)
                if state != 1:
                    break
                tv[count] = base[pos + 4]
                pv[count] = pos
                lv[count] = length
                count += 1
                pos += aligned(FRAME_HEADER_SIZE + length)
        if pos < end and count == cap and state == 1:
            cap *= 2
            types = _grown(types, count, cap)
            positions = _grown(positions, count, cap)
            lengths = _grown(lengths, count, cap)
            tv = types
            pv = positions
            lv = lengths
            state = -1
            continue
        break
    if pos >= end:
        state = -1
    result = {
        "types": types[:count].copy(),
        "positions": positions[:count].copy(),
        "lengths": lengths[:count].copy(),
        "stop": min(pos, end),
        "reason": STOP_BAD if state == 0 else STOP_CLEAN,
    }
    if verify_ids:
        result["id_mismatch"] = _id_mismatches(base, result["types"], result["positions"],
                                               result["lengths"])
    return result


cdef list _id_mismatches(const uint8_t* base, types, positions, lengths):
    cdef const uint8_t[::1] tv = types
    cdef const int64_t[::1] pv = positions
    cdef const uint32_t[::1] lv = lengths
    cdef Py_ssize_t i
    cdef uint8_t digest[32]
    cdef uint32_t content_length
    cdef const uint8_t* payload
    cdef list bad = []
    for i in range(tv.shape[0]):
        if tv[i] != FRAME_RECORD:
            continue
        payload = base + pv[i] + FRAME_HEADER_SIZE
        if lv[i] < 6:
            bad.append(pv[i])
            continue
        content_length = get_u32(payload + 2)
        if content_length > lv[i]:
            bad.append(pv[i])
            continue
        stm_blake3(payload, content_length, digest)
        if memcmp_(digest, base + pv[i] + 16, 32) != 0:
            bad.append(pv[i])
    return bad


cdef inline int memcmp_(const uint8_t* a, const uint8_t* b, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if a[i] != b[i]:
            return 1
    return 0


def batch_info(buffer, Py_ssize_t position):
    """(batch_seq, record_count, batch_bytes) of the batch frame at `position`."""
    cdef const uint8_t[::1] view = buffer
    cdef const uint8_t* p = &view[position + FRAME_HEADER_SIZE]
    return get_u64(p), get_u32(p + 8), get_u64(p + 16)


def find_frame(buffer, Py_ssize_t start, Py_ssize_t end, int frame_type=0):
    """First 8-aligned offset ≥ start where a valid frame (of frame_type, if given) begins, or -1.

    Used after damage to find where intact data resumes.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const uint8_t* base = &view[0]
    cdef Py_ssize_t pos = aligned(start)
    cdef uint32_t length
    cdef Py_ssize_t found = -1
    with nogil:
        while pos + FRAME_HEADER_SIZE <= end:
            if get_u32(base + pos) == FRAME_MAGIC and check_frame(base, pos, end, &length) == 1:
                if frame_type == 0 or base[pos + 4] == frame_type:
                    found = pos
                    break
            pos += FRAME_ALIGN
    return found


def count_record_headers(buffer, Py_ssize_t start, Py_ssize_t end):
    """8-aligned offsets in buffer[start:end] that begin with a record frame's magic and type.

    How many records a damaged region held, as far as their headers survive:
    used to report what was set aside, never to decide what is served.
    """
    cdef const uint8_t[::1] view = buffer
    cdef Py_ssize_t pos = aligned(start), count = 0
    if end > view.shape[0]:
        raise ValueError(f"end {end} beyond buffer of {view.shape[0]} bytes")
    with nogil:
        while pos + 5 <= end:
            if get_u32(&view[pos]) == FRAME_MAGIC and view[pos + 4] == FRAME_RECORD:
                count += 1
            pos += FRAME_ALIGN
    return count


def last_nonzero(buffer, Py_ssize_t start, Py_ssize_t end):
    """Offset just past the last non-zero byte in buffer[start:end], or start if all zero."""
    cdef const uint8_t[::1] view = buffer
    cdef Py_ssize_t pos = end
    cdef uint64_t word
    if end <= start:
        return start
    with nogil:
        # Byte by byte down to an 8-byte boundary, then a word at a time: the
        # tail of a fresh 64 MiB segment is all zeros and this runs on every open.
        while pos > start and (pos & 7) and view[pos - 1] == 0:
            pos -= 1
        if pos > start and not (pos & 7):
            while pos - 8 >= start:
                memcpy(&word, &view[pos - 8], 8)
                if word != 0:
                    break
                pos -= 8
        while pos > start and view[pos - 1] == 0:
            pos -= 1
    return pos


cdef enum:
    GATHER_THREADS = 2            # the cores of the machines we run on; more only splits it finer
    GATHER_MIN_PER_THREAD = 4096  # records below which a second thread costs more than it saves
    GATHER_AHEAD_ROW = 16         # records ahead whose location is prefetched
    GATHER_AHEAD_FRAME = 8        # records ahead whose frame (first 256 bytes) is prefetched


cdef struct GatherTask:
    const uint8_t** bases
    Py_ssize_t* sizes
    Py_ssize_t nseg
    const uint64_t* loc
    const uint32_t* lens
    const int64_t* want
    const int64_t* offs
    uint8_t* dst
    uint8_t* failed
    Py_ssize_t lo
    Py_ssize_t hi
    bint any_failed


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define stm_gather_prefetch(p) __builtin_prefetch((p), 0)
    #else
    #define stm_gather_prefetch(p) ((void)(p))
    #endif
    """
    void stm_gather_prefetch(const void *p) nogil


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE


cdef void _ask_huge_pages(uint8_t* start, Py_ssize_t size) noexcept nogil:
    # A large blob is fresh memory: written once, it takes a page fault per 4 KiB page
    # (some 50,000 for 1 M records) unless the kernel may back it with 2 MiB pages. Only a
    # hint: where it is refused (THP off, an old kernel), nothing changes.
    cdef size_t page = 1 << 21
    cdef size_t lo = (<size_t>start + page - 1) & ~(page - 1)
    cdef size_t hi = (<size_t>start + <size_t>size) & ~(page - 1)
    if size >= 4 * <Py_ssize_t>page and hi > lo:
        madvise(<void*>lo, hi - lo, MADV_HUGEPAGE)


cdef void *_gather_thread(void *task) noexcept nogil:
    _gather_range(<GatherTask *>task)
    return NULL


cdef void _gather_range(GatherTask* t) noexcept nogil:
    # Records are read in the order asked for, usually random: each one's location and
    # frame are a cache miss. Prefetching a few records ahead (the location 16 ahead, the
    # frame 8 ahead, whose location is in cache by then) keeps several misses in flight
    # instead of one after another. A prefetch never faults, so a damaged location is
    # harmless here; the checks below still decide.
    cdef Py_ssize_t i, offset
    cdef uint64_t where, ahead
    cdef uint32_t seg, length, frame_length
    cdef const uint8_t* frame
    for i in range(t.lo, t.hi):
        if i + GATHER_AHEAD_ROW < t.hi and t.want[i + GATHER_AHEAD_ROW] >= 0:
            stm_gather_prefetch(&t.loc[t.want[i + GATHER_AHEAD_ROW]])
            stm_gather_prefetch(&t.lens[t.want[i + GATHER_AHEAD_ROW]])
        if i + GATHER_AHEAD_FRAME < t.hi and t.want[i + GATHER_AHEAD_FRAME] >= 0:
            ahead = t.loc[t.want[i + GATHER_AHEAD_FRAME]]
            if (ahead >> 32) < <uint64_t>t.nseg:
                frame = t.bases[<Py_ssize_t>(ahead >> 32)] + <Py_ssize_t>(ahead & <uint64_t>0xFFFFFFFF)
                stm_gather_prefetch(frame)
                stm_gather_prefetch(frame + 64)
                stm_gather_prefetch(frame + 128)
                stm_gather_prefetch(frame + 192)
        if t.want[i] < 0:
            continue
        where = t.loc[t.want[i]]
        seg = <uint32_t>(where >> 32)
        offset = <Py_ssize_t>(where & <uint64_t>0xFFFFFFFF)
        length = t.lens[t.want[i]]
        if seg >= t.nseg or check_frame(t.bases[seg], offset, t.sizes[seg], &frame_length) != 1 \
                or frame_length != length:
            t.failed[i] = 1
            t.any_failed = True
            continue
        memcpy(t.dst + t.offs[i], t.bases[seg] + offset + FRAME_HEADER_SIZE, length)


def gather(list buffers, locations, lengths, rows):
    """Copy the payloads of record numbers `rows` into one blob, checking each frame.

    buffers[s] is segment s's mapping; locations/lengths are the columns.
    Returns (blob, offsets, bad): `bad` lists (row index, segment, offset) of
    frames that failed their checksum (their bytes are not in the blob; their
    slice is empty). A negative row (an absent ID) gets an empty slice too.
    Large requests are copied by two native threads (GIL released).
    """
    cdef const uint64_t[::1] loc = locations
    cdef const uint32_t[::1] lens = lengths
    cdef const int64_t[::1] want = np.ascontiguousarray(rows, dtype=np.int64)
    cdef Py_ssize_t n = want.shape[0], i, total = 0, pos, nseg = len(buffers), s, k, ntasks
    cdef const uint8_t[::1] view
    cdef int64_t[::1] offs
    cdef uint8_t[::1] failed
    cdef GatherTask tasks[GATHER_THREADS]
    cdef pthread_t tids[GATHER_THREADS]
    cdef bint started[GATHER_THREADS]
    cdef bint any_failed = False
    cdef uint8_t* dst
    cdef int64_t start, length
    cdef uint64_t where
    # Acquire each segment's buffer once, not once per record.
    cdef const uint8_t** bases = <const uint8_t**>malloc(max(nseg, 1) * sizeof(uint8_t*))
    cdef Py_ssize_t* sizes = <Py_ssize_t*>malloc(max(nseg, 1) * sizeof(Py_ssize_t))
    cdef list views = []
    if bases == NULL or sizes == NULL:
        free(bases)
        free(sizes)
        raise MemoryError()
    try:
        for s in range(nseg):
            view = buffers[s]
            views.append(view)
            bases[s] = &view[0]
            sizes[s] = view.shape[0]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offs = offsets
        failed_flags = np.zeros(max(n, 1), dtype=np.uint8)
        failed = failed_flags
        for i in range(n):
            offs[i] = total
            if want[i] >= 0:
                total += lens[want[i]]
        offs[n] = total
        out = PyBytes_FromStringAndSize(NULL, total)
        _ask_huge_pages(<uint8_t*>PyBytes_AS_STRING(out), total)
        ntasks = 1 if n < GATHER_MIN_PER_THREAD * 2 else GATHER_THREADS
        for k in range(ntasks):
            tasks[k].bases = bases
            tasks[k].sizes = sizes
            tasks[k].nseg = nseg
            tasks[k].loc = &loc[0]
            tasks[k].lens = &lens[0]
            tasks[k].want = &want[0]
            tasks[k].offs = &offs[0]
            tasks[k].dst = <uint8_t*>PyBytes_AS_STRING(out)
            tasks[k].failed = &failed[0]
            tasks[k].lo = n * k // ntasks
            tasks[k].hi = n * (k + 1) // ntasks
            tasks[k].any_failed = False
        with nogil:
            for k in range(1, ntasks):
                started[k] = pthread_create(&tids[k], NULL, _gather_thread, &tasks[k]) == 0
            _gather_range(&tasks[0])
            for k in range(1, ntasks):
                if started[k]:
                    pthread_join(tids[k], NULL)
                else:
                    _gather_range(&tasks[k])
        for k in range(ntasks):
            any_failed = any_failed or tasks[k].any_failed
    finally:
        free(bases)
        free(sizes)
    if not any_failed:
        return out, offsets, []
    # Rare: frames that failed their checks get empty slices; the rest move down.
    bad = []
    pos = 0
    dst = <uint8_t*>PyBytes_AS_STRING(out)
    for i in range(n):
        start = offs[i]
        length = offs[i + 1] - start
        offs[i] = pos
        if failed[i]:
            where = loc[want[i]]
            bad.append((i, <uint32_t>(where >> 32), <Py_ssize_t>(where & <uint64_t>0xFFFFFFFF)))
            continue
        if length:
            memmove(dst + pos, dst + start, length)
        pos += length
    offs[n] = pos
    return out[:pos], offsets, bad


def read_ids(buffer, positions):
    """The IDs stored in the record frames at `positions`, as an (n, 32) uint8 array."""
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64)
    cdef Py_ssize_t i, n = pos.shape[0]
    out = np.empty((n, 32), dtype=np.uint8)
    cdef uint8_t[:, ::1] o = out
    for i in range(n):
        if pos[i] < 0 or pos[i] + FRAME_HEADER_SIZE > view.shape[0]:
            raise ValueError(f"positions[{i}] = {pos[i]} is outside the buffer")
        memcpy(&o[i, 0], &view[pos[i] + 16], 32)
    return out


def tail_runs(buffer, positions, lengths):
    """Runs of equal last-32-byte payload tails among the record frames at `positions`.

    For envelope members the tail is the envelope ID their proof names, and
    the members of one envelope sit together: returns (starts, tails) — the
    index where each run begins, and that run's tail as a (runs, 32) array.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64)
    cdef const uint32_t[::1] lens = np.ascontiguousarray(lengths, dtype=np.uint32)
    cdef Py_ssize_t i, n = pos.shape[0], end, previous = -1
    if lens.shape[0] != n:
        raise ValueError(f"lengths: {lens.shape[0]} for {n} positions")
    for i in range(n):
        if pos[i] < 0 or lens[i] < 32 or pos[i] + FRAME_HEADER_SIZE + lens[i] > view.shape[0]:
            raise ValueError(f"positions[{i}] = {pos[i]} (length {lens[i]}) is outside the buffer")
    starts = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] sv = starts
    cdef Py_ssize_t runs = 0
    with nogil:
        for i in range(n):
            end = pos[i] + FRAME_HEADER_SIZE + lens[i]
            if previous < 0 or memcmp(&view[end - 32], &view[previous - 32], 32) != 0:
                sv[runs] = i
                runs += 1
            previous = end
    starts = starts[:runs].copy()
    tails = np.empty((runs, 32), dtype=np.uint8)
    cdef uint8_t[:, ::1] tv = tails
    cdef const int64_t[::1] first = starts
    for i in range(runs):
        end = pos[first[i]] + FRAME_HEADER_SIZE + lens[first[i]]
        memcpy(&tv[i, 0], &view[end - 32], 32)
    return starts, tails


def frame_payload(buffer, Py_ssize_t position, uint32_t length):
    """The payload of the record frame at `position`, or None if the frame fails its checks."""
    cdef const uint8_t[::1] view = buffer
    cdef uint32_t frame_length
    if position < 0 or position >= view.shape[0]:
        return None
    if check_frame(&view[0], position, view.shape[0], &frame_length) != 1 or frame_length != length:
        return None
    return PyBytes_FromStringAndSize(<const char*>&view[position + FRAME_HEADER_SIZE], length)
