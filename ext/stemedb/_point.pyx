"""One record by ID in one compiled call: the point reads of an open store (private API).

Owns: `PointReader`, which answers `Database.get_encoded`, `get` and
`contains` from the ID index probe to the result without a chain of Python
functions: the probe (`IdIndex.candidates`), the location column, the
frame's checks (magic, length, CRC, the ID in its header) straight from the
segment's read-only mapping, and one bytes object copied out of it (or a
record decoded from the mapping). No numpy array is
made per call; the column arrays are read through views that are refreshed
only when the engine has replaced an array (it doubles them as the store
grows).

Must never: serve bytes whose frame fails its checks, read a segment
mapping after `close()` (every call checks the flag first, and the mapping
is held only for the length of one call), or read the indexes without the
engine's state lock (a writer changes them under it).

Error handling: as the Python read path — NotFound for an absent ID,
CorruptionError (built by the engine's `unreadable`) for a damaged frame
or a missing segment file, InvalidRecord for an ID that is not 32 bytes,
DatabaseClosed after `close()`.
"""

from cpython.object cimport PyObject
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp

from stemedb._codec cimport Record, decode_at
from stemedb._index cimport IdIndex
from stemedb._segment cimport FRAME_HEADER_SIZE, check_frame

from stemedb.errors import CorruptionError, DatabaseClosed, InvalidRecord, NotFound

cdef enum:
    ID_SIZE = 32
    FRAME_ID_AT = 16          # a frame header's record ID (docs/format.md, "Segment files")
    MAX_CANDIDATES = 8        # records sharing a slot key half, read through their frames
    FRAME_OURS = 0            # what _from_frame found: the record asked for,
    FRAME_OTHER = 1           # a sound frame of another record,
    FRAME_BAD = 2             # a frame that fails its checks


