"""In-memory indexes of the storage engine (private API).

Owns: IdIndex, the table from a 32-byte record ID to its record number;
PostingIndex, the multi-map from a uint64 key to the ascending record numbers
that have it (posting lists by subject, (subject, predicate), predicate,
signer, votes-by-assertion); and the layout of the arrays that state() returns and from_state() accepts.

Record numbers are dense uint32 in append order; NO_RECORD (0xFFFFFFFF) means
"none" and is never a record number. Everything lives in numpy arrays, a few
bytes per record (no Python object per record), and every loop over records
runs without the GIL.

Must never: read or write files (the engine persists state() itself,
atomically), keep a copy of the full IDs (they stay in the engine's ID column
and are passed in as `all_ids`), trust an 8-byte key match without comparing
the full 32-byte ID, or compute keys (the keys of byte strings are
_codec's: subject_key, pair_key, ...).

Threads: any number of concurrent readers (lookups, get) is fine; a call that
changes an index needs it to itself, and raises RuntimeError instead of
corrupting it when it does not have it. The engine serialises its writers.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp


import numpy as np

from stemedb.errors import CorruptionError


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define stm_prefetch_read(p) __builtin_prefetch((p), 0)
    #define stm_prefetch_write(p) __builtin_prefetch((p), 1)
    #else
    #define stm_prefetch_read(p) ((void)(p))
    #define stm_prefetch_write(p) ((void)(p))
    #endif
    #define STM_HIGH_HALF 0xFFFFFFFF00000000ull
    #define STM_EMPTY_SLOT 0x00000000FFFFFFFFull
    """
    void stm_prefetch_read(const void *p) nogil
    void stm_prefetch_write(const void *p) nogil
    # IdIndex slots: the part that holds the key's top half, and an empty slot
    # (top half 0, record number STM_NO_RECORD). Macros, so they fold into the code.
    const uint64_t HIGH_HALF "STM_HIGH_HALF"
    const uint64_t EMPTY_SLOT "STM_EMPTY_SLOT"


NO_RECORD = 0xFFFFFFFF
# Version of the dicts returned by state(); from_state() refuses any other.
STATE_FORMAT = 1

cdef enum:
    ID_SIZE = 32
    # Smallest table: 16 slots. Also keeps 64 - bits a valid shift.
    MIN_BITS = 4
    # IdIndex derives a key's home slot from the 32 key bits kept in the slot,
    # so it cannot use more than 32 bits of slot number.
    MAX_ID_BITS = 32
    # Only stops runaway growth: 2**40 rows would be 16 TiB.
    MAX_POSTING_BITS = 40
    # Lookups are done GROUP at a time: first every home slot is prefetched,
    # then every candidate's full ID, then the IDs are compared. A random
    # probe into a table of 100+ MB is a cache miss; in groups the misses
    # overlap instead of queueing. Hits per second at 10 M records, measured:
    # 19 M at 8, 23 M at 16, 26 M at 32, 13 M at 64 (prefetched lines evicted).
    GROUP = 32
    # Posting lists that get_many walks at once (see _walk_chains).
    CHAINS = 16
    # How far ahead PostingIndex.add_many prefetches the table row of a key.
    AHEAD = 8

# Both tables grow x2 when an insertion would pass 3/4 full. Linear probing
# stays short at 3/4 (about 2.5 slots for a hit, 8.5 for a miss, and 8 IdIndex
# slots share a cache line); 1/2 would take 1.5 times the memory, and
# IdIndex could no longer stay under 24 bytes per record right after growing
# (8 bytes / (3/8) = 21.3 at the worst point, 8 / (1/4) = 32 at 1/2).
cdef inline bint _over_load(uint64_t count, int bits) noexcept nogil:
    return count * 4 > (<uint64_t>3) << bits


cdef int _bits_for(uint64_t count) noexcept:
    """Fewest table bits that hold `count` entries within the load limit."""
    cdef int bits = MIN_BITS
    while _over_load(count, bits):
        bits += 1
    return bits


# Byte order of the persisted keys: the first 8 bytes of an ID or digest,
# read little-endian on every machine (gcc turns this into one load on x86).
cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


# ----------------------------------------------------------------------------
# Argument checks, shared by both classes. They run with the GIL, before any
# change, so that a bad argument leaves an index as it was.

