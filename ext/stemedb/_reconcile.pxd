# Header of range-based set reconciliation (_reconcile.pyx; docs/protocol.md, "Replication").
#
# A RangeTree is an ordered set of record numbers, ordered by the key
# (timestamp in ms, ID) read from the engine's columns, as a B+tree whose
# inner nodes keep, for every child, the count and the sum (mod 2^256) of the
# IDs below it. The prefix sum below any bound is then one root-to-leaf walk,
# so the fingerprint of any range costs O(log n), and an insert updates the
# sums on its path in O(log n). The tree keeps only record numbers (4 bytes an
# item); the keys stay in the engine's columns and are passed in with each call.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    LEAF_CAP = 64               # record numbers per leaf
    INNER_CAP = 32              # children per inner node
    MAX_DEPTH = 16              # 32^15 leaves is far past any store


ctypedef struct Sum256:
    uint64_t w[4]               # little-endian 64-bit words of a 256-bit integer


ctypedef struct Leaf:
    uint32_t n                  # items held
    uint32_t rows[LEAF_CAP]     # record numbers, ascending by key


ctypedef struct Inner:
    uint32_t n                  # children held
    uint32_t level              # 1: children are leaves; k > 1: inner nodes of level k - 1
    uint32_t child[INNER_CAP]   # index into the leaf or inner pool
    uint32_t first[INNER_CAP]   # record number of the smallest item below child i
    uint64_t count[INNER_CAP]   # items below child i
    Sum256 sum[INNER_CAP]       # sum of the IDs below child i


ctypedef struct Columns:
    const uint64_t* timestamps  # µs, indexed by record number
    const uint8_t* ids          # 32 bytes per record number
    uint64_t rows               # rows the two arrays hold


ctypedef struct Bound:
    # Items with key < bound lie below it. A bound is (timestamp ms, ID prefix):
    # key < bound iff key.ms < ms, or key.ms == ms and key.id < prefix ‖ zeros.
    bint infinite               # above every key
    uint64_t ms
    uint32_t prefix_len         # 0..32
    uint8_t prefix[32]


ctypedef struct Growing:
    # One tree's leaves as a bulk load fills them, record numbers in ascending key order:
    # LEAF_CAP - 1 a leaf (as appends leave them), with each leaf's sum of IDs.
    Leaf* leaves
    Sum256* sums
    uint64_t leaf_count
    uint64_t leaf_cap
    uint64_t size
    uint32_t last


cdef class RangeTree:
    cdef Leaf* _leaves
    cdef Inner* _inners
    cdef uint32_t _leaf_count, _leaf_cap
    cdef uint32_t _inner_count, _inner_cap
    cdef uint32_t _root          # a leaf index when _height == 0, else an inner index
    cdef uint32_t _height        # 0: the root is a leaf
    cdef uint64_t _size
    cdef uint32_t _last          # record number of the largest key (valid when _size > 0)
    cdef bint _engine            # kept by the engine (ScopeTrees): add() is refused

    cdef uint32_t _new_leaf(self) except? 0xFFFFFFFF nogil
    cdef uint32_t _new_inner(self, uint32_t level) except? 0xFFFFFFFF nogil
    cdef void _leaf_summary(self, uint32_t leaf, const Columns* c, uint32_t start,
                            uint64_t* count, Sum256* total) noexcept nogil
    cdef void _child_summary(self, const Columns* c, uint32_t child, uint32_t level,
                             uint32_t* first, uint64_t* count, Sum256* total) noexcept nogil
    # Inserts one record number (a no-op if held), splitting nodes upwards.
    cdef int _insert(self, const Columns* c, uint32_t row) except -1 nogil
    # Appends a record number whose key is above every held key (the common case: time order).
    cdef int _append(self, const Columns* c, uint32_t row) except -1 nogil
    # Takes over leaves filled in key order (see Growing) and builds the inner nodes above them.
    cdef int _adopt(self, Growing* g, const Columns* c) except -1 nogil
    cdef int _split_leaf(self, const Columns* c, uint32_t leaf_index, uint32_t* path,
                         uint32_t* slot, uint32_t depth, bint appending) except -1 nogil
    cdef int _attach(self, const Columns* c, uint32_t new_child, uint32_t new_first,
                     uint64_t new_count, const Sum256* new_sum, uint32_t old_child,
                     uint32_t* path, uint32_t* slot, uint32_t depth, uint32_t level) except -1 nogil
    # (count, sum) of the items below a bound; the sum of the first k items; rank; select.
    cdef void _prefix(self, const Columns* c, const Bound* b, uint64_t* count, Sum256* total) noexcept nogil
    cdef void _prefix_rank(self, const Columns* c, uint64_t k, Sum256* total) noexcept nogil
    cdef uint64_t _rank(self, const Columns* c, const Bound* b) noexcept nogil
    cdef uint32_t _select(self, uint64_t k) noexcept nogil
    cdef void _walk_into(self, uint64_t lo, uint64_t hi, uint32_t* out) noexcept nogil
    cdef tuple _check_node(self, const Columns* c, uint32_t node, uint32_t level)


cdef class ScopeTrees:
    # The range trees an engine keeps (docs/replication.md): scope 0, and per partition.
    cdef readonly RangeTree whole       # scope 0: every record
    cdef readonly uint32_t partitions   # 0: a store not opened for a cluster (scope 0 only)
    cdef list _scoped                   # scope - 1 -> RangeTree or None (scope 1 global, 2 + p)
    cdef RangeTree _scoped_tree(self, uint32_t scope)
    cdef int _load(self, const uint32_t* rows, uint64_t n, const Columns* c, const uint8_t* kinds,
                   const uint64_t* places, bint whole) except -1
