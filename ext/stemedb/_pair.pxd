# Header of the per-pair lens work (_pair.pyx): the PairQuery class, so that the
# single-query path (_single.pyx) runs one pair's selection, weights and pick
# as a C call. Nothing else here: the kernels stay private to _pair.pyx.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

ctypedef const uint8_t[:, :] IdColumn


cdef class PairQuery:
    cdef object _arrays               # the column mapping of the last call
    cdef dict _held                   # name -> the array each view below was taken of
    cdef const uint64_t[:] _pair, _subject, _predicate, _timestamp, _target, _epoch, _object
    cdef IdColumn _ids
    cdef const uint8_t[:] _lifecycle, _source_class
    cdef const float[:] _confidence
    cdef const double[:] _half_lives
    cdef object _levels
    cdef const uint64_t[:] _base_keys, _tail_keys
    cdef const int64_t[:] _base_starts, _tail_starts
    cdef const uint32_t[:] _base_rows, _tail_rows
    cdef const uint8_t[:] _base_flags, _tail_flags

    cdef bint _stale(self, object arrays, str name)
    cdef int _refresh(self, object arrays, levels) except -1
    # As `resolve` (its docstring), and *winner_row / *winner_object set to the winner's record
    # number and object key (-1 and 0 when there is none): (candidates, weights, winner index or -1, confidence, conflict score).
    cdef tuple run(self, object arrays, levels, Py_ssize_t scan_lo, Py_ssize_t scan_hi, uint64_t key,
                   uint64_t subject_key, uint64_t predicate_key, uint64_t as_of, uint64_t epoch_key,
                   int64_t lifecycle_mask, bint decay, double now, int mode,
                   Py_ssize_t* winner_row, uint64_t* winner_object)
