"""Range-based set reconciliation: the fingerprint tree and the message kernel (private API).

Owns: RangeTree (an ordered set of record numbers keyed by (timestamp ms, ID)
with O(log n) inserts and range fingerprints) and the byte-level work of one
reconciliation step: decoding a peer's range list, comparing it with the
local tree, and encoding the reply (docs/protocol.md, "Replication").
Must never: read records, touch files or sockets, or decide what to do with
the records it finds missing (the session in stemedb.replication does).

And ScopeTrees, the trees an engine keeps beside its ID index: the whole
store (scope 0) and, in a store opened for a cluster, one per partition
(scope 1 the global partition, 2 + p partition p), updated in one call per
indexed batch, persisted as in-order record numbers and bulk-loaded.

Threads: a RangeTree is not locked; the engine changes it only under its
state lock and readers take that lock too.
Error handling: a malformed message raises ProtocolError naming the field
and the byte offset; nothing in the tree changes on any error.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from stemedb._codec cimport KIND_ASSERTION, KIND_VOTE
from stemedb._hash cimport stm_blake3

import numpy as np

from stemedb.errors import CorruptionError, ProtocolError

# Range modes: the top 3 bits of a range's head byte (docs/protocol.md, "Range list").
cdef enum:
    MODE_SKIP = 0
    MODE_FINGERPRINT_3 = 1      # a 3-, 4-, 8- or 16-byte fingerprint follows
    MODE_FINGERPRINT_4 = 2
    MODE_FINGERPRINT_8 = 3
    MODE_FINGERPRINT_16 = 4
    MODE_IDLIST = 5
    MODE_NEED = 6

MODES = {"skip": MODE_SKIP, "fingerprint3": MODE_FINGERPRINT_3, "fingerprint4": MODE_FINGERPRINT_4,
         "fingerprint8": MODE_FINGERPRINT_8, "fingerprint16": MODE_FINGERPRINT_16,
         "idlist": MODE_IDLIST, "need": MODE_NEED}

cdef enum:
    ID_SIZE = 32
    SALT_SIZE = 8
    MAX_FINGERPRINT = 16
    MAX_PREFIX = 8              # longest ID window an IDLIST may use
    MAX_RANGES = 1 << 20        # ranges one message may hold
    MAX_LIST = 1 << 16          # entries one IDLIST may hold


# ---------------------------------------------------------------- 256-bit sums

cdef inline uint64_t _le64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


cdef inline void _put_le64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline void _sum_zero(Sum256* s) noexcept nogil:
    s.w[0] = 0
    s.w[1] = 0
    s.w[2] = 0
    s.w[3] = 0


cdef inline void _sum_add(Sum256* s, const Sum256* t) noexcept nogil:
    cdef uint64_t carry = 0, r1, r2
    cdef int i
    for i in range(4):
        r1 = s.w[i] + t.w[i]
        r2 = r1 + carry
        carry = (r1 < s.w[i]) | (r2 < r1)
        s.w[i] = r2


cdef inline void _sum_sub(Sum256* s, const Sum256* t) noexcept nogil:
    cdef uint64_t borrow = 0, r1, r2
    cdef int i
    for i in range(4):
        r1 = s.w[i] - t.w[i]
        r2 = r1 - borrow
        borrow = (s.w[i] < t.w[i]) | (r1 < borrow)
        s.w[i] = r2


cdef inline void _sum_add_id(Sum256* s, const uint8_t* record_id) noexcept nogil:
    cdef Sum256 t
    t.w[0] = _le64(record_id)
    t.w[1] = _le64(record_id + 8)
    t.w[2] = _le64(record_id + 16)
    t.w[3] = _le64(record_id + 24)
    _sum_add(s, &t)


cdef void _fingerprint(const uint8_t* salt, uint64_t count, const Sum256* s,
                       uint8_t* out, int length) noexcept nogil:
    # BLAKE3(salt ‖ sum as 32 bytes little-endian ‖ count u64 LE), first `length` bytes.
    cdef uint8_t data[SALT_SIZE + 32 + 8]
    cdef uint8_t digest[32]
    cdef int i
    memcpy(data, salt, SALT_SIZE)
    for i in range(4):
        _put_le64(data + SALT_SIZE + 8 * i, s.w[i])
    _put_le64(data + SALT_SIZE + 32, count)
    stm_blake3(data, SALT_SIZE + 32 + 8, digest)
    memcpy(out, digest, length)


# ---------------------------------------------------------------- keys

cdef inline uint64_t _ms(const Columns* c, uint32_t row) noexcept nogil:
    return c.timestamps[row] // 1000


cdef inline const uint8_t* _id(const Columns* c, uint32_t row) noexcept nogil:
    return c.ids + <size_t>row * ID_SIZE


cdef inline int _cmp_rows(const Columns* c, uint32_t a, uint32_t b) noexcept nogil:
    cdef uint64_t ma = _ms(c, a), mb = _ms(c, b)
    if ma != mb:
        return -1 if ma < mb else 1
    return memcmp(_id(c, a), _id(c, b), ID_SIZE)


cdef inline bint _below(const Columns* c, uint32_t row, const Bound* b) noexcept nogil:
    """True if the key of `row` is below the bound."""
    cdef uint64_t m
    if b.infinite:
        return True
    m = _ms(c, row)
    if m != b.ms:
        return m < b.ms
    return b.prefix_len > 0 and memcmp(_id(c, row), b.prefix, b.prefix_len) < 0


cdef void _bound_between(const Columns* c, uint32_t before, uint32_t after, Bound* out) noexcept nogil:
    """The shortest bound above `before` and at or below `after` (before < after)."""
    cdef const uint8_t* a = _id(c, before)
    cdef const uint8_t* b = _id(c, after)
    cdef uint32_t k = 0
    out.infinite = False
    out.ms = _ms(c, after)
    if _ms(c, before) < out.ms:
        out.prefix_len = 0
        return
    while k < ID_SIZE - 1 and a[k] == b[k]:
        k += 1
    out.prefix_len = k + 1
    memcpy(out.prefix, b, k + 1)


cdef inline int _cmp_bounds(const Bound* a, const Bound* b) noexcept nogil:
    cdef uint8_t pa[32]
    cdef uint8_t pb[32]
    if a.infinite or b.infinite:
        return <int>a.infinite - <int>b.infinite
    if a.ms != b.ms:
        return -1 if a.ms < b.ms else 1
    memset(pa, 0, 32)
    memset(pb, 0, 32)
    memcpy(pa, a.prefix, a.prefix_len)
    memcpy(pb, b.prefix, b.prefix_len)
    return memcmp(pa, pb, 32)


# ---------------------------------------------------------------- the tree

cdef inline uint32_t _grown(uint32_t capacity) noexcept nogil:
    # x1.25 (not x2): the pools are most of the tree's memory.
    return capacity + capacity // 4 + 4


cdef class RangeTree:
    """An ordered set of record numbers by (timestamp ms, ID), with range sums.

    Keys are read from the engine's columns, passed to every call as
    `timestamps` (uint64 µs, one per record number) and `ids` ((n, 32)
    uint8): the tree keeps 4 bytes an item.
    """

    def __cinit__(self):
        # Small at first: a cluster store keeps one tree per partition, many of them empty.
        self._leaf_cap = 1
        self._inner_cap = 1
        self._leaves = <Leaf*>malloc(self._leaf_cap * sizeof(Leaf))
        self._inners = <Inner*>malloc(self._inner_cap * sizeof(Inner))
        if self._leaves == NULL or self._inners == NULL:
            raise MemoryError()
        self._leaf_count = 1
        self._inner_count = 0
        self._leaves[0].n = 0
        self._root = 0
        self._height = 0
        self._size = 0
        self._last = 0
        self._engine = False

    def __dealloc__(self):
        free(self._leaves)
        free(self._inners)

    def __len__(self):
        return self._size

    def memory_bytes(self):
        """Bytes held by the node pools."""
        return self._leaf_cap * sizeof(Leaf) + self._inner_cap * sizeof(Inner)

    # -- building --------------------------------------------------------

    cdef uint32_t _new_leaf(self) except? 0xFFFFFFFF nogil:
        cdef Leaf* grown
        if self._leaf_count == self._leaf_cap:
            grown = <Leaf*>realloc(self._leaves, _grown(self._leaf_cap) * sizeof(Leaf))
            if grown == NULL:
                with gil:
                    raise MemoryError()
            self._leaves = grown
            self._leaf_cap = _grown(self._leaf_cap)
        self._leaves[self._leaf_count].n = 0
        self._leaf_count += 1
        return self._leaf_count - 1

    cdef uint32_t _new_inner(self, uint32_t level) except? 0xFFFFFFFF nogil:
        cdef Inner* grown
        if self._inner_count == self._inner_cap:
            grown = <Inner*>realloc(self._inners, _grown(self._inner_cap) * sizeof(Inner))
            if grown == NULL:
                with gil:
                    raise MemoryError()
            self._inners = grown
            self._inner_cap = _grown(self._inner_cap)
        self._inners[self._inner_count].n = 0
        self._inners[self._inner_count].level = level
        self._inner_count += 1
        return self._inner_count - 1

    cdef void _leaf_summary(self, uint32_t leaf, const Columns* c, uint32_t start,
                            uint64_t* count, Sum256* total) noexcept nogil:
        cdef Leaf* node = &self._leaves[leaf]
        cdef uint32_t i
        count[0] = node.n - start
        _sum_zero(total)
        for i in range(start, node.n):
            _sum_add_id(total, _id(c, node.rows[i]))

    cdef int _append(self, const Columns* c, uint32_t row) except -1 nogil:
        # Down the rightmost path: no key comparisons; `first` keys do not change.
        cdef uint32_t path[MAX_DEPTH]
        cdef uint32_t slot[MAX_DEPTH]
        cdef uint32_t depth = 0, node = self._root, level = self._height, last
        cdef Inner* inner
        cdef Leaf* leaf
        cdef Sum256 one
        _sum_zero(&one)
        _sum_add_id(&one, _id(c, row))
        while level > 0:
            inner = &self._inners[node]
            last = inner.n - 1
            inner.count[last] += 1
            _sum_add(&inner.sum[last], &one)
            path[depth] = node
            slot[depth] = last
            depth += 1
            node = inner.child[last]
            level -= 1
        leaf = &self._leaves[node]
        leaf.rows[leaf.n] = row
        leaf.n += 1
        self._size += 1
        self._last = row
        if leaf.n == LEAF_CAP:
            self._split_leaf(c, node, path, slot, depth, True)
        return 0

    cdef int _insert(self, const Columns* c, uint32_t row) except -1 nogil:
        cdef uint32_t path[MAX_DEPTH]
        cdef uint32_t slot[MAX_DEPTH]
        cdef uint32_t depth = 0, node = self._root, level, i, lo, hi, mid, pos
        cdef Inner* inner
        cdef Leaf* leaf
        cdef int cmp
        if self._size == 0 or _cmp_rows(c, self._last, row) < 0:
            return self._append(c, row)
        # Descend: in each inner node, the last child whose first key is <= row.
        level = self._height
        while level > 0:
            inner = &self._inners[node]
            i = 0
            lo = 1
            hi = inner.n
            while lo < hi:
                mid = (lo + hi) // 2
                if _cmp_rows(c, inner.first[mid], row) <= 0:
                    lo = mid + 1
                else:
                    hi = mid
            i = lo - 1
            path[depth] = node
            slot[depth] = i
            depth += 1
            node = inner.child[i]
            level -= 1
        leaf = &self._leaves[node]
        lo = 0
        hi = leaf.n
        while lo < hi:
            mid = (lo + hi) // 2
            cmp = _cmp_rows(c, leaf.rows[mid], row)
            if cmp == 0:
                return 0                    # already held
            if cmp < 0:
                lo = mid + 1
            else:
                hi = mid
        pos = lo
        memmove(&leaf.rows[pos + 1], &leaf.rows[pos], (leaf.n - pos) * sizeof(uint32_t))
        leaf.rows[pos] = row
        leaf.n += 1
        self._size += 1
        # Sums and counts on the path; a new smallest key updates `first` upwards.
        cdef Sum256 one
        _sum_zero(&one)
        _sum_add_id(&one, _id(c, row))
        cdef uint32_t d = depth
        cdef bint new_first = pos == 0
        while d > 0:
            d -= 1
            inner = &self._inners[path[d]]
            inner.count[slot[d]] += 1
            _sum_add(&inner.sum[slot[d]], &one)
            if new_first:
                inner.first[slot[d]] = row
                new_first = slot[d] == 0
        if leaf.n == LEAF_CAP:
            self._split_leaf(c, node, path, slot, depth, pos == LEAF_CAP - 1)
        return 0

    cdef int _split_leaf(self, const Columns* c, uint32_t leaf_index, uint32_t* path,
                         uint32_t* slot, uint32_t depth, bint appending) except -1 nogil:
        # Records mostly arrive in key order (appends at the right edge): then the
        # left node is kept full and the new one starts nearly empty, so leaves stay
        # full instead of half full.
        cdef uint32_t right = self._new_leaf()
        cdef Leaf* left_node = &self._leaves[leaf_index]   # after a possible realloc
        cdef Leaf* right_node = &self._leaves[right]
        cdef uint32_t half = LEAF_CAP - 1 if appending else LEAF_CAP // 2
        right_node.n = left_node.n - half
        memcpy(right_node.rows, &left_node.rows[half], right_node.n * sizeof(uint32_t))
        left_node.n = half
        cdef uint64_t right_count
        cdef Sum256 right_sum
        self._leaf_summary(right, c, 0, &right_count, &right_sum)
        return self._attach(c, right, right_node.rows[0], right_count, &right_sum,
                            leaf_index, path, slot, depth, 1)

    cdef int _attach(self, const Columns* c, uint32_t new_child, uint32_t new_first,
                     uint64_t new_count, const Sum256* new_sum, uint32_t old_child,
                     uint32_t* path, uint32_t* slot, uint32_t depth, uint32_t level) except -1 nogil:
        """Insert `new_child` right after `old_child` in their parent (split upwards)."""
        cdef uint32_t parent, i, root
        cdef Inner* inner
        cdef uint64_t old_count
        cdef Sum256 old_sum
        if depth == 0:
            # old_child was the root: grow a level.
            root = self._new_inner(level)
            inner = &self._inners[root]
            inner.n = 2
            inner.child[0] = old_child
            inner.child[1] = new_child
            self._child_summary(c, old_child, level, &inner.first[0], &inner.count[0], &inner.sum[0])
            inner.first[1] = new_first
            inner.count[1] = new_count
            inner.sum[1] = new_sum[0]
            self._root = root
            self._height = level
            return 0
        parent = path[depth - 1]
        i = slot[depth - 1]
        inner = &self._inners[parent]
        memmove(&inner.child[i + 2], &inner.child[i + 1], (inner.n - i - 1) * sizeof(uint32_t))
        memmove(&inner.first[i + 2], &inner.first[i + 1], (inner.n - i - 1) * sizeof(uint32_t))
        memmove(&inner.count[i + 2], &inner.count[i + 1], (inner.n - i - 1) * sizeof(uint64_t))
        memmove(&inner.sum[i + 2], &inner.sum[i + 1], (inner.n - i - 1) * sizeof(Sum256))
        inner.child[i + 1] = new_child
        inner.first[i + 1] = new_first
        inner.count[i + 1] = new_count
        inner.sum[i + 1] = new_sum[0]
        inner.count[i] -= new_count
        _sum_sub(&inner.sum[i], new_sum)
        inner.n += 1
        if inner.n < INNER_CAP:
            return 0
        # Split the parent: the upper half of its children moves to a new node.
        cdef uint32_t right = self._new_inner(level)
        inner = &self._inners[parent]
        cdef Inner* right_node = &self._inners[right]
        cdef uint32_t half = INNER_CAP - 1 if i + 2 == inner.n else INNER_CAP // 2
        cdef uint32_t moved = inner.n - half, j
        memcpy(right_node.child, &inner.child[half], moved * sizeof(uint32_t))
        memcpy(right_node.first, &inner.first[half], moved * sizeof(uint32_t))
        memcpy(right_node.count, &inner.count[half], moved * sizeof(uint64_t))
        memcpy(right_node.sum, &inner.sum[half], moved * sizeof(Sum256))
        right_node.n = moved
        inner.n = half
        cdef uint64_t right_count = 0
        cdef Sum256 right_sum
        _sum_zero(&right_sum)
        for j in range(moved):
            right_count += right_node.count[j]
            _sum_add(&right_sum, &right_node.sum[j])
        return self._attach(c, right, right_node.first[0], right_count, &right_sum,
                            parent, path, slot, depth - 1, level + 1)

    cdef void _child_summary(self, const Columns* c, uint32_t child, uint32_t level,
                             uint32_t* first, uint64_t* count, Sum256* total) noexcept nogil:
        cdef Inner* inner
        cdef uint32_t j
        if level == 1:
            self._leaf_summary(child, c, 0, count, total)
            first[0] = self._leaves[child].rows[0]
            return
        inner = &self._inners[child]
        first[0] = inner.first[0]
        count[0] = 0
        _sum_zero(total)
        for j in range(inner.n):
            count[0] += inner.count[j]
            _sum_add(total, &inner.sum[j])

    cdef int _adopt(self, Growing* g, const Columns* c) except -1 nogil:
        # The tree must be empty. Its leaf pool becomes g's (g gives it up); each level of
        # inner nodes is built over the one below, INNER_CAP - 1 children a node, up to a
        # single root. Leaf sums come from g (each ID was read once, while filling).
        cdef uint64_t width, inners = 0, i, j, end, first_child, nodes, start
        cdef uint32_t level, node = 0
        cdef Inner* grown
        cdef Inner* inner
        cdef Leaf* shrunk
        if g.size == 0:
            return 0
        width = g.leaf_count
        while width > 1:
            width = (width + INNER_CAP - 2) // (INNER_CAP - 1)
            inners += width
        if g.leaf_count > <uint64_t>0xFFFFFFFF or inners > <uint64_t>0xFFFFFFFF:
            with gil:
                raise MemoryError()
        if inners:
            grown = <Inner*>realloc(self._inners, inners * sizeof(Inner))
            if grown == NULL:
                with gil:
                    raise MemoryError()
            self._inners = grown
            self._inner_cap = <uint32_t>inners
        shrunk = <Leaf*>realloc(g.leaves, g.leaf_count * sizeof(Leaf))   # the growth slack back
        if shrunk != NULL:
            g.leaves = shrunk
            g.leaf_cap = g.leaf_count
        free(self._leaves)
        self._leaves = g.leaves
        self._leaf_cap = <uint32_t>g.leaf_cap
        self._leaf_count = <uint32_t>g.leaf_count
        g.leaves = NULL
        self._inner_count = 0
        self._size = g.size
        self._last = g.last
        first_child = 0
        width = g.leaf_count
        level = 1
        while width > 1:
            nodes = (width + INNER_CAP - 2) // (INNER_CAP - 1)
            start = self._inner_count
            for i in range(nodes):
                node = self._new_inner(level)
                inner = &self._inners[node]
                end = (i + 1) * (INNER_CAP - 1) if (i + 1) * (INNER_CAP - 1) < width else width
                for j in range(first_child + i * (INNER_CAP - 1), first_child + end):
                    inner.child[inner.n] = <uint32_t>j
                    if level == 1:
                        inner.first[inner.n] = self._leaves[j].rows[0]
                        inner.count[inner.n] = self._leaves[j].n
                        inner.sum[inner.n] = g.sums[j]
                    else:
                        self._child_summary(c, <uint32_t>j, level, &inner.first[inner.n],
                                            &inner.count[inner.n], &inner.sum[inner.n])
                    inner.n += 1
            first_child = start
            width = nodes
            level += 1
        self._root = node if g.leaf_count > 1 else 0
        self._height = level - 1
        return 0

    def add(self, rows, timestamps, ids):
        """Insert record numbers (already held ones are ignored)."""
        if self._engine:
            raise ValueError("this RangeTree is kept by the engine (db.reconcile_items) and is "
                             "read-only; build a RangeTree of your own to add items to")
        cdef const uint32_t[::1] r = np.ascontiguousarray(rows, dtype=np.uint32)
        cdef Columns c
        _columns(&c, timestamps, ids)
        cdef Py_ssize_t i
        for i in range(r.shape[0]):
            if r[i] >= c.rows:
                raise ValueError(f"rows[{i}]: record number {r[i]} is past the columns ({c.rows} rows)")
        with nogil:
            for i in range(r.shape[0]):
                self._insert(&c, r[i])

    # -- queries ---------------------------------------------------------

    cdef void _prefix(self, const Columns* c, const Bound* b, uint64_t* count,
                      Sum256* total) noexcept nogil:
        cdef uint32_t node = self._root, level = self._height, lo, hi, mid, i
        cdef Inner* inner
        cdef Leaf* leaf
        count[0] = 0
        _sum_zero(total)
        while level > 0:
            inner = &self._inners[node]
            # Children before the last one whose first key is below the bound lie wholly below it.
            lo = 0
            hi = inner.n
            while lo < hi:
                mid = (lo + hi) // 2
                if _below(c, inner.first[mid], b):
                    lo = mid + 1
                else:
                    hi = mid
            if lo == 0:
                return
            for i in range(lo - 1):
                count[0] += inner.count[i]
                _sum_add(total, &inner.sum[i])
            node = inner.child[lo - 1]
            level -= 1
        leaf = &self._leaves[node]
        for i in range(leaf.n):
            if not _below(c, leaf.rows[i], b):
                break
            count[0] += 1
            _sum_add_id(total, _id(c, leaf.rows[i]))

    cdef void _prefix_rank(self, const Columns* c, uint64_t k, Sum256* total) noexcept nogil:
        """Sum of the IDs of the first k items."""
        cdef uint32_t node = self._root, level = self._height, i
        cdef Inner* inner
        cdef Leaf* leaf
        _sum_zero(total)
        while level > 0:
            inner = &self._inners[node]
            i = 0
            while i + 1 < inner.n and k >= inner.count[i]:
                k -= inner.count[i]
                _sum_add(total, &inner.sum[i])
                i += 1
            node = inner.child[i]
            level -= 1
        leaf = &self._leaves[node]
        for i in range(<uint32_t>k if k < leaf.n else leaf.n):
            _sum_add_id(total, _id(c, leaf.rows[i]))

    cdef uint64_t _rank(self, const Columns* c, const Bound* b) noexcept nogil:
        cdef uint32_t node = self._root, level = self._height, lo, hi, mid, i
        cdef Inner* inner
        cdef Leaf* leaf
        cdef uint64_t rank = 0
        while level > 0:
            inner = &self._inners[node]
            lo = 0
            hi = inner.n
            while lo < hi:
                mid = (lo + hi) // 2
                if _below(c, inner.first[mid], b):
                    lo = mid + 1
                else:
                    hi = mid
            if lo == 0:
                return rank
            for i in range(lo - 1):
                rank += inner.count[i]
            node = inner.child[lo - 1]
            level -= 1
        leaf = &self._leaves[node]
        lo = 0
        hi = leaf.n
        while lo < hi:
            mid = (lo + hi) // 2
            if _below(c, leaf.rows[mid], b):
                lo = mid + 1
            else:
                hi = mid
        return rank + lo

    cdef uint32_t _select(self, uint64_t k) noexcept nogil:
        """The record number of rank k (0-based; k < size)."""
        cdef uint32_t node = self._root, level = self._height, i
        cdef Inner* inner
        while level > 0:
            inner = &self._inners[node]
            i = 0
            while i + 1 < inner.n and k >= inner.count[i]:
                k -= inner.count[i]
                i += 1
            node = inner.child[i]
            level -= 1
        return self._leaves[node].rows[k]

    def rows(self, uint64_t lo=0, hi=None):
        """Record numbers of ranks [lo, hi) in key order (all by default)."""
        cdef uint64_t end = self._size if hi is None else min(<uint64_t>hi, self._size)
        if lo > end:
            lo = end
        out = np.empty(end - lo, dtype=np.uint32)
        cdef uint32_t[::1] view = out
        if end > lo:
            self._walk_into(lo, end, &view[0])
        return out

    cdef void _walk_into(self, uint64_t lo, uint64_t hi, uint32_t* out) noexcept nogil:
        # In-order walk from rank lo: select the first, then step leaf by leaf.
        cdef uint32_t stack_node[MAX_DEPTH]
        cdef uint32_t stack_slot[MAX_DEPTH]
        cdef uint32_t depth = 0, node = self._root, level = self._height, i
        cdef uint64_t k = lo, written = 0
        cdef Inner* inner
        cdef Leaf* leaf
        while level > 0:
            inner = &self._inners[node]
            i = 0
            while i + 1 < inner.n and k >= inner.count[i]:
                k -= inner.count[i]
                i += 1
            stack_node[depth] = node
            stack_slot[depth] = i
            depth += 1
            node = inner.child[i]
            level -= 1
        while True:
            leaf = &self._leaves[node]
            while k < leaf.n and written < hi - lo:
                out[written] = leaf.rows[k]
                written += 1
                k += 1
            if written == hi - lo:
                return
            # Next leaf: up until a node has a further child, then leftmost down.
            while depth > 0:
                inner = &self._inners[stack_node[depth - 1]]
                if stack_slot[depth - 1] + 1 < inner.n:
                    break
                depth -= 1
            if depth == 0:
                return
            stack_slot[depth - 1] += 1
            node = self._inners[stack_node[depth - 1]].child[stack_slot[depth - 1]]
            level = self._inners[stack_node[depth - 1]].level - 1
            while level > 0:
                stack_node[depth] = node
                stack_slot[depth] = 0
                depth += 1
                node = self._inners[node].child[0]
                level -= 1
            k = 0

    def rank(self, bound, timestamps, ids):
        """Items whose key is below `bound` ((ms, prefix bytes) or None for infinity)."""
        cdef Columns c
        cdef Bound b
        _columns(&c, timestamps, ids)
        _bound_from_python(bound, &b)
        return self._rank(&c, &b)

    def summary(self, lo, hi, timestamps, ids):
        """(count, sum of IDs as 32 bytes little-endian) of the items in [lo, hi)."""
        cdef Columns c
        cdef Bound blo, bhi
        cdef uint64_t nlo, nhi
        cdef Sum256 slo, shi
        _columns(&c, timestamps, ids)
        _bound_from_python(lo, &blo)
        _bound_from_python(hi, &bhi)
        self._prefix(&c, &blo, &nlo, &slo)
        self._prefix(&c, &bhi, &nhi, &shi)
        if nhi < nlo:
            return 0, bytes(32)
        _sum_sub(&shi, &slo)
        return nhi - nlo, _sum_bytes(&shi)

    def fingerprint(self, lo, hi, timestamps, ids, bytes salt, int length=16):
        """The salted fingerprint of the items in [lo, hi) (docs/protocol.md)."""
        cdef Columns c
        cdef Bound blo, bhi
        cdef uint64_t nlo, nhi
        cdef Sum256 slo, shi
        cdef uint8_t out[MAX_FINGERPRINT]
        _check_salt(salt)
        if not 4 <= length <= MAX_FINGERPRINT or length % 4:
            raise ValueError(f"length: {length}, expected 4, 8, 12 or 16")
        _columns(&c, timestamps, ids)
        _bound_from_python(lo, &blo)
        _bound_from_python(hi, &bhi)
        self._prefix(&c, &blo, &nlo, &slo)
        self._prefix(&c, &bhi, &nhi, &shi)
        _sum_sub(&shi, &slo)
        _fingerprint(<const uint8_t*>PyBytes_AS_STRING(salt), nhi - nlo, &shi, out, length)
        return PyBytes_FromStringAndSize(<char*>out, length)

    def check(self, timestamps, ids):
        """Verify every invariant (order, counts, sums, firsts); raises AssertionError."""
        cdef Columns c
        _columns(&c, timestamps, ids)
        rows = self.rows()
        for i in range(1, len(rows)):
            if _cmp_rows(&c, rows[i - 1], rows[i]) >= 0:
                raise AssertionError(f"items {i - 1} and {i} are out of order")
        count, total = self._check_node(&c, self._root, self._height)
        if count != self._size:
            raise AssertionError(f"root holds {count} items, size says {self._size}")

    cdef tuple _check_node(self, const Columns* c, uint32_t node, uint32_t level):
        cdef Inner* inner
        cdef uint64_t count = 0, child_count
        cdef Sum256 total, child_sum
        cdef uint32_t j, first
        if level == 0:
            self._leaf_summary(node, c, 0, &count, &total)
            if self._leaves[node].n == 0 and self._height > 0:
                raise AssertionError(f"leaf {node} is empty")
            return count, _sum_bytes(&total)
        inner = &self._inners[node]
        if inner.level != level:
            raise AssertionError(f"inner {node} says level {inner.level}, is at {level}")
        _sum_zero(&total)
        for j in range(inner.n):
            held, held_sum = self._check_node(c, inner.child[j], level - 1)
            if held != inner.count[j]:
                raise AssertionError(f"inner {node} child {j}: count {inner.count[j]} != {held}")
            if held_sum != _sum_bytes(&inner.sum[j]):
                raise AssertionError(f"inner {node} child {j}: sum differs")
            self._child_summary(c, inner.child[j], level, &first, &child_count, &child_sum)
            if first != inner.first[j]:
                raise AssertionError(f"inner {node} child {j}: first {inner.first[j]} != {first}")
            count += inner.count[j]
            _sum_add(&total, &inner.sum[j])
        return count, _sum_bytes(&total)


cdef bytes _sum_bytes(const Sum256* s):
    cdef uint8_t out[32]
    cdef int i
    for i in range(4):
        _put_le64(out + 8 * i, s.w[i])
    return PyBytes_FromStringAndSize(<char*>out, 32)


cdef int _columns(Columns* c, timestamps, ids) except -1:
    cdef const uint64_t[::1] ts = timestamps
    cdef const uint8_t[:, ::1] idv = ids
    if idv.shape[1] != ID_SIZE:
        raise ValueError(f"ids: rows of {idv.shape[1]} bytes, expected {ID_SIZE}")
    if ts.shape[0] < idv.shape[0]:
        raise ValueError(f"timestamps: {ts.shape[0]} rows for {idv.shape[0]} IDs")
    c.rows = idv.shape[0]
    c.timestamps = &ts[0] if ts.shape[0] else NULL
    c.ids = &idv[0, 0] if idv.shape[0] else NULL
    return 0


cdef int _bound_from_python(bound, Bound* b) except -1:
    memset(b, 0, sizeof(Bound))
    if bound is None:
        b.infinite = True
        return 0
    ms, prefix = bound
    prefix = bytes(prefix)
    if len(prefix) > ID_SIZE:
        raise ValueError(f"bound prefix: {len(prefix)} bytes, at most {ID_SIZE}")
    b.ms = ms
    b.prefix_len = len(prefix)
    memcpy(b.prefix, <const char*>prefix, len(prefix))
    return 0


cdef int _check_salt(bytes salt) except -1:
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt: {len(salt)} bytes, expected {SALT_SIZE}")
    return 0


# ---------------------------------------------------------------- messages

cdef struct Out:
    uint8_t* data
    size_t length
    size_t capacity


cdef int _out_reserve(Out* o, size_t extra) except -1:
    cdef size_t want = o.length + extra, capacity = o.capacity or 256
    cdef uint8_t* grown
    if want <= o.capacity:
        return 0
    while capacity < want:
        capacity *= 2
    grown = <uint8_t*>realloc(o.data, capacity)
    if grown == NULL:
        raise MemoryError()
    o.data = grown
    o.capacity = capacity
    return 0


cdef inline int _out_u8(Out* o, uint8_t v) except -1:
    _out_reserve(o, 1)
    o.data[o.length] = v
    o.length += 1
    return 0


cdef inline int _out_varint(Out* o, uint64_t v) except -1:
    _out_reserve(o, 10)
    while v >= 0x80:
        o.data[o.length] = <uint8_t>(v & 0x7F) | 0x80
        o.length += 1
        v >>= 7
    o.data[o.length] = <uint8_t>v
    o.length += 1
    return 0


cdef inline int _out_raw(Out* o, const uint8_t* p, size_t n) except -1:
    _out_reserve(o, n)
    memcpy(o.data + o.length, p, n)
    o.length += n
    return 0


cdef struct In:
    const uint8_t* data
    size_t length
    size_t position


cdef const uint8_t* _in_take(In* r, size_t n, str field) except NULL:
    cdef const uint8_t* p
    if n > r.length - r.position:
        raise ProtocolError(f"sync message: {field} at byte {r.position} runs past the end "
                            f"({r.length} bytes)")
    p = r.data + r.position
    r.position += n
    return p


cdef uint64_t _in_varint(In* r, str field) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef size_t start = r.position
    cdef uint8_t byte
    while True:
        byte = _in_take(r, 1, field)[0]
        if shift == 63 and byte > 1:
            raise ProtocolError(f"sync message: {field} at byte {start} is longer than 64 bits")
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if not byte & 0x80:
            if byte == 0 and shift:
                raise ProtocolError(f"sync message: {field} at byte {start} is not minimally encoded")
            return value
        shift += 7


cdef int _in_range_head(In* r, uint64_t* previous_ms, Bound* b) except -1:
    """Reads a range's bound and head byte; returns the mode."""
    cdef size_t start = r.position
    cdef uint64_t code = _in_varint(r, "bound timestamp")
    cdef uint8_t head = _in_take(r, 1, "range head")[0]
    cdef int mode = head >> 5
    memset(b, 0, sizeof(Bound))
    if code == 0:
        b.infinite = True
        if head & 0x1F:
            raise ProtocolError(f"sync message: the infinite bound at byte {start} has a prefix")
        return mode
    if code - 1 > 0xFFFFFFFFFFFFFFFF - previous_ms[0]:
        raise ProtocolError(f"sync message: bound timestamp at byte {start} overflows")
    b.ms = previous_ms[0] + code - 1
    previous_ms[0] = b.ms
    b.prefix_len = head & 0x1F
    if b.prefix_len == 31:
        b.prefix_len = ID_SIZE
    memcpy(b.prefix, _in_take(r, b.prefix_len, "bound prefix"), b.prefix_len)
    return mode