cdef class PointReader:
    """The point reads of one open store; thread-safe (under the engine's state lock).

    `state` is the engine's `State` (its `ids` index and `columns.arrays`),
    `segments` the log's list of segments (each with `.buffer`), `lock` the
    state lock, `normalise(id)` turns a bytes-like ID into 32 bytes or raises
    InvalidRecord, `unreadable(segment, offset, name)` builds the error for a
    damaged frame, and `path` names the store in the error after close.
    """

    cdef IdIndex _ids
    cdef object _columns
    cdef dict _arrays
    cdef list _segments
    cdef object _acquire, _release
    cdef object _normalise, _unreadable
    cdef str _path
    cdef bint _closed
    # views of the columns, refreshed when the engine replaces an array
    cdef object _id_array, _location_array
    cdef const uint8_t[:, ::1] _id_view
    cdef const uint64_t[::1] _location_view

    def __init__(self, state, list segments, lock, normalise, unreadable, str path):
        # A State keeps its index and its columns' dict for its whole life (the engine
        # replaces arrays inside the dict, which _refresh follows).
        self._ids = state.ids
        self._columns = state.columns
        self._arrays = state.columns.arrays
        self._segments = segments
        self._acquire = lock.acquire
        self._release = lock.release
        self._normalise = normalise
        self._unreadable = unreadable
        self._path = path
        self._closed = False

    def close(self):
        """Answer DatabaseClosed from now on and drop the views of the columns.

        Called under the state lock (the engine's close), so a read that found
        the store open and then waited for the lock sees `_closed` once it has it.
        """
        self._closed = True
        self._id_array = self._location_array = None
        self._id_view = None
        self._location_view = None

    @property
    def closed(self):
        return self._closed

    cdef inline int _refresh(self, dict arrays) except -1:
        cdef object ids = arrays["id"]
        cdef object locations = arrays["location"]
        if ids is not self._id_array:
            self._id_view = ids
            self._id_array = ids
        if locations is not self._location_array:
            self._location_view = locations
            self._location_array = locations
        return 0

    cdef inline int _check_open(self) except -1:
        if self._closed:
            raise DatabaseClosed(f"{self._path}: the database is closed; open it again to use it")
        return 0

    cdef inline bytes _key(self, record_id):
        self._check_open()
        if type(record_id) is bytes and PyBytes_GET_SIZE(record_id) == ID_SIZE:
            return <bytes>record_id
        return <bytes>self._normalise(record_id)

    cdef int64_t _row(self, bytes key) except -2:
        """The record number of `key`, or -1; the state lock must be held."""
        self._refresh(self._arrays)
        if self._id_view.shape[0] == 0:
            return -1
        return self._ids.find_one(<const uint8_t *>PyBytes_AS_STRING(key), &self._id_view[0, 0],
                            <size_t>self._id_view.shape[0])

    cdef object _read(self, record_id, bint decoded):
        """The stored bytes of the record with this ID, or the record decoded from them.

        The index gives the records whose slot matches the ID's key (almost always one);
        each one's frame carries its ID in the header, so the frame itself (CRC-checked)
        says whether it is the record asked for, without a read of the ID column. Only a
        frame that fails its checks is identified through the ID column, to tell "this
        record is damaged" from "another record is damaged".
        """
        cdef bytes key = self._key(record_id)
        cdef const uint8_t *id_bytes = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef int64_t rows[MAX_CANDIDATES]
        cdef uint64_t locations[MAX_CANDIDATES]
        cdef Py_ssize_t n, i
        cdef int64_t row
        cdef Py_ssize_t offset
        # borrowed: the log's list holds every segment for as long as the store is open
        cdef PyObject *segments[MAX_CANDIDATES]
        cdef object segment, found
        cdef int state
        self._acquire()
        try:
            self._check_open()   # again under the lock: close() may have released the indexes
            n = self._ids.candidates(id_bytes, rows, MAX_CANDIDATES)
            if n < 0:             # a crowded slot run: the full probe through the ID column
                row = self._row(key)
                n = 0 if row < 0 else 1
                rows[0] = row
            if n:
                self._refresh(self._arrays)
            for i in range(n):
                locations[i] = self._location_view[rows[i]]
                segments[i] = self._segment_of(locations[i], key.hex())
        finally:
            self._release()
        for i in range(n):
            segment = <object>segments[i]
            offset = <Py_ssize_t>(locations[i] & <uint64_t>0xFFFFFFFF)
            found = self._from_frame(segment, offset, id_bytes, decoded, &state)
            if state == FRAME_OURS:
                return found
            if state == FRAME_BAD and self._is_row_of(rows[i], id_bytes):
                raise self._unreadable(segment, offset, f"record {key.hex()}")
        raise NotFound(f"no record with ID {key.hex()}")

    cdef object _from_frame(self, object segment, Py_ssize_t offset, const uint8_t *id_bytes,
                            bint decoded, int *state):
        """The frame at `offset` of `segment`: its bytes or its record when it passes its checks
        (and, with `id_bytes`, carries that ID), *state = FRAME_OURS; FRAME_OTHER when it is a
        sound frame of another record; FRAME_BAD when it fails its checks. The segment's
        buffer is held for this call only."""
        cdef Py_buffer view
        cdef uint32_t length
        cdef Py_ssize_t consumed = 0
        cdef const uint8_t *frame
        cdef object out = None
        state[0] = FRAME_BAD
        PyObject_GetBuffer(segment.buffer, &view, PyBUF_SIMPLE)
        try:
            frame = <const uint8_t *>view.buf + offset
            if offset < view.len and check_frame(<const uint8_t *>view.buf, offset, view.len,
                                                 &length) == 1:
                if id_bytes != NULL and memcmp(frame + FRAME_ID_AT, id_bytes, ID_SIZE) != 0:
                    state[0] = FRAME_OTHER      # another record with the same key half
                elif not decoded:
                    out = PyBytes_FromStringAndSize(<const char *>frame + FRAME_HEADER_SIZE, length)
                    state[0] = FRAME_OURS
                else:
                    # straight from the mapping: no bytes object for the payload first
                    out = decode_at(frame + FRAME_HEADER_SIZE, length, &consumed)
                    if consumed != length:
                        raise InvalidRecord(
                            f"trailing bytes: {length - consumed} bytes after the record's proof")
                    state[0] = FRAME_OURS
        finally:
            PyBuffer_Release(&view)
        return out

    cdef PyObject *_segment_of(self, uint64_t location, str record) except NULL:
        """The segment a location names (borrowed: the log's list only grows while the store
        is open, and this reader keeps the list); a location past the last segment is damage."""
        cdef Py_ssize_t number = <Py_ssize_t>(location >> 32)
        if number >= len(self._segments):
            raise CorruptionError(
                f"{self._path}: the index locates {'record ' + record if record else 'a record'} in "
                f"segment {number}, but the store has {len(self._segments)} segments; it is not "
                "served (check the store with `stemedb verify`)", path=self._path)
        return <PyObject *>self._segments[number]

    cdef bint _is_row_of(self, int64_t row, const uint8_t *id_bytes) except -1:
        """Whether record `row` is the record with this ID, by the ID column."""
        cdef bint same
        self._acquire()
        try:
            self._check_open()   # again under the lock: close() may have released the indexes
            self._refresh(self._arrays)
            same = (row < self._id_view.shape[0]
                    and memcmp(&self._id_view[row, 0], id_bytes, ID_SIZE) == 0)
        finally:
            self._release()
        return same

    def record_at(self, Py_ssize_t row):
        """The record with this record number, decoded straight from its checked frame."""
        cdef uint64_t location
        cdef object segment, out
        cdef int state
        self._check_open()
        self._acquire()
        try:
            self._check_open()   # again under the lock: close() may have released the indexes
            if row < 0 or row >= self._columns.count:
                raise IndexError(f"record number {row}: the store holds {self._columns.count}")
            self._refresh(self._arrays)
            location = self._location_view[row]
            segment = <object>self._segment_of(location, None)
        finally:
            self._release()
        out = self._from_frame(segment, <Py_ssize_t>(location & <uint64_t>0xFFFFFFFF), NULL, True,
                               &state)
        if state != FRAME_OURS:
            raise self._unreadable(segment, <Py_ssize_t>(location & <uint64_t>0xFFFFFFFF), "record")
        return out

    def get_encoded(self, record_id):
        """The stored bytes (content + proof) of the record with this ID, checksum-checked."""
        return self._read(record_id, False)

    def get(self, record_id):
        """The record with this ID, decoded from its checksum-checked bytes."""
        return self._read(record_id, True)

    def contains(self, record_id):
        """Whether a record with this ID is stored."""
        cdef bytes key = self._key(record_id)
        cdef int64_t row
        self._acquire()
        try:
            self._check_open()   # again under the lock: close() may have released the indexes
            row = self._row(key)
        finally:
            self._release()
        return row >= 0
