"""The point reads (stemedb._point): get / get_encoded / contains in one compiled call."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest

import stemedb
from stemedb import Assertion

SIGNER = stemedb.Signer.from_seed(b"\x21" * 32)
SMALL = 1 << 16  # 64 KiB segments: the records spread over many segment files


def claims(start: int, n: int) -> list[Assertion]:
    return [Assertion(f"s{i % 7}", "p", i, timestamp=10_000 + i).sign(SIGNER) for i in range(start, start + n)]


def test_point_reads_agree_with_the_batch_path_across_growth_and_segments(tmp_path):
    # 3,000 records in batches: the column arrays are replaced (doubled) twice on the way,
    # and the reader must follow them; every earlier record stays readable after each batch.
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:
        stored: list[Assertion] = []
        for start in range(0, 3000, 500):
            batch = claims(start, 500)
            db.put_many(batch)
            stored += batch
            probe = stored[::37] + batch[-3:]
            blob, offsets, rows = db.get_encoded_many([r.id for r in probe])
            for i, record in enumerate(probe):
                raw = db.get_encoded(record.id)
                assert raw == bytes(blob[offsets[i]:offsets[i + 1]]) == record.encode()
                assert db.get(record.id) == record
                assert db.contains(record.id) and record.id in db
        assert len(db.log.segments) > 3
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:   # and from a snapshot
        assert all(db.get(r.id) == r for r in stored[::101])


def test_ids_in_other_forms_and_malformed_ones(tmp_path):
    with stemedb.open(tmp_path / "db") as db:
        record = claims(0, 1)[0]
        db.put(record)
        assert db.get(bytearray(record.id)) == record
        assert db.get_encoded(memoryview(record.id)) == record.encode()
        assert db.contains(bytearray(record.id))
        for bad, named in ((record.id[:5], "5 bytes"), (record.id + b"\0", "33 bytes"),
                           ("ab" * 16, "str"), (7, "int"), (None, "NoneType")):
            for call in (db.get, db.get_encoded, db.contains):
                with pytest.raises(stemedb.InvalidRecord, match=f"record_id: expected 32 bytes, got {named}"):
                    call(bad)
        with pytest.raises(stemedb.NotFound, match=f"no record with ID {'00' * 32}"):
            db.get_encoded(bytes(32))
        assert not db.contains(bytes(32))


def test_empty_store_answers_absent(tmp_path):
    with stemedb.open(tmp_path / "db") as db:
        assert not db.contains(b"\x01" * 32)
        with pytest.raises(stemedb.NotFound):
            db.get(b"\x01" * 32)


def test_after_close_every_point_read_says_closed(tmp_path):
    db = stemedb.open(tmp_path / "db")
    record = claims(0, 1)[0]
    db.put(record)
    db.close()
    for call in (db.get, db.get_encoded, db.contains, db.__contains__):
        with pytest.raises(stemedb.DatabaseClosed, match="the database is closed"):
            call(record.id)


def test_a_damaged_frame_is_not_served(tmp_path):
    path = tmp_path / "db"
    records = claims(0, 20)
    with stemedb.open(path, segment_size=SMALL) as db:
        db.put_many(records)
        victim = records[11]
        location = int(db._state.columns.arrays["location"][db._state.lookup_many(
            np.frombuffer(victim.id, dtype=np.uint8).reshape(1, 32))[0]])
    segment_file = sorted((path / "segments").iterdir())[location >> 32]
    offset = (location & 0xFFFFFFFF) + 60       # inside the record's payload
    with open(segment_file, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
        handle.flush()
        os.fsync(handle.fileno())
    with stemedb.open(path, segment_size=SMALL) as db:
        for call in (db.get, db.get_encoded):
            with pytest.raises(stemedb.CorruptionError, match=f"{segment_file.name} at offset "
                               f"{location & 0xFFFFFFFF}: record {victim.id.hex()} fails its checksum"):
                call(victim.id)
        assert db.get(records[10].id) == records[10]


def test_point_reads_beside_a_writer(tmp_path):
    # Readers on threads while one writer grows the store: every read of a record put
    # before the read started finds it, none sees a torn state.
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:
        first = claims(0, 200)
        db.put_many(first)
        stop = threading.Event()
        problems: list[str] = []

        def read() -> None:
            n = 0
            while not stop.is_set():
                record = first[n % len(first)]
                if db.get(record.id) != record or not db.contains(record.id):
                    problems.append(f"read {n} of {record.id.hex()} differs")
                n += 1

        readers = [threading.Thread(target=read) for _ in range(3)]
        for thread in readers:
            thread.start()
        for start in range(200, 4200, 250):
            db.put_many(claims(start, 250))
        stop.set()
        for thread in readers:
            thread.join()
        assert not problems
        assert len(db) == 4200


def test_record_at_decodes_by_record_number(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:
        records = claims(0, 700)
        db.put_many(records)
        for row in (0, 1, 350, 699):
            assert db.view.record_at(row) == records[row] == db.view.records_at([row])[0]
        for row in (-1, 700, 10**6):
            with pytest.raises(IndexError, match=f"record number {row}: the store holds 700"):
                db.view.record_at(row)
    with pytest.raises(stemedb.DatabaseClosed):
        db.view.record_at(0)


def test_batch_gather_on_two_threads_with_damaged_frames_and_absent_rows(tmp_path):
    # 12,000 rows is past the two-thread threshold: each thread copies half; frames that
    # fail their checks (two in the first half, one in the second) get empty slices, in
    # row order, and every other record is where its offsets say.
    from stemedb import _segment
    path = tmp_path / "db"
    records = claims(0, 6000)
    with stemedb.open(path, segment_size=SMALL) as db:
        db.put_many(records)
        arrays = db._state.columns.arrays
        locations = arrays["location"][:6000].copy()
    victims = [17, 2900, 5003]
    for row in victims:
        location = int(locations[row])
        segment_file = sorted((path / "segments").iterdir())[location >> 32]
        with open(segment_file, "r+b") as handle:
            handle.seek((location & 0xFFFFFFFF) + 70)
            byte = handle.read(1)
            handle.seek((location & 0xFFFFFFFF) + 70)
            handle.write(bytes([byte[0] ^ 0x55]))
    with stemedb.open(path, segment_size=SMALL) as db:
        arrays = db._state.columns.arrays
        rng = np.random.default_rng(5)
        rows = np.concatenate([np.arange(6000), rng.permutation(6000)[:5000], [-1] * 1000])
        rng.shuffle(rows)
        blob, offsets, bad = _segment.gather([s.buffer for s in db.log.segments],
                                             arrays["location"], arrays["length"], rows)
        assert [index for index, _, _ in bad] == [i for i, row in enumerate(rows) if row in victims]
        assert len(offsets) == len(rows) + 1 and offsets[-1] == len(blob)
        for i, row in enumerate(rows.tolist()):
            piece = bytes(blob[offsets[i]:offsets[i + 1]])
            if row < 0 or row in victims:
                assert piece == b""
            else:
                assert piece == records[row].encode()
        with pytest.raises(stemedb.CorruptionError, match="fails its checksum"):
            db.get_encoded_many([r.id for r in records])


def test_a_location_past_the_last_segment_is_damage_not_a_crash(tmp_path):
    # The location column is checked by the snapshot's checksums; should a bad value get in
    # anyway, the point path names it instead of reading past the list of segments.
    with stemedb.open(tmp_path / "db") as db:
        records = claims(0, 3)
        db.put_many(records)
        locations = db._state.columns.arrays["location"]
        kept = int(locations[1])
        locations[1] = (99 << 32) | (kept & 0xFFFFFFFF)
        for call in (db.get, db.get_encoded):
            with pytest.raises(stemedb.CorruptionError, match=r"in segment 99, but the store has 1 segments"):
                call(records[1].id)
        with pytest.raises(stemedb.CorruptionError, match=r"a record in segment 99"):
            db.view.record_at(1)
        assert db.get(records[2].id) == records[2]
        locations[1] = kept
        assert db.get(records[1].id) == records[1]


class _Buffer(ctypes.Structure):
    """CPython's Py_buffer, for holding an export the way compiled code does."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def test_close_succeeds_while_a_read_holds_a_segment_buffer(tmp_path):
    # A point read holds its segment's buffer for the length of one call; a close on another
    # thread in that moment must still close the store (and the read finish or fail cleanly).
    db = stemedb.open(tmp_path / "db")
    record = claims(0, 1)[0]
    db.put(record)
    view = _Buffer()    # what a read in flight holds: a buffer exported by the segment's memoryview
    assert ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(db.log.segments[0].buffer),
                                               ctypes.byref(view), 0) == 0
    db.close()
    assert db.closed
    ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))
    with pytest.raises(stemedb.DatabaseClosed):
        db.get(record.id)
    with stemedb.open(tmp_path / "db") as again:      # the lock and files were released
        assert again.get(record.id) == record