cdef int _out_range_head(Out* o, uint64_t* previous_ms, const Bound* b, int mode) except -1:
    # A bound prefix is 0..30 or 32 bytes (two IDs sharing 31 bytes is the only way to
    # need 32); 31 in the head stands for 32.
    if b.infinite:
        _out_varint(o, 0)
        return _out_u8(o, <uint8_t>(mode << 5))
    _out_varint(o, b.ms - previous_ms[0] + 1)
    previous_ms[0] = b.ms
    if b.prefix_len == 31:
        _out_u8(o, <uint8_t>((mode << 5) | 31))
        return _out_raw(o, b.prefix, ID_SIZE)
    _out_u8(o, <uint8_t>((mode << 5) | b.prefix_len))
    return _out_raw(o, b.prefix, b.prefix_len)


cdef bytes _range_key(const Bound* lo, const Bound* hi):
    """A canonical name for the range [lo, hi), to match a NEED with the IDLIST it answers."""
    cdef uint8_t key[2 * 42]
    cdef const Bound* b
    cdef int k
    memset(key, 0, sizeof(key))
    for k in range(2):
        b = lo if k == 0 else hi
        key[42 * k] = b.infinite
        _put_le64(key + 42 * k + 1, b.ms)
        key[42 * k + 9] = <uint8_t>b.prefix_len
        memcpy(key + 42 * k + 10, b.prefix, b.prefix_len)
    return PyBytes_FromStringAndSize(<char*>key, sizeof(key))


