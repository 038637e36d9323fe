"""Native BLAKE3 and CRC-32C for the storage core (private API).

Owns the Python face of the hashing primitives in blake3_impl.c: BLAKE3-256
digests (record IDs) of one buffer, of many buffers, and of records packed
back to back in one buffer; CRC-32C checksums. Other Cython modules call the
same C functions directly through _hash.pxd.

Must never: hold the GIL while hashing; keep state between calls; compute
anything but standard BLAKE3 (hash mode, 32-byte output) and standard CRC-32C,
since both end up on disk and on the wire (a different result is a format
break, which is why the tests pin them to the `blake3` package and published
vectors); silently copy a non-contiguous buffer (it raises BufferError).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc

from stemedb._threads cimport pthread_create, pthread_join, pthread_t

import numpy as np


cdef enum:
    DIGEST_SIZE = 32
    # Items handed to stm_blake3_many per call: enough for it to sort by
    # length and fill its SIMD lanes, small enough for the stack.
    WINDOW = 512
    # Work below which another thread costs more than it saves, in the units
    # of _cost: about 100 us of hashing.
    MIN_COST_PER_THREAD = 1 << 18
    # A per-item cost, in bytes, so that many short items are not undercounted.
    ITEM_COST = 64


cdef struct ConcatTask:
    const uint8_t *buf
    const int64_t *offsets
    Py_ssize_t start            # items start..stop-1
    Py_ssize_t stop
    uint8_t *out                # digests of all items; this task writes its own rows


cdef void _hash_range(ConcatTask *task) noexcept nogil:
    cdef const uint8_t *ptrs[WINDOW]
    cdef size_t lens[WINDOW]
    cdef Py_ssize_t i = task.start, j, m
    while i < task.stop:
        m = min(<Py_ssize_t>WINDOW, task.stop - i)
        for j in range(m):
            ptrs[j] = task.buf + task.offsets[i + j]
            lens[j] = <size_t>(task.offsets[i + j + 1] - task.offsets[i + j])
        stm_blake3_many(ptrs, lens, <size_t>m, task.out + DIGEST_SIZE * i)
        i += m


cdef void *_hash_range_thread(void *task) noexcept nogil:
    _hash_range(<ConcatTask *>task)
    return NULL


cdef inline int64_t _cost(const int64_t *offsets, Py_ssize_t i) noexcept nogil:
    """Work to hash items 0..i-1: their bytes plus a per-item share."""
    return offsets[i] - offsets[0] + ITEM_COST * i


cdef Py_ssize_t _split(const int64_t *offsets, Py_ssize_t n, int64_t target) noexcept nogil:
    """First item index whose preceding work reaches target (_cost is increasing)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if _cost(offsets, mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef Py_ssize_t _first_bad_offset(const int64_t *offsets, Py_ssize_t count,
                                  int64_t size) noexcept nogil:
    """Index of the first offset outside [0, size] or below its predecessor; -1 if none."""
    cdef Py_ssize_t i
    for i in range(count):
        if offsets[i] < 0 or offsets[i] > size or (i > 0 and offsets[i] < offsets[i - 1]):
            return i
    return -1


cdef void _run_tasks(ConcatTask *tasks, pthread_t *tids, bint *started,
                     Py_ssize_t ntasks) noexcept nogil:
    """Runs tasks[1:] on new threads and tasks[0] on this one, then joins.
    A task whose thread cannot be created runs on this thread instead."""
    cdef Py_ssize_t k
    for k in range(1, ntasks):
        started[k] = pthread_create(&tids[k], NULL, _hash_range_thread, &tasks[k]) == 0
    _hash_range(&tasks[0])
    for k in range(1, ntasks):
        if started[k]:
            pthread_join(tids[k], NULL)
        else:
            _hash_range(&tasks[k])


def blake3(data):
    """BLAKE3-256 digest of any contiguous buffer."""
    cdef Py_buffer view
    cdef uint8_t digest[DIGEST_SIZE]
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            stm_blake3(<const uint8_t *>view.buf, <size_t>view.len, digest)
    finally:
        PyBuffer_Release(&view)
    return PyBytes_FromStringAndSize(<char *>digest, DIGEST_SIZE)


def blake3_many(items):
    """BLAKE3-256 digests of a sequence of buffers, as an (n, 32) uint8 array."""
    cdef list seq = items if type(items) is list else list(items)
    cdef Py_ssize_t n = len(seq), base, m, i, acquired = 0
    out = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
    if n == 0:
        return out
    cdef uint8_t[:, ::1] digests = out
    cdef Py_buffer *views = <Py_buffer *>malloc(WINDOW * sizeof(Py_buffer))
    cdef const uint8_t **ptrs = <const uint8_t **>malloc(WINDOW * sizeof(uint8_t *))
    cdef size_t *lens = <size_t *>malloc(WINDOW * sizeof(size_t))
    try:
        if views == NULL or ptrs == NULL or lens == NULL:
            raise MemoryError()
        # Buffers are taken a window at a time, so that memory stays bounded
        # and each exporter stays locked only while its window is hashed.
        for base in range(0, n, WINDOW):
            m = min(<Py_ssize_t>WINDOW, n - base)
            for i in range(m):
                PyObject_GetBuffer(seq[base + i], &views[i], PyBUF_SIMPLE)
                acquired += 1
                ptrs[i] = <const uint8_t *>views[i].buf
                lens[i] = <size_t>views[i].len
            with nogil:
                stm_blake3_many(ptrs, lens, <size_t>m, &digests[base, 0])
            while acquired:
                acquired -= 1
                PyBuffer_Release(&views[acquired])
    finally:
        while acquired:
            acquired -= 1
            PyBuffer_Release(&views[acquired])
        free(views)
        free(ptrs)
        free(lens)
    return out


def blake3_concat(buffer, offsets, Py_ssize_t threads=1):
    """BLAKE3-256 of buffer[offsets[i]:offsets[i+1]] for each i, as an (n, 32) uint8 array.

    offsets are n+1 non-decreasing integers within [0, len(buffer)];
    threads > 1 shares the work among that many native threads.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    arr = np.asarray(offsets)
    if arr.ndim != 1:
        raise ValueError(f"offsets must be one-dimensional, not {arr.ndim}-dimensional")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"offsets must be integers, not {arr.dtype}")
    cdef const int64_t[::1] off = np.ascontiguousarray(arr, dtype=np.int64)
    cdef Py_ssize_t count = off.shape[0]
    cdef Py_ssize_t n = count - 1 if count > 0 else 0
    out = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
    if count == 0:
        return out
    cdef uint8_t[:, ::1] digests = out

    cdef Py_buffer view
    cdef Py_ssize_t bad, k, ntasks
    cdef int64_t total
    cdef ConcatTask *tasks = NULL
    cdef pthread_t *tids = NULL
    cdef bint *started = NULL
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            bad = _first_bad_offset(&off[0], count, <int64_t>view.len)
        if bad >= 0:
            if off[bad] < 0 or off[bad] > view.len:
                raise ValueError(
                    f"offsets[{bad}] = {off[bad]} is outside the buffer of {view.len} bytes")
            raise ValueError(
                f"offsets[{bad}] = {off[bad]} is less than offsets[{bad - 1}] = {off[bad - 1]}")
        if n == 0:
            return out

        total = _cost(&off[0], n)
        ntasks = min(threads, n, max(<int64_t>1, total // MIN_COST_PER_THREAD))
        tasks = <ConcatTask *>malloc(ntasks * sizeof(ConcatTask))
        tids = <pthread_t *>malloc(ntasks * sizeof(pthread_t))
        started = <bint *>malloc(ntasks * sizeof(bint))
        if tasks == NULL or tids == NULL or started == NULL:
            raise MemoryError()
        for k in range(ntasks):
            tasks[k].buf = <const uint8_t *>view.buf
            tasks[k].offsets = &off[0]
            tasks[k].start = _split(&off[0], n, total // ntasks * k)
            tasks[k].stop = _split(&off[0], n, total // ntasks * (k + 1)) if k + 1 < ntasks else n
            tasks[k].out = &digests[0, 0]
        with nogil:
            _run_tasks(tasks, tids, started, ntasks)
    finally:
        PyBuffer_Release(&view)
        free(tasks)
        free(tids)
        free(started)
    return out


def crc32c(data, uint32_t crc=0):
    """CRC-32C of any contiguous buffer; pass a previous result as crc to continue it."""
    cdef Py_buffer view
    cdef uint32_t result
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            result = stm_crc32c(crc, <const uint8_t *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return result