def _id_rows(ids, str name):
    """`ids` as a C-contiguous (n, 32) uint8 array; no copy if it already is one."""
    if isinstance(ids, (list, tuple)):
        # numpy would pad a short bytes object to the longest one without a word.
        for item in ids:
            if isinstance(item, (bytes, bytearray)) and len(item) != ID_SIZE:
                raise ValueError(f"{name}: an ID is {ID_SIZE} bytes, not {len(item)}")
    arr = np.asarray(ids)
    if arr.ndim == 1 and arr.dtype.kind in "SV" and arr.dtype.itemsize == ID_SIZE:
        arr = np.ascontiguousarray(arr).view(np.uint8).reshape(-1, ID_SIZE)
    elif arr.size == 0 and arr.shape in ((0,), (0, ID_SIZE)):
        return np.empty((0, ID_SIZE), dtype=np.uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} must be an (n, 32) uint8 array, not {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != ID_SIZE:
        raise ValueError(f"{name} must be an (n, 32) uint8 array, not shape {arr.shape}")
    return np.ascontiguousarray(arr)


_DTYPE_MAX = {np.dtype(np.uint32): 0xFFFFFFFF, np.dtype(np.uint64): 0xFFFFFFFFFFFFFFFF}


def _integers(values, str name, Py_ssize_t n, dtype, maximum):
    """`values` as a contiguous 1-D array of `dtype`, each in [0, maximum]."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not {arr.ndim}-dimensional")
    if n >= 0 and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but ids/keys have {n}")
    if arr.size == 0:
        return np.empty(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, not {arr.dtype}")
    if arr.dtype != dtype:
        if arr.min() < 0 or arr.max() > maximum:
            raise ValueError(f"{name} must be within 0..{maximum}")
    elif maximum != _DTYPE_MAX[arr.dtype] and arr.max() > maximum:
        raise ValueError(f"{name} must be within 0..{maximum} ({maximum + 1} means no record)")
    return np.ascontiguousarray(arr, dtype=dtype)


def _record_numbers(recnos, Py_ssize_t n):
    return _integers(recnos, "recnos", n, np.uint32, NO_RECORD - 1)


def _keys(keys):
    return _integers(keys, "keys", -1, np.uint64, 0xFFFFFFFFFFFFFFFF)


def _state_array(dict state, str name, dtype, int ndim):
    """A private, writable, native-order copy of state[name] (never an alias
    of the caller's array, which may be a read-only mapping of a file)."""
    try:
        arr = np.array(state[name], dtype=dtype, copy=True, order="C")
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptionError(f"index state: {name!r} is missing or not {np.dtype(dtype)}: {error}")
    if arr.ndim != ndim:
        raise CorruptionError(f"index state: {name!r} has {arr.ndim} dimensions, expected {ndim}")
    return arr


def _state_int(dict state, str name):
    value = state.get(name)
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or value < -1:
        raise CorruptionError(f"index state: {name!r} is {value!r}, not a count")
    return value


def _check_format(dict state, str kind):
    if state.get("kind") != kind or state.get("format") != STATE_FORMAT:
        raise CorruptionError(
            f"index state is {state.get('kind')!r} format {state.get('format')!r}; "
            f"expected {kind!r} format {STATE_FORMAT} (rebuild the index from the log)")


def _power_of_two_bits(Py_ssize_t length, int max_bits, str name):
    cdef int bits = MIN_BITS
    while bits < max_bits and ((<Py_ssize_t>1) << bits) < length:
        bits += 1
    if ((<Py_ssize_t>1) << bits) != length:
        raise CorruptionError(
            f"index state: {name} has {length} slots, not a power of two in 2**{MIN_BITS}..2**{max_bits}")
    return bits


cdef class _Guarded:
    """What both indexes share: refusing a change while anyone else uses the arrays.

    The methods run with the GIL held, so a check and the update that
    follows it cannot interleave with another thread's.
    """

    cdef int _begin_read(self) except -1:
        if self._writing:
            raise RuntimeError(f"{type(self).__name__} is being modified by another thread")
        self._readers += 1
        return 0

    cdef void _end_read(self) noexcept:
        self._readers -= 1

    cdef int _begin_write(self) except -1:
        if self._writing or self._readers:
            raise RuntimeError(
                f"{type(self).__name__} is in use by another thread; the engine must serialise writes")
        self._writing = True
        return 0

    cdef void _end_write(self) noexcept:
        self._writing = False

    def release(self):
        """Empty the index and free its arrays (the store is closing): what __init__ with
        no arguments makes. False, changing nothing, while another thread is using it."""
        if self._writing or self._readers:
            return False
        self.__init__()
        return True


# ----------------------------------------------------------------------------
# IdIndex: slot = (key & HIGH_HALF) | record number; empty slots hold NO_RECORD.

cdef inline bint _slot_empty(uint64_t slot) noexcept nogil:
    return <uint32_t>slot == STM_NO_RECORD


cdef inline size_t _id_home(uint64_t key_or_slot, int bits) noexcept nogil:
    # The top bits of a slot are the top bits of its key, so growing the
    # table never needs the IDs themselves.
    return <size_t>(key_or_slot >> (64 - bits))


cdef inline size_t _id_candidate(const uint64_t *slots, size_t mask, uint64_t key,
                                 size_t pos) noexcept nogil:
    """First slot from pos that is empty or has key's top half."""
    cdef uint64_t slot = slots[pos]
    while not _slot_empty(slot) and (slot & HIGH_HALF) != (key & HIGH_HALF):
        pos = (pos + 1) & mask
        slot = slots[pos]
    return pos


cdef inline int64_t _id_find(const uint64_t *slots, size_t mask, uint64_t key, const uint8_t *id,
                             const uint8_t *all_ids, size_t rows, size_t pos,
                             uint32_t *bad) noexcept nogil:
    """Record number of `id` (whose key is `key`), probing from pos; -1 if absent.

    Returns -2 and sets *bad when a candidate's record number has no row in all_ids.
    """
    cdef uint64_t slot
    cdef uint32_t record
    while True:
        pos = _id_candidate(slots, mask, key, pos)
        slot = slots[pos]
        record = <uint32_t>slot
        if record == STM_NO_RECORD:
            return -1
        if record >= rows:
            bad[0] = record
            return -2
        if memcmp(all_ids + <size_t>record * ID_SIZE, id, ID_SIZE) == 0:
            return record
        pos = (pos + 1) & mask      # same top half, different ID: probe on


cdef Py_ssize_t _id_lookup_rows(const uint64_t *slots, int bits, const uint8_t *ids, Py_ssize_t n,
                                const uint8_t *all_ids, size_t rows, int64_t *out,
                                uint32_t *bad) noexcept nogil:
    """out[i] = record number of ids[i], or -1. Returns -1, or the row at
    which a candidate record number (in *bad) had no row in all_ids."""
    cdef uint64_t keys[GROUP]
    cdef size_t pos[GROUP]
    cdef size_t mask = ((<size_t>1) << bits) - 1
    cdef Py_ssize_t base, j, m
    cdef uint32_t record
    cdef int64_t found
    base = 0
    while base < n:
        m = min(<Py_ssize_t>GROUP, n - base)
        for j in range(m):
            keys[j] = _le64(ids + (base + j) * ID_SIZE)
            pos[j] = _id_home(keys[j], bits)
            stm_prefetch_read(&slots[pos[j]])
        for j in range(m):
            pos[j] = _id_candidate(slots, mask, keys[j], pos[j])
            record = <uint32_t>slots[pos[j]]
            if record != STM_NO_RECORD and record < rows:
                stm_prefetch_read(all_ids + <size_t>record * ID_SIZE)
        for j in range(m):
            found = _id_find(slots, mask, keys[j], ids + (base + j) * ID_SIZE,
                             all_ids, rows, pos[j], bad)
            if found == -2:
                return base + j
            out[base + j] = found
        base += GROUP
    return -1


cdef void _id_first_occurrences(const uint8_t *ids, Py_ssize_t n, const int64_t *found,
                                uint32_t *scratch, int bits, uint8_t *is_new) noexcept nogil:
    """is_new[i] = ids[i] is absent from the index (found[i] < 0) and from ids[:i].

    scratch is an empty (all NO_RECORD) table of 1 << bits batch row numbers.
    It is needed because the index cannot compare against rows of this batch:
    all_ids need not hold them yet.
    """
    cdef size_t mask = ((<size_t>1) << bits) - 1, pos
    cdef Py_ssize_t i
    cdef uint32_t other
    cdef uint64_t key
    for i in range(n):
        is_new[i] = 0
        if found[i] >= 0:
            continue
        key = _le64(ids + i * ID_SIZE)
        pos = _id_home(key, bits)
        while True:
            other = scratch[pos]
            if other == STM_NO_RECORD:
                scratch[pos] = <uint32_t>i
                is_new[i] = 1
                break
            if (_le64(ids + <size_t>other * ID_SIZE) == key
                    and memcmp(ids + <size_t>other * ID_SIZE, ids + i * ID_SIZE, ID_SIZE) == 0):
                break
            pos = (pos + 1) & mask


cdef void _id_place(uint64_t *slots, int bits, const uint8_t *ids, const uint32_t *records,
                    const uint8_t *is_new, Py_ssize_t n) noexcept nogil:
    """Puts ids[i] -> records[i] in the first empty slot from its home, where is_new[i]."""
    cdef size_t pos[GROUP]
    cdef size_t mask = ((<size_t>1) << bits) - 1, p
    cdef Py_ssize_t base, j, m
    cdef uint64_t key
    base = 0
    while base < n:
        m = min(<Py_ssize_t>GROUP, n - base)
        for j in range(m):
            if is_new[base + j]:
                pos[j] = _id_home(_le64(ids + (base + j) * ID_SIZE), bits)
                stm_prefetch_write(&slots[pos[j]])
        for j in range(m):
            if is_new[base + j]:
                key = _le64(ids + (base + j) * ID_SIZE)
                p = pos[j]
                while not _slot_empty(slots[p]):
                    p = (p + 1) & mask
                slots[p] = (key & HIGH_HALF) | records[base + j]
        base += GROUP


cdef void _id_rehash(const uint64_t *old, size_t old_capacity, uint64_t *slots,
                     int bits) noexcept nogil:
    # Homes keep their order when the table doubles (slot h goes to 2h or
    # 2h+1), so this is a streaming pass over both tables, not random access.
    cdef size_t mask = ((<size_t>1) << bits) - 1, i, p
    for i in range(old_capacity):
        if not _slot_empty(old[i]):
            p = _id_home(old[i], bits)
            while not _slot_empty(slots[p]):
                p = (p + 1) & mask
            slots[p] = old[i]


cdef Py_ssize_t _misplaced_slot(const uint64_t *table, size_t stride, size_t capacity, int bits,
                                bint posting) noexcept nogil:
    """First slot that linear probing from its home cannot reach (an empty
    slot lies between), or -1. Rows are `stride` words; the table has at least
    one empty slot."""
    cdef size_t mask = capacity - 1, start = 0, p, home, k
    cdef uint64_t word
    while True:                 # start the scan just after an empty slot
        if _table_empty(table, stride, start, posting):
            break
        start += 1
    cdef size_t cluster = (start + 1) & mask
    for k in range(1, capacity + 1):
        p = (start + k) & mask
        if _table_empty(table, stride, p, posting):
            cluster = (p + 1) & mask
            continue
        word = table[p * stride]
        home = _posting_home(word, bits) if posting else _id_home(word, bits)
        if ((p - home) & mask) > ((p - cluster) & mask):
            return <Py_ssize_t>p
    return -1


cdef inline bint _table_empty(const uint64_t *table, size_t stride, size_t p,
                              bint posting) noexcept nogil:
    if posting:
        return (table[p * stride + 1] >> 32) == 0
    return _slot_empty(table[p * stride])


cdef class IdIndex(_Guarded):
    """Record ID (32 bytes) -> record number, for the IDs of every stored record.

    The key of an ID is its first 8 bytes, little-endian. IDs are BLAKE3
    digests, hence uniform, so the key's top bits serve directly as the home
    slot (no further hashing). Each slot keeps the top 32 bits of the key and
    the record number (8 bytes; 10.7..21.3 bytes per record with the load
    between 3/8 and 3/4). A key match is only a candidate: the full ID is
    compared with all_ids[record number], so IDs that share 8 (or 4) bytes
    are told apart.

    `all_ids` is the engine's ID column: an (N, 32) uint8 array (an mmap is
    fine, read-only is fine) where all_ids[r] is the ID of record r. It must
    cover every record number already in the index; insert_many does not read
    the rows of the batch it inserts.

    Slots are compared by ID, but the table layout follows the keys, so IDs
    chosen to share their first bytes (costly with BLAKE3, but possible with
    enough work) make their probes longer; they cannot make them wrong.
    """

    def __init__(self, Py_ssize_t capacity=0):
        """An empty index that holds `capacity` IDs before it first grows."""
        if capacity < 0:
            raise ValueError(f"capacity must be non-negative, not {capacity}")
        cdef int bits = _bits_for(<uint64_t>capacity)
        if bits > MAX_ID_BITS:
            raise MemoryError(f"IdIndex cannot hold {capacity} IDs (at most 3 * 2**30)")
        self._slots = np.full((<Py_ssize_t>1) << bits, EMPTY_SLOT, dtype=np.uint64)
        self._bits = bits
        self._count = 0

    def __len__(self):
        return self._count

    def memory_bytes(self):
        """Bytes held by the index's arrays (the table; nothing per call)."""
        return self._slots.shape[0] * 8

    # -- internals --

    cdef int _lookup_into(self, const uint8_t[:, ::1] ids, const uint8_t[:, ::1] all_ids,
                          int64_t[::1] out) except -1:
        cdef uint64_t[::1] slots = self._slots
        cdef uint32_t bad = 0
        cdef Py_ssize_t n = ids.shape[0], row = -1
        if n == 0:
            return 0
        cdef const uint8_t *column = &all_ids[0, 0] if all_ids.shape[0] else NULL
        with nogil:
            row = _id_lookup_rows(&slots[0], self._bits, &ids[0, 0], n, column,
                                  <size_t>all_ids.shape[0], &out[0], &bad)
        if row >= 0:
            raise ValueError(
                f"the index holds record number {bad} but all_ids has only {all_ids.shape[0]} "
                "rows; pass the whole ID column")
        return 0

    cdef int _mark_new(self, const uint8_t[:, ::1] ids, const uint8_t[:, ::1] all_ids,
                       uint8_t[::1] is_new) except -1:
        cdef Py_ssize_t n = ids.shape[0]
        if n == 0:
            return 0
        if n >= STM_NO_RECORD:
            raise ValueError(f"a batch holds at most {STM_NO_RECORD - 1} IDs, not {n}")
        found = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] found_view = found
        self._lookup_into(ids, all_ids, found_view)
        cdef Py_ssize_t absent = int(np.count_nonzero(found < 0))
        cdef int bits = MIN_BITS
        while ((<Py_ssize_t>1) << bits) < 2 * absent:      # batch table at most half full
            bits += 1
        cdef uint32_t[::1] scratch = np.full((<Py_ssize_t>1) << bits, STM_NO_RECORD, dtype=np.uint32)
        with nogil:
            _id_first_occurrences(&ids[0, 0], n, &found_view[0], &scratch[0], bits, &is_new[0])
        return 0

    cdef int _reserve(self, uint64_t count) except -1:
        cdef int bits = _bits_for(count)
        if bits <= self._bits:
            return 0
        if bits > MAX_ID_BITS:
            raise MemoryError(f"IdIndex cannot hold {count} IDs (at most 3 * 2**30)")
        cdef uint64_t[::1] old = self._slots
        cdef uint64_t[::1] slots = np.full((<Py_ssize_t>1) << bits, EMPTY_SLOT, dtype=np.uint64)
        with nogil:
            _id_rehash(&old[0], <size_t>old.shape[0], &slots[0], bits)
        self._slots = slots
        self._bits = bits
        return 0

    # -- public API --

    def insert_many(self, ids, recnos, all_ids):
        """Adds ids[i] -> recnos[i] for every ID not yet held.

        Returns a bool array: True where ids[i] was inserted, False where the
        index already held that ID or ids[:i] contains it (the first of equal
        IDs in a batch wins; recnos of the others are ignored). recnos must be
        below NO_RECORD. The batch is checked before anything changes; the
        index either takes all of its new IDs or none (MemoryError).
        """
        rows = _id_rows(ids, "ids")
        cdef Py_ssize_t n = rows.shape[0]
        numbers = _record_numbers(recnos, n)
        column = _id_rows(all_ids, "all_ids")
        is_new = np.zeros(n, dtype=np.uint8)
        if n == 0:
            return is_new.view(np.bool_)
        cdef const uint8_t[:, ::1] id_view = rows
        cdef const uint32_t[::1] number_view = numbers
        cdef uint8_t[::1] new_view = is_new
        cdef uint64_t[::1] slots
        cdef Py_ssize_t added
        self._begin_write()
        try:
            self._mark_new(id_view, column, new_view)
            added = int(np.count_nonzero(is_new))
            if added:
                self._reserve(<uint64_t>(self._count + added))
                slots = self._slots
                with nogil:
                    _id_place(&slots[0], self._bits, &id_view[0, 0], &number_view[0],
                              &new_view[0], n)
                self._count += added
        finally:
            self._end_write()
        return is_new.view(np.bool_)

    def new_mask(self, ids, all_ids):
        """The bool array insert_many(ids, ..., all_ids) would return now, without inserting.

        For the ingest path: find which records are new before giving them
        record numbers and appending them, then insert_many those.
        """
        rows = _id_rows(ids, "ids")
        column = _id_rows(all_ids, "all_ids")
        is_new = np.zeros(rows.shape[0], dtype=np.uint8)
        self._begin_read()
        try:
            self._mark_new(rows, column, is_new)
        finally:
            self._end_read()
        return is_new.view(np.bool_)

    def lookup_many(self, ids, all_ids):
        """int64 array: the record number of each of ids, or -1 where absent."""
        rows = _id_rows(ids, "ids")
        column = _id_rows(all_ids, "all_ids")
        out = np.empty(rows.shape[0], dtype=np.int64)
        self._begin_read()
        try:
            self._lookup_into(rows, column, out)
        finally:
            self._end_read()
        return out

    def lookup(self, id, all_ids):
        """The record number of one 32-byte ID, or -1 where absent.

        The single-get hot path: for a bytes ID and an (n, 32) uint8 column
        it probes directly, without building arrays.
        """
        cdef const uint8_t[:, ::1] column
        if type(id) is not bytes or PyBytes_GET_SIZE(id) != ID_SIZE or not (
                isinstance(all_ids, np.ndarray) and all_ids.dtype == np.uint8 and all_ids.ndim == 2
                and all_ids.shape[1] == ID_SIZE and all_ids.flags.c_contiguous):
            return self._lookup_general(id, all_ids)
        column = all_ids
        return self.find_one(<const uint8_t *>PyBytes_AS_STRING(id),
                             &column[0, 0] if column.shape[0] else NULL, <size_t>column.shape[0])

    cdef int64_t find_one(self, const uint8_t *id, const uint8_t *all_ids, size_t rows) except -2:
        cdef uint64_t key = _le64(id)
        cdef uint32_t bad = 0
        cdef int64_t found
        self._begin_read()
        found = _id_find(&self._slots[0], ((<size_t>1) << self._bits) - 1, key, id, all_ids, rows,
                         _id_home(key, self._bits), &bad)
        self._end_read()
        if found == -2:
            raise ValueError(
                f"the index holds record number {bad} but all_ids has only {rows} rows; "
                "pass the whole ID column")
        return found

    cdef Py_ssize_t candidates(self, const uint8_t *id, int64_t *out, Py_ssize_t max_out) except -2:
        cdef uint64_t key = _le64(id)
        cdef size_t mask = ((<size_t>1) << self._bits) - 1
        cdef size_t pos = _id_home(key, self._bits)
        cdef uint64_t slot
        cdef Py_ssize_t n = 0
        self._begin_read()
        while True:
            pos = _id_candidate(&self._slots[0], mask, key, pos)
            slot = self._slots[pos]
            if _slot_empty(slot):
                break
            if n == max_out:
                n = -1
                break
            out[n] = <uint32_t>slot
            n += 1
            pos = (pos + 1) & mask
        self._end_read()
        return n

    def _lookup_general(self, id, all_ids):
        cdef const uint8_t[::1] one = np.frombuffer(id, dtype=np.uint8)
        if one.shape[0] != ID_SIZE:
            raise ValueError(f"an ID is {ID_SIZE} bytes, not {one.shape[0]}")
        return int(self.lookup_many(np.asarray(one).reshape(1, ID_SIZE), all_ids)[0])

    def contains(self, id, all_ids):
        """Whether the index holds this 32-byte ID."""
        return self.lookup(id, all_ids) >= 0

    def contains_many(self, ids, all_ids):
        """Bool array: whether the index holds each of ids."""
        return self.lookup_many(ids, all_ids) >= 0

    def state(self, bint copy=True):
        """The index as plain values, for the engine to persist and from_state to rebuild.

        {"kind": "IdIndex", "format": 1, "slots": uint64 array, "count": int}.
        With copy=False "slots" is the live table: cheaper, but only valid
        until the next insert_many, which may change it in place.
        """
        self._begin_read()      # a copy taken during a write would be torn
        try:
            slots = np.asarray(self._slots)
            return {"kind": "IdIndex", "format": STATE_FORMAT,
                    "slots": slots.copy() if copy else slots, "count": self._count}
        finally:
            self._end_read()

    @classmethod
    def from_state(cls, state):
        """An index rebuilt from state(); the arrays are copied, never shared.

        Raises CorruptionError (then rebuild from the log) if the state is
        inconsistent: wrong kind or format, a size that is not a power of
        two, a count that disagrees with the slots, or a slot that a lookup
        could not reach.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, not {type(state).__name__}")
        _check_format(state, "IdIndex")
        slots = _state_array(state, "slots", np.uint64, 1)
        count = _state_int(state, "count")
        cdef int bits = _power_of_two_bits(slots.shape[0], MAX_ID_BITS, "slots")
        cdef uint64_t[::1] view = slots
        cdef Py_ssize_t occupied = int(np.count_nonzero((slots & np.uint64(0xFFFFFFFF)) != NO_RECORD))
        if occupied != count or _over_load(<uint64_t>count, bits):
            raise CorruptionError(
                f"index state: IdIndex count {count} but {occupied} of {slots.shape[0]} slots used")
        cdef Py_ssize_t misplaced
        with nogil:
            misplaced = _misplaced_slot(&view[0], 1, <size_t>view.shape[0], bits, False)
        if misplaced >= 0:
            raise CorruptionError(f"index state: IdIndex slot {misplaced} is unreachable")
        cdef IdIndex index = cls.__new__(cls)
        index._slots = view
        index._bits = bits
        index._count = count
        return index


# ----------------------------------------------------------------------------
# PostingIndex: table rows [key, head | count << 32]; prev[] chains records.

cdef inline uint64_t _mix64(uint64_t key) noexcept nogil:
    # Posting keys need not be uniform (a record number may serve as a key),
    # so they are scrambled before their top bits pick the home slot. This is
    # MurmurHash3's fmix64: a bijection, fixed, so persisted tables stay valid.
    key ^= key >> 33
    key *= <uint64_t>0xff51afd7ed558ccd
    key ^= key >> 33
    key *= <uint64_t>0xc4ceb9fe1a85ec53
    key ^= key >> 33
    return key


cdef inline size_t _posting_home(uint64_t key, int bits) noexcept nogil:
    return <size_t>(_mix64(key) >> (64 - bits))


cdef inline size_t _posting_row(const uint64_t *table, int bits, uint64_t key) noexcept nogil:
    """Row holding key, or the empty row where it belongs."""
    cdef size_t mask = ((<size_t>1) << bits) - 1
    cdef size_t p = _posting_home(key, bits)
    while (table[2 * p + 1] >> 32) != 0 and table[2 * p] != key:
        p = (p + 1) & mask
    return p


cdef Py_ssize_t _posting_add(uint64_t *table, int bits, Py_ssize_t *keys_held, uint32_t *prev,
                             const uint64_t *keys, const uint32_t *records,
                             Py_ssize_t start, Py_ssize_t n) noexcept nogil:
    """Adds keys[i] -> records[i] for i from start; returns n, or the first i
    whose key is new and would pass the load limit (grow, then call again)."""
    cdef Py_ssize_t i
    cdef size_t p
    cdef uint64_t value
    cdef uint32_t record
    for i in range(start, n):
        if i + AHEAD < n:
            stm_prefetch_write(&table[2 * _posting_home(keys[i + AHEAD], bits)])
        p = _posting_row(table, bits, keys[i])
        value = table[2 * p + 1]
        record = records[i]
        if (value >> 32) == 0:
            if _over_load(<uint64_t>keys_held[0] + 1, bits):
                return i
            table[2 * p] = keys[i]
            table[2 * p + 1] = ((<uint64_t>1) << 32) | record
            prev[record] = STM_NO_RECORD
            keys_held[0] += 1
        else:
            prev[record] = <uint32_t>value
            table[2 * p + 1] = (((value >> 32) + 1) << 32) | record
    return n


cdef inline bint _start_list(const uint64_t *values, const int64_t *offsets, Py_ssize_t n,
                             Py_ssize_t *next_key, uint32_t *cursor, int64_t *position,
                             int64_t *first) noexcept nogil:
    """Points a lane at the next key with records; False when none is left."""
    while next_key[0] < n and (values[next_key[0]] >> 32) == 0:
        next_key[0] += 1
    if next_key[0] == n:
        position[0] = first[0] = 0
        return False
    cursor[0] = <uint32_t>values[next_key[0]]
    first[0] = offsets[next_key[0]]
    position[0] = offsets[next_key[0] + 1]
    next_key[0] += 1
    return True


cdef bint _walk_chains(const uint32_t *prev, const uint64_t *values, const int64_t *offsets,
                       uint32_t *out, Py_ssize_t n) noexcept nogil:
    """Writes the records of key i to out[offsets[i]:offsets[i+1]], ascending,
    for each i (values[i] is its table value). False if a chain ends before
    its count (a corrupt state).

    Each step along a chain waits for a cache miss on prev; walking CHAINS
    lists in turn keeps that many misses in flight instead of one.
    """
    cdef uint32_t cursor[CHAINS]    # record to write next, per lane
    cdef int64_t position[CHAINS]   # out[position - 1] is written next (lists fill backwards)
    cdef int64_t first[CHAINS]      # start of the lane's list in out; position == first: idle
    cdef Py_ssize_t next_key = 0, lane, active = 0
    cdef uint32_t record
    for lane in range(CHAINS):
        active += _start_list(values, offsets, n, &next_key, &cursor[lane], &position[lane],
                              &first[lane])
    while active:
        for lane in range(CHAINS):
            if position[lane] == first[lane]:
                continue
            record = cursor[lane]
            if record == STM_NO_RECORD:
                return False
            position[lane] -= 1
            out[position[lane]] = record
            if position[lane] != first[lane]:
                cursor[lane] = prev[record]
            elif not _start_list(values, offsets, n, &next_key, &cursor[lane], &position[lane],
                                 &first[lane]):
                active -= 1
    return True


cdef void _posting_rehash(const uint64_t *old, size_t old_capacity, uint64_t *table,
                          int bits) noexcept nogil:
    cdef size_t mask = ((<size_t>1) << bits) - 1, i, p
    for i in range(old_capacity):
        if (old[2 * i + 1] >> 32) != 0:
            p = _posting_home(old[2 * i], bits)
            while (table[2 * p + 1] >> 32) != 0:
                p = (p + 1) & mask
            table[2 * p] = old[2 * i]
            table[2 * p + 1] = old[2 * i + 1]


cdef Py_ssize_t _bad_link(const uint32_t *prev, Py_ssize_t length) noexcept nogil:
    """First r whose prev[r] is neither NO_RECORD nor below r, or -1. Links
    that always go down are what guarantees every chain walk ends."""
    cdef Py_ssize_t r
    for r in range(length):
        if prev[r] != STM_NO_RECORD and prev[r] >= r:
            return r
    return -1


cdef class PostingIndex(_Guarded):
    """uint64 key -> the record numbers having that key, ascending.

    A table row per key holds the key, its latest record number (head) and
    its count; prev[r] links record r to the previous record with its key.
    Appending is O(1), a lookup walks the chain back from the head. Memory:
    4 bytes per record number (prev, covering every record number up to the
    highest added, keyed or not; up to 25% more just after it grows) plus 16
    bytes per table slot, i.e. 21..43 bytes per distinct key.

    One key per record number: a record with several keys in one index (a
    co-signed record under the signer index) needs one entry per key, which
    this layout cannot express; see add_many.
    """

    def __init__(self):
        self._table = np.zeros(((<Py_ssize_t>1) << MIN_BITS, 2), dtype=np.uint64)
        self._prev = np.empty(0, dtype=np.uint32)
        self._bits = MIN_BITS
        self._keys = 0
        self._entries = 0
        self._last = -1

    def __len__(self):
        """Distinct keys."""
        return self._keys

    def memory_bytes(self):
        """Bytes held by the index's arrays (table and prev)."""
        return self._table.shape[0] * 16 + self._prev.shape[0] * 4

    cdef int _grow_prev(self, Py_ssize_t needed) except -1:
        cdef Py_ssize_t length = self._prev.shape[0]
        if needed <= length:
            return 0
        # x1.25 rather than x2: prev is the bulk of the index (4 bytes per
        # record), and copying it a few more times costs far less than the slack.
        length = max(needed, length + length // 4, 1024)
        prev = np.full(length, STM_NO_RECORD, dtype=np.uint32)
        prev[:self._prev.shape[0]] = self._prev
        self._prev = prev
        return 0

    cdef int _grow_table(self) except -1:
        cdef int bits = self._bits + 1
        if bits > MAX_POSTING_BITS:
            raise MemoryError("PostingIndex table cannot grow further")
        cdef uint64_t[:, ::1] old = self._table
        cdef uint64_t[:, ::1] table = np.zeros(((<Py_ssize_t>1) << bits, 2), dtype=np.uint64)
        with nogil:
            _posting_rehash(&old[0, 0], <size_t>old.shape[0], &table[0, 0], bits)
        self._table = table
        self._bits = bits
        return 0

    def add_many(self, keys, recnos):
        """Appends recnos[i] to the list of keys[i], for each i.

        recnos must be strictly increasing, above every record number already
        added and below NO_RECORD; otherwise ValueError and nothing changes.
        Record numbers may skip (records without a key here). Hence one key per
        record: to file a record under several keys, use one PostingIndex per
        role or number the entries instead of the records.
        """
        key_array = _keys(keys)
        cdef Py_ssize_t n = key_array.shape[0]
        numbers = _record_numbers(recnos, n)
        if n == 0:
            return
        cdef const uint64_t[::1] key_view = key_array
        cdef const uint32_t[::1] number_view = numbers
        cdef Py_ssize_t i, bad = -1
        with nogil:
            for i in range(1, n):
                if number_view[i] <= number_view[i - 1]:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"recnos must be strictly increasing: recnos[{bad}] = "
                             f"{number_view[bad]} follows {number_view[bad - 1]}")
        if <int64_t>number_view[0] <= self._last:
            raise ValueError(f"recnos[0] = {number_view[0]} is not above the last record "
                             f"number added, {self._last}")
        cdef uint64_t[:, ::1] table
        cdef uint32_t[::1] prev
        cdef Py_ssize_t start, done = 0, keys_held
        self._begin_write()
        try:
            self._grow_prev(<Py_ssize_t>number_view[n - 1] + 1)
            prev = self._prev
            while True:
                table = self._table
                keys_held = self._keys
                start = done
                with nogil:
                    done = _posting_add(&table[0, 0], self._bits, &keys_held, &prev[0],
                                        &key_view[0], &number_view[0], start, n)
                # Kept exact after each pass, so that a MemoryError from
                # growing leaves a consistent index holding the first `done`.
                self._keys = keys_held
                self._entries += done - start
                if done > start:
                    self._last = number_view[done - 1]
                if done == n:
                    break
                self._grow_table()
        finally:
            self._end_write()

    def count(self, uint64_t key):
        """How many records have this key."""
        cdef const uint64_t[:, ::1] table = self._table
        self._begin_read()
        try:
            return <Py_ssize_t>(table[_posting_row(&table[0, 0], self._bits, key), 1] >> 32)
        finally:
            self._end_read()

    def get(self, uint64_t key):
        """uint32 array: the record numbers having this key, ascending."""
        flat, offsets = self.get_many(np.array([key], dtype=np.uint64))
        return flat

    def get_many(self, keys):
        """(flat, offsets): the records of keys[i] are flat[offsets[i]:offsets[i+1]].

        flat is uint32 (each list ascending), offsets int64 with len(keys) + 1 entries.
        """
        key_array = _keys(keys)
        cdef Py_ssize_t n = key_array.shape[0], i
        cdef const uint64_t[::1] key_view = key_array
        offsets = np.zeros(n + 1, dtype=np.int64)
        cdef int64_t[::1] offset_view = offsets
        values = np.zeros(n, dtype=np.uint64)
        cdef uint64_t[::1] value_view = values
        cdef const uint64_t[:, ::1] table
        cdef const uint32_t[::1] prev
        cdef uint32_t[::1] out
        cdef bint intact = True
        self._begin_read()
        try:
            table = self._table
            prev = self._prev
            if n == 0:
                return np.empty(0, dtype=np.uint32), offsets
            with nogil:
                for i in range(n):
                    if i + AHEAD < n:
                        stm_prefetch_read(&table[_posting_home(key_view[i + AHEAD], self._bits), 0])
                    value_view[i] = table[_posting_row(&table[0, 0], self._bits, key_view[i]), 1]
                    offset_view[i + 1] = offset_view[i] + <int64_t>(value_view[i] >> 32)
            flat = np.empty(offsets[n], dtype=np.uint32)
            if offsets[n] == 0:
                return flat, offsets
            out = flat
            with nogil:
                intact = _walk_chains(&prev[0], &value_view[0], &offset_view[0], &out[0], n)
            if not intact:
                raise CorruptionError("posting index: a chain ends before its count")
        finally:
            self._end_read()
        return flat, offsets

    def keys(self):
        """uint64 array of the distinct keys, in no particular order."""
        self._begin_read()
        try:
            table = np.asarray(self._table)
            return table[(table[:, 1] >> np.uint64(32)) != 0, 0].copy()
        finally:
            self._end_read()

    def state(self, bint copy=True):
        """The index as plain values, for the engine to persist and from_state to rebuild.

        {"kind": "PostingIndex", "format": 1, "table": (capacity, 2) uint64,
        "prev": uint32 (one entry per record number up to "last"), "keys",
        "entries", "last": int}. With copy=False the arrays are the live ones:
        only valid until the next add_many.
        """
        self._begin_read()      # a copy taken during a write would be torn
        try:
            table = np.asarray(self._table)
            prev = np.asarray(self._prev)[:self._last + 1]
            return {"kind": "PostingIndex", "format": STATE_FORMAT,
                    "table": table.copy() if copy else table,
                    "prev": prev.copy() if copy else prev,
                    "keys": self._keys, "entries": self._entries, "last": self._last}
        finally:
            self._end_read()

    @classmethod
    def from_state(cls, state):
        """An index rebuilt from state(); the arrays are copied, never shared.

        Raises CorruptionError (then rebuild from the log) if the state is
        inconsistent. Checks are linear and sequential (no chain walks), so a
        damaged chain can still surface later, as CorruptionError from get.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, not {type(state).__name__}")
        _check_format(state, "PostingIndex")
        table = _state_array(state, "table", np.uint64, 2)
        prev = _state_array(state, "prev", np.uint32, 1)
        keys = _state_int(state, "keys")
        entries = _state_int(state, "entries")
        last = _state_int(state, "last")
        if table.shape[1] != 2:
            raise CorruptionError(f"index state: table rows have {table.shape[1]} words, not 2")
        cdef int bits = _power_of_two_bits(table.shape[0], MAX_POSTING_BITS, "table")
        counts = table[:, 1] >> np.uint64(32)
        heads = table[:, 1] & np.uint64(0xFFFFFFFF)
        used = counts != 0
        problem = None
        if prev.shape[0] != last + 1:
            problem = f"prev has {prev.shape[0]} entries but the last record is {last}"
        elif int(np.count_nonzero(used)) != keys or _over_load(<uint64_t>keys, bits):
            problem = f"{keys} keys but {int(np.count_nonzero(used))} of {table.shape[0]} rows used"
        elif int(counts.sum()) != entries or entries > last + 1:
            problem = f"{entries} entries but the counts add up to {int(counts.sum())}"
        elif keys and int(heads[used].max()) > last:
            problem = f"a list starts at record {int(heads[used].max())}, after the last, {last}"
        if problem is not None:
            raise CorruptionError(f"index state: PostingIndex {problem}")
        cdef uint64_t[:, ::1] table_view = table
        cdef uint32_t[::1] prev_view = prev
        cdef Py_ssize_t misplaced, bad_link = -1
        with nogil:
            misplaced = _misplaced_slot(&table_view[0, 0], 2, <size_t>table_view.shape[0],
                                        bits, True)
            if prev_view.shape[0]:
                bad_link = _bad_link(&prev_view[0], prev_view.shape[0])
        if misplaced >= 0:
            raise CorruptionError(f"index state: PostingIndex row {misplaced} is unreachable")
        if bad_link >= 0:
            raise CorruptionError(
                f"index state: PostingIndex prev[{bad_link}] = {prev_view[bad_link]} does not go back")
        cdef PostingIndex index = cls.__new__(cls)
        index._table = table_view
        index._prev = prev_view
        index._bits = bits
        index._keys = keys
        index._entries = entries
        index._last = last
        return index