cdef inline int _prefix_length(uint64_t count) noexcept nogil:
    """ID window bytes for a list of `count`: collisions below about 2^-20 per entry."""
    cdef int bits = 0
    while count > 0:
        bits += 1
        count >>= 1
    cdef int length = (bits + 20 + 7) // 8
    return 2 if length < 2 else (MAX_PREFIX if length > MAX_PREFIX else length)


cdef inline int _fingerprint_mode(uint64_t count) noexcept nogil:
    # An equal-looking range is not split further, so a false "equal" hides its
    # differences for the rest of the session (the salt makes it a fresh draw in the
    # next one). Large ranges are few and hide much: 16 bytes. Small ranges are most
    # of the bytes of a random gap and hide little: 3 bytes for 32 items or fewer.
    if count > 65536:
        return MODE_FINGERPRINT_16
    if count > 512:
        return MODE_FINGERPRINT_8
    if count > 32:
        return MODE_FINGERPRINT_4
    return MODE_FINGERPRINT_3


cdef int _mode_length(int mode) noexcept nogil:
    if mode == MODE_FINGERPRINT_3:
        return 3
    if mode == MODE_FINGERPRINT_4:
        return 4
    if mode == MODE_FINGERPRINT_8:
        return 8
    return 16


cdef inline uint64_t _window(const uint8_t* record_id, int offset, int length) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(length):
        v = (v << 8) | record_id[offset + i]
    return v


