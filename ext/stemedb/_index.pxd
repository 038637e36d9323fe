# Header of the in-memory indexes of the storage engine (_index.pyx).
#
# Both tables are open-addressing, linear probing, power-of-two capacity,
# and keep everything in numpy arrays (no Python object per record), so that
# the engine can persist them as plain arrays and the probes run without the
# GIL. Other Cython modules may cimport the classes to read the fields; only
# the methods change them.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from *:
    """
    #define STM_NO_RECORD 0xFFFFFFFFu
    """
    # "No record": marks an empty IdIndex slot and the end of a posting chain,
    # so it can never be a real record number.
    const uint32_t STM_NO_RECORD


cdef class _Guarded:
    # Many readers or one writer. Readers release the GIL while they probe,
    # and a writer may replace or rewrite the arrays, so a writer running
    # next to anyone else raises RuntimeError rather than corrupt an index.
    cdef Py_ssize_t _readers    # calls now reading the arrays without the GIL
    cdef bint _writing          # a call is changing the arrays; no other call may use them

    cdef int _begin_read(self) except -1
    cdef void _end_read(self) noexcept
    cdef int _begin_write(self) except -1
    cdef void _end_write(self) noexcept


cdef class IdIndex(_Guarded):
    # One slot per uint64: bits 63..32 are the top half of the ID's key (its
    # first 8 bytes read little-endian), bits 31..0 the record number, or
    # STM_NO_RECORD in an empty slot. Packing both into one word means a probe
    # touches one cache line, and 8 bytes a slot keeps the index small.
    cdef uint64_t[::1] _slots
    cdef int _bits              # capacity = 1 << _bits; a key's home slot is its top _bits bits
    cdef Py_ssize_t _count      # occupied slots = distinct IDs held

    # out[i] = record number of ids[i] or -1; raises if a candidate has no row in all_ids.
    cdef int _lookup_into(self, const uint8_t[:, ::1] ids, const uint8_t[:, ::1] all_ids,
                          int64_t[::1] out) except -1
    # is_new[i] = 1 where ids[i] is neither held nor equal to an earlier ids[j].
    cdef int _mark_new(self, const uint8_t[:, ::1] ids, const uint8_t[:, ::1] all_ids,
                       uint8_t[::1] is_new) except -1
    # Grows the table (x2 steps) until `count` IDs fit within the load limit.
    cdef int _reserve(self, uint64_t count) except -1
    # The record number of one 32-byte ID, or -1; `all_ids` holds `rows` IDs of 32 bytes.
    # Raises ValueError (returns -2) when a candidate has no row there.
    cdef int64_t find_one(self, const uint8_t *id, const uint8_t *all_ids, size_t rows) except -2
    # The record numbers whose slots match the top half of id's key (the only records that
    # can be id; a caller that can read each one's ID elsewhere tells them apart without
    # the ID column): their count, or -1 when there are more than max_out.
    cdef Py_ssize_t candidates(self, const uint8_t *id, int64_t *out, Py_ssize_t max_out) except -2


cdef class PostingIndex(_Guarded):
    # Row per slot: [key, head | count << 32]. count == 0 marks an empty slot
    # (every key present has at least one record), so no key value is reserved.
    cdef uint64_t[:, ::1] _table
    # _prev[r]: the previous record number with the same key as record r, or
    # STM_NO_RECORD (r is the first with its key, or has no key here). Sized
    # past the highest record number added; unused entries hold STM_NO_RECORD.
    cdef uint32_t[::1] _prev
    cdef int _bits              # table capacity = 1 << _bits
    cdef Py_ssize_t _keys       # occupied slots = distinct keys
    cdef Py_ssize_t _entries    # (key, record) pairs added = sum of the counts
    cdef int64_t _last          # highest record number added, -1 while empty

    # Extends _prev (x1.25 steps) to cover record numbers below `needed`.
    cdef int _grow_prev(self, Py_ssize_t needed) except -1
    # Doubles the table.
    cdef int _grow_table(self) except -1