cdef class _Step:
    """State of one reconciliation step (one message in, one reply out)."""
    cdef RangeTree tree
    cdef Columns columns
    cdef const uint8_t* salt
    cdef int window_offset
    cdef dict lists
    cdef bint can_send, can_receive
    cdef int branching, list_threshold
    cdef Out out
    cdef uint64_t out_previous_ms
    cdef bint pending_skip          # a SKIP waiting to be merged with the next ones
    cdef Bound pending_bound
    cdef bint anything              # the reply holds something other than SKIP
    cdef list send                  # record numbers to send to the peer (arrays)
    cdef uint64_t ranges_in

    def __dealloc__(self):
        free(self.out.data)

    cdef int skip(self, const Bound* hi) except -1:
        self.pending_skip = True
        self.pending_bound = hi[0]
        return 0

    cdef int flush_skip(self) except -1:
        if self.pending_skip:
            _out_range_head(&self.out, &self.out_previous_ms, &self.pending_bound, MODE_SKIP)
            self.pending_skip = False
        return 0

    cdef int emit_fingerprint(self, const Bound* hi, uint64_t count, const Sum256* total) except -1:
        cdef uint8_t fp[MAX_FINGERPRINT]
        cdef int mode = _fingerprint_mode(count), length = _mode_length(mode)
        self.flush_skip()
        _out_range_head(&self.out, &self.out_previous_ms, hi, mode)
        _fingerprint(self.salt, count, total, fp, length)
        _out_raw(&self.out, fp, length)
        self.anything = True
        return 0

    cdef int emit_list(self, const Bound* lo, const Bound* hi, uint64_t r_lo, uint64_t r_hi) except -1:
        cdef uint64_t count = r_hi - r_lo, i
        cdef int length = _prefix_length(count) if count else 0
        cdef int offset = self.window_offset % (ID_SIZE - length + 1)
        rows = self.tree.rows(r_lo, r_hi)
        cdef const uint32_t[::1] view = rows
        self.flush_skip()
        _out_range_head(&self.out, &self.out_previous_ms, hi, MODE_IDLIST)
        _out_varint(&self.out, count)
        if count:
            _out_u8(&self.out, <uint8_t>length)
        for i in range(count):
            _out_raw(&self.out, _id(&self.columns, view[i]) + offset, length)
        self.lists[_range_key(lo, hi)] = rows
        self.anything = True
        return 0

    cdef int split(self, const Bound* lo, const Bound* hi, uint64_t r_lo, uint64_t r_hi) except -1:
        """Reply to a differing range: an ID list if it is small, else B fingerprints."""
        cdef uint64_t count = r_hi - r_lo, parts, j, start, end
        cdef Bound low, high
        cdef Sum256 s_start, s_end
        if count <= <uint64_t>self.list_threshold:
            return self.emit_list(lo, hi, r_lo, r_hi)
        parts = <uint64_t>self.branching if count > <uint64_t>self.branching else count
        low = lo[0]
        start = r_lo
        self.tree._prefix_rank(&self.columns, start, &s_start)
        for j in range(parts):
            end = r_lo + count * (j + 1) // parts
            if j + 1 == parts:
                high = hi[0]
            else:
                _bound_between(&self.columns, self.tree._select(end - 1), self.tree._select(end), &high)
            self.tree._prefix_rank(&self.columns, end, &s_end)
            _sum_sub(&s_end, &s_start)
            self.emit_fingerprint(&high, end - start, &s_end)
            self.tree._prefix_rank(&self.columns, end, &s_start)
            low = high
            start = end
        return 0

    cdef int on_fingerprint(self, const Bound* lo, const Bound* hi, const uint8_t* theirs,
                            int length) except -1:
        cdef uint64_t n_lo, n_hi
        cdef Sum256 s_lo, s_hi
        cdef uint8_t mine[MAX_FINGERPRINT]
        self.tree._prefix(&self.columns, lo, &n_lo, &s_lo)
        self.tree._prefix(&self.columns, hi, &n_hi, &s_hi)
        _sum_sub(&s_hi, &s_lo)
        _fingerprint(self.salt, n_hi - n_lo, &s_hi, mine, length)
        if memcmp(mine, theirs, length) == 0:
            return self.skip(hi)
        return self.split(lo, hi, n_lo, n_hi)

    cdef int on_list(self, const Bound* lo, const Bound* hi, const uint8_t* entries,
                     uint64_t count, int length) except -1:
        cdef int offset = self.window_offset % (ID_SIZE - length + 1) if length else 0
        cdef uint64_t r_lo = self.tree._rank(&self.columns, lo)
        cdef uint64_t r_hi = self.tree._rank(&self.columns, hi)
        cdef uint64_t i, j, mine_count = r_hi - r_lo, lo_i, hi_i, mid, key
        rows = self.tree.rows(r_lo, r_hi)
        cdef const uint32_t[::1] mine = rows
        # Their entries, sorted, with the positions they came in (for the NEED bitmap).
        theirs = np.empty(count, dtype=np.uint64)
        cdef uint64_t[::1] keys = theirs
        for i in range(count):
            keys[i] = _window(entries + i * length, 0, length)
        order = np.argsort(theirs, kind="stable")
        sorted_keys = np.ascontiguousarray(theirs[order])
        cdef const uint64_t[::1] sk = sorted_keys
        matched = np.zeros(count, dtype=np.uint8)
        cdef uint8_t[::1] hit = matched
        send = np.zeros(mine_count, dtype=np.bool_)
        cdef uint8_t[::1] send_mask = send.view(np.uint8)
        for j in range(mine_count):
            key = _window(_id(&self.columns, mine[j]), offset, length) if length else 0
            lo_i = 0
            hi_i = count
            while lo_i < hi_i:
                mid = (lo_i + hi_i) // 2
                if sk[mid] < key:
                    lo_i = mid + 1
                else:
                    hi_i = mid
            if length and lo_i < count and sk[lo_i] == key:
                while lo_i < count and sk[lo_i] == key:
                    hit[lo_i] = 1
                    lo_i += 1
            else:
                send_mask[j] = 1
        if self.can_send and mine_count:
            self.send.append(rows[send])
        if not self.can_receive:
            return self.skip(hi)
        # Bit i of the bitmap: their entry i is one this side lacks.
        lacking = np.zeros(count, dtype=np.uint8)
        lacking[order] = 1 - matched
        if not lacking.any():
            return self.skip(hi)
        bitmap = np.packbits(lacking, bitorder="little").tobytes()
        self.flush_skip()
        _out_range_head(&self.out, &self.out_previous_ms, hi, MODE_NEED)
        _out_varint(&self.out, count)
        _out_raw(&self.out, <const uint8_t*>PyBytes_AS_STRING(bitmap), len(bitmap))
        self.anything = True
        return 0

    cdef int on_need(self, const Bound* lo, const Bound* hi, const uint8_t* bitmap,
                     uint64_t count, size_t position) except -1:
        key = _range_key(lo, hi)
        rows = self.lists.pop(key, None)
        if rows is None:
            raise ProtocolError(f"sync message: NEED at byte {position} answers no ID list "
                                "this side sent for that range")
        if len(rows) != count:
            raise ProtocolError(f"sync message: NEED at byte {position} covers {count} entries, "
                                f"the ID list had {len(rows)}")
        wanted = np.unpackbits(np.frombuffer(bitmap[:(count + 7) // 8], dtype=np.uint8),
                               count=count, bitorder="little").astype(bool)
        if self.can_send and wanted.any():
            self.send.append(rows[wanted])
        return self.skip(hi)


def reconcile(RangeTree tree, timestamps, ids, message, bytes salt, dict lists, *,
              bint can_send, bint can_receive, int branching=16, int list_threshold=32,
              bint initiate=False):
    """One step of range-based reconciliation over `tree` (docs/protocol.md, "Range list").

    `message` is the peer's range list (ignored with initiate=True, which
    starts a session as if the peer had sent one differing fingerprint of
    everything). `lists` carries the ID lists this side sent, between the
    steps of one session. Returns (reply, send, done): the reply's range
    list, the record numbers the peer lacks (uint32, key order), and whether
    the reply holds nothing but SKIP (the session is over once both sides
    have nothing more to say).
    """
    if not 2 <= branching <= 64:
        raise ValueError(f"branching: {branching}, expected 2..64")
    if not 1 <= list_threshold <= MAX_LIST:
        raise ValueError(f"list_threshold: {list_threshold}, expected 1..{MAX_LIST}")
    _check_salt(salt)
    cdef _Step step = _Step()
    step.tree = tree
    _columns(&step.columns, timestamps, ids)
    step.salt = <const uint8_t*>PyBytes_AS_STRING(salt)
    step.window_offset = salt[0]
    step.lists = lists
    step.can_send = can_send
    step.can_receive = can_receive
    step.branching = branching
    step.list_threshold = list_threshold
    step.send = []
    cdef Bound lo, hi
    memset(&lo, 0, sizeof(Bound))
    memset(&hi, 0, sizeof(Bound))
    if initiate:
        hi.infinite = True
        step.split(&lo, &hi, 0, tree._size)
    else:
        _process(step, message, &lo)
    step.flush_skip()
    reply = PyBytes_FromStringAndSize(<char*>step.out.data, step.out.length)
    send = np.concatenate(step.send) if step.send else np.zeros(0, dtype=np.uint32)
    return reply, send, not step.anything


cdef int _process(_Step step, message, Bound* lo) except -1:
    cdef const uint8_t[::1] view = message
    cdef In r
    cdef Bound hi
    cdef uint64_t previous_ms = 0, count
    cdef int mode
    cdef size_t start
    cdef int length
    r.data = &view[0] if view.shape[0] else NULL
    r.length = view.shape[0]
    r.position = 0
    if r.length == 0:
        raise ProtocolError("sync message: an empty range list (the last range must reach infinity)")
    while r.position < r.length:
        start = r.position
        if lo.infinite:
            raise ProtocolError(f"sync message: a range at byte {start} follows the one that "
                                "reached infinity")
        mode = _in_range_head(&r, &previous_ms, &hi)
        if _cmp_bounds(&hi, lo) <= 0:
            raise ProtocolError(f"sync message: the bound at byte {start} is not above the "
                                "previous one")
        step.ranges_in += 1
        if step.ranges_in > MAX_RANGES:
            raise ProtocolError(f"sync message: more than {MAX_RANGES} ranges")
        if mode == MODE_SKIP:
            step.skip(&hi)
        elif MODE_FINGERPRINT_3 <= mode <= MODE_FINGERPRINT_16:
            length = _mode_length(mode)
            step.on_fingerprint(lo, &hi, _in_take(&r, length, "fingerprint"), length)
        elif mode == MODE_IDLIST:
            count = _in_varint(&r, "ID list count")
            length = _in_take(&r, 1, "ID list entry length")[0] if count else 0
            if count > MAX_LIST or (count and not 1 <= length <= MAX_PREFIX):
                raise ProtocolError(f"sync message: ID list at byte {start} holds {count} entries "
                                    f"of {length} bytes (at most {MAX_LIST}, of 1..{MAX_PREFIX})")
            step.on_list(lo, &hi, _in_take(&r, count * length, "ID list entries"), count, length)
        elif mode == MODE_NEED:
            count = _in_varint(&r, "NEED count")
            if count > MAX_LIST:
                raise ProtocolError(f"sync message: NEED at byte {start} covers {count} entries")
            step.on_need(lo, &hi, _in_take(&r, (count + 7) // 8, "NEED bitmap"), count, start)
        else:
            raise ProtocolError(f"sync message: unknown range mode {mode} at byte {start}")
        lo[0] = hi
    if not lo.infinite:
        raise ProtocolError("sync message: the last range does not reach infinity")
    return 0


# ---------------------------------------------------------------- the engine's trees

STATE_FORMAT = 1

cdef inline uint32_t _scope_of(uint8_t kind, uint64_t place, uint32_t partitions) noexcept nogil:
    """docs/replication.md, "Partitions and placement": scope 1 global, 2 + place % partitions."""
    if kind == KIND_ASSERTION or (kind == KIND_VOTE and place != 0):
        return 2 + <uint32_t>(place % partitions)
    return 1


def partitions_of(kinds, places, uint32_t partitions):
    """The partition of each record from its `kind` and `place` columns (-1: global), int64.

    Assertions are in partition place % partitions, and so are votes whose
    place is not 0 (format version 2: they carry their assertion's subject);
    everything else is global. The one rule of placement, shared by the
    engine's trees and replication.placement.
    """
    if partitions < 1:
        raise ValueError(f"partitions: {partitions}, expected at least 1")
    cdef const uint8_t[::1] k = np.ascontiguousarray(kinds, dtype=np.uint8)
    cdef const uint64_t[::1] p = np.ascontiguousarray(places, dtype=np.uint64)
    if k.shape[0] != p.shape[0]:
        raise ValueError(f"kinds: {k.shape[0]} rows, places: {p.shape[0]}")
    out = np.empty(k.shape[0], dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(k.shape[0]):
            o[i] = <int64_t>_scope_of(k[i], p[i], partitions) - 2
    return out


cdef int _grow_append(Growing* g, uint32_t row, const uint8_t* record_id) except -1 nogil:
    """Append a record number (above every one before it) to the leaves being filled."""
    cdef uint64_t cap
    cdef Leaf* leaves
    cdef Sum256* sums
    if g.leaf_count == 0 or g.leaves[g.leaf_count - 1].n == LEAF_CAP - 1:
        if g.leaf_count == g.leaf_cap:
            cap = g.leaf_cap * 2 + 4
            leaves = <Leaf*>realloc(g.leaves, cap * sizeof(Leaf))
            if leaves == NULL:
                with gil:
                    raise MemoryError()
            g.leaves = leaves
            sums = <Sum256*>realloc(g.sums, cap * sizeof(Sum256))
            if sums == NULL:
                with gil:
                    raise MemoryError()
            g.sums = sums
            g.leaf_cap = cap
        g.leaves[g.leaf_count].n = 0
        _sum_zero(&g.sums[g.leaf_count])
        g.leaf_count += 1
    cdef Leaf* leaf = &g.leaves[g.leaf_count - 1]
    leaf.rows[leaf.n] = row
    leaf.n += 1
    _sum_add_id(&g.sums[g.leaf_count - 1], record_id)
    g.size += 1
    g.last = row
    return 0


cdef void _free_growing(Growing* g, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i
    if g == NULL:
        return
    for i in range(count):
        free(g[i].leaves)
        free(g[i].sums)
    free(g)


cdef class ScopeTrees:
    """The range trees of one store: scope 0 always; scopes 1 and 2 + p with `partitions` set.

    `add` takes each indexed batch (its record numbers and `kind` / `place`
    columns) and inserts every record into the whole-store tree and into the
    tree of its scope, O(log n) each. The trees are the engine's: handed out
    read-only (RangeTree.add refuses). `state()` / `from_state()` persist them
    as the record numbers of each tree in key order (4 bytes a record a tree),
    bulk-loaded in O(n) at open after checking them against the columns.
    """

    def __cinit__(self, uint32_t partitions=0):
        self.whole = RangeTree()
        self.whole._engine = True
        self.partitions = partitions
        self._scoped = [None] * (partitions + 1) if partitions else []

    cdef RangeTree _scoped_tree(self, uint32_t scope):
        cdef RangeTree tree = self._scoped[scope - 1]
        if tree is None:
            tree = RangeTree()
            tree._engine = True
            self._scoped[scope - 1] = tree
        return tree

    def tree(self, uint32_t scope):
        """The tree of a scope (an empty one for a scope that holds nothing yet)."""
        if scope == 0:
            return self.whole
        if not self.partitions:
            raise ValueError(f"scope {scope}: this store keeps no partition trees (open it with "
                             "partitions=P to keep them); only scope 0, the whole store, is kept")
        if scope > self.partitions + 1:
            raise ValueError(f"scope {scope}: this store has {self.partitions} partitions, so scopes "
                             f"0..{self.partitions + 1}")
        return self._scoped_tree(scope)

    def scopes(self):
        """Scope 0 and every scope whose tree holds a record, ascending."""
        return [0] + [scope for scope, tree in enumerate(self._scoped, 1)
                      if tree is not None and len(tree)]

    def memory_bytes(self):
        return self.whole.memory_bytes() + sum(t.memory_bytes() for t in self._scoped if t is not None)

    def add(self, rows, kinds, places, timestamps, ids):
        """Insert records rows[i] (their kind and place columns kinds[i], places[i])."""
        cdef const uint32_t[::1] r = np.ascontiguousarray(rows, dtype=np.uint32)
        cdef const uint8_t[::1] k = np.ascontiguousarray(kinds, dtype=np.uint8)
        cdef const uint64_t[::1] p = np.ascontiguousarray(places, dtype=np.uint64)
        cdef Columns c
        cdef Py_ssize_t i, n = r.shape[0]
        _columns(&c, timestamps, ids)
        if k.shape[0] != n or p.shape[0] != n:
            raise ValueError(f"rows: {n}, kinds: {k.shape[0]}, places: {p.shape[0]}; expected one each")
        for i in range(n):
            if r[i] >= c.rows:
                raise ValueError(f"rows[{i}]: record number {r[i]} is past the columns ({c.rows} rows)")
        with nogil:
            for i in range(n):
                self.whole._insert(&c, r[i])
        if not self.partitions:
            return
        cdef RangeTree tree
        for i in range(n):
            tree = self._scoped_tree(_scope_of(k[i], p[i], self.partitions))
            tree._insert(&c, r[i])

    cdef int _load(self, const uint32_t* rows, uint64_t n, const Columns* c, const uint8_t* kinds,
                   const uint64_t* places, bint whole) except -1:
        """Fill the empty trees from record numbers in the whole store's key order (checked).

        One pass: each row is checked (below the columns, above the one
        before), appended to the whole-store tree's leaves (if `whole`) and
        to its scope's: a subsequence of an ordered sequence is ordered, so
        the partition trees need no sorting and no order of their own on disk.
        """
        cdef Py_ssize_t trees = 1 + (self.partitions + 1 if self.partitions else 0), bad = -1
        cdef Growing* g = <Growing*>calloc(trees, sizeof(Growing))
        cdef uint64_t i
        cdef uint32_t row
        cdef const uint8_t* record_id
        cdef Py_ssize_t scope
        if g == NULL:
            raise MemoryError()
        try:
            with nogil:
                for i in range(n):
                    row = rows[i]
                    if row >= c.rows or (i > 0 and _cmp_rows(c, rows[i - 1], row) >= 0):
                        bad = <Py_ssize_t>i
                        break
                    record_id = _id(c, row)
                    if whole:
                        _grow_append(&g[0], row, record_id)
                    if self.partitions:
                        _grow_append(&g[_scope_of(kinds[row], places[row], self.partitions)], row,
                                     record_id)
            if bad >= 0:
                raise CorruptionError(f"index state: ScopeTrees entry {bad} (record {rows[bad]}) is "
                                      "past the records or not above the one before it")
            if whole:
                self.whole._adopt(&g[0], c)
            for scope in range(1, trees):
                if g[scope].size:
                    (<RangeTree>self._scoped_tree(<uint32_t>scope))._adopt(&g[scope], c)
        finally:
            _free_growing(g, trees)
        return 0

    def keep_partitions(self, uint32_t partitions, uint64_t count, kinds, places, timestamps, ids):
        """Start keeping partition trees, built from the whole-store tree's order (O(n), once)."""
        if self.partitions:
            raise ValueError(f"partitions: already {self.partitions}")
        if partitions < 1:
            raise ValueError(f"partitions: {partitions}, expected at least 1")
        cdef const uint8_t[::1] k = np.ascontiguousarray(kinds, dtype=np.uint8)
        cdef const uint64_t[::1] p = np.ascontiguousarray(places, dtype=np.uint64)
        cdef Columns c
        _columns(&c, timestamps, ids)
        if count != len(self.whole) or count > c.rows or count > <uint64_t>k.shape[0] or \
                count > <uint64_t>p.shape[0]:
            raise ValueError(f"count: {count} records, but the whole-store tree holds "
                             f"{len(self.whole)} and the columns {c.rows}")
        self.partitions = partitions
        self._scoped = [None] * (partitions + 1)
        order = self.whole.rows()
        cdef const uint32_t[::1] rows = order
        if count:
            self._load(&rows[0], count, &c, &k[0], &p[0], False)

    def state(self):
        """The trees as plain values, for the engine to persist and from_state to rebuild.

        {"kind": "ScopeTrees", "format": 1, "partitions": int, "rows": uint32,
        the record numbers of the whole store in key order}: the partition
        trees are rebuilt from that order and the columns.
        """
        return {"kind": "ScopeTrees", "format": STATE_FORMAT, "partitions": self.partitions,
                "rows": self.whole.rows()}

    @classmethod
    def from_state(cls, state, uint32_t partitions, uint64_t count, kinds, places, timestamps, ids):
        """Trees rebuilt from state() over the columns of `count` records, in one O(n) pass.

        Raises CorruptionError (then rebuild from the log) unless the state
        holds every record number below `count` once, in strictly ascending
        key order. The partition trees (for `partitions`, whatever the state
        was kept with) are split off the same order.
        """
        if not isinstance(state, dict) or state.get("kind") != "ScopeTrees" or \
                state.get("format") != STATE_FORMAT:
            raise CorruptionError(f"index state: not ScopeTrees state of format {STATE_FORMAT}")
        try:
            order = np.ascontiguousarray(state["rows"], dtype=np.uint32)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptionError(f"index state: ScopeTrees {exc!r}") from None
        cdef const uint8_t[::1] k = np.ascontiguousarray(kinds, dtype=np.uint8)
        cdef const uint64_t[::1] p = np.ascontiguousarray(places, dtype=np.uint64)
        cdef Columns c
        _columns(&c, timestamps, ids)
        if count > c.rows or count > <uint64_t>k.shape[0] or count > <uint64_t>p.shape[0]:
            raise CorruptionError(f"index state: ScopeTrees over {count} records, more than the "
                                  "columns hold")
        if order.ndim != 1 or <uint64_t>order.shape[0] != count:
            raise CorruptionError(f"index state: ScopeTrees hold {order.shape[0]} records, the "
                                  f"columns {count}")
        c.rows = count      # no tree may name a record past the count
        cdef ScopeTrees trees = cls(partitions)
        cdef const uint32_t[::1] rows = order
        if count:
            trees._load(&rows[0], count, &c, &k[0], &p[0], True)
        return trees
