"""Online backup and verified restore (stemedb.backup; docs/operations.md, "Backup and archival")."""

import json
import os
import threading

import numpy as np
import pytest

import stemedb
from stemedb.backup import catalog
from stemedb.backup.copy import backup
from stemedb.backup.point import capture
from stemedb.backup.restore import restore
from stemedb.cli import main
from stemedb.engine import database
from stemedb.errors import CorruptionError, StemeError

SEGMENT = 1 << 16
SIGNER = stemedb.Signer.from_seed(b"b" * 32)


def batch(tag, n=20):
    return [stemedb.Assertion(f"{tag}-{i // 5}", "p", i).sign(SIGNER) for i in range(n)]


def stored_ids(path):
    db = database.open(path)
    try:
        return {bytes(row) for row in np.asarray(db.view.column("id"))}, db.verify().ok
    finally:
        db.close()


@pytest.fixture
def store(tmp_path):
    db = database.open(tmp_path / "data", segment_size=SEGMENT)
    yield db
    db.close()


def test_backup_during_concurrent_writes_restores_every_record_acknowledged_before_it(store, tmp_path):
    acked: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(worker):
        n = 0
        while not stop.is_set():
            ids = store.put_many(batch(f"w{worker}-{n}", 10))
            n += 1
            with lock:
                acked.extend(ids)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    try:
        while len(acked) < 600:
            threading.Event().wait(0.005)
        with lock:
            before = list(acked)
        copied = backup(store.path, str(tmp_path / "dest"))
        with lock:
            after = set(acked)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    restored = restore([str(tmp_path / "dest")], str(tmp_path / "restored"))
    ids, ok = stored_ids(tmp_path / "restored")
    assert ok
    assert set(before) <= ids                      # everything acknowledged before the backup
    assert ids <= after                            # and nothing that was never acknowledged
    assert restored.records == copied.manifest.records == len(ids)
    assert copied.manifest.position[0] >= 1        # the writes spanned sealed segments


def test_restore_of_a_quiet_store_is_the_store(store, tmp_path):
    for n in range(12):
        store.put_many(batch(f"q{n}"))
    backup(store.path, str(tmp_path / "dest"))
    restore([str(tmp_path / "dest")], str(tmp_path / "restored"))
    ids, ok = stored_ids(tmp_path / "restored")
    assert ok and ids == {bytes(r) for r in np.asarray(store.view.column("id"))}
    assert len(ids) == 240


def test_incremental_backup_copies_only_new_segments_and_the_grown_tail(store, tmp_path):
    dest = str(tmp_path / "dest")
    for n in range(8):
        store.put_many(batch(f"a{n}"))
    first = backup(store.path, dest)
    point1 = capture(store.path)
    assert first.objects == len(point1.extents) and first.bytes == sum(e.length for e in point1.extents)
    for n in range(12):
        store.put_many(batch(f"b{n}"))
    point2 = capture(store.path)
    second = backup(store.path, dest)
    held = {e.number: e.length for e in point1.extents}
    grown = [e for e in point2.extents if e.length > held.get(e.number, 0)]
    assert len(point2.extents) > len(point1.extents)       # a segment was sealed meanwhile
    assert second.objects == len(grown)
    assert second.bytes == sum(e.length - held.get(e.number, 0) for e in grown)
    third = backup(store.path, dest)
    assert (third.objects, third.bytes) == (0, 0)
    # every backup stays restorable: the first one, too
    names = [n for n in catalog.manifest_names(catalog_objects(dest))]
    assert len(names) == 3
    restore([dest], str(tmp_path / "first"), backup=names[0])
    assert len(stored_ids(tmp_path / "first")[0]) == first.manifest.records == 160


def catalog_objects(dest):
    from stemedb.backup.objects import open_objects
    return open_objects(dest)


def _part_files(dest):
    return sorted(os.path.join(dest, "parts", name) for name in os.listdir(os.path.join(dest, "parts")))


def _nothing_left(parent, target):
    assert not os.path.exists(target)
    assert [n for n in os.listdir(parent) if "restoring" in n] == []


def test_a_flipped_byte_is_refused_naming_the_file(store, tmp_path):
    for n in range(6):
        store.put_many(batch(f"f{n}"))
    dest = str(tmp_path / "dest")
    backup(store.path, dest)
    victim = _part_files(dest)[-1]
    with open(victim, "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0x01]))
    target = str(tmp_path / "restored")
    with pytest.raises(CorruptionError, match=os.path.basename(victim)):
        restore([dest], target)
    _nothing_left(str(tmp_path), target)


def test_a_missing_file_is_refused_naming_it(store, tmp_path):
    for n in range(6):
        store.put_many(batch(f"m{n}"))
    dest = str(tmp_path / "dest")
    backup(store.path, dest)
    victim = _part_files(dest)[0]
    os.remove(victim)
    target = str(tmp_path / "restored")
    with pytest.raises(StemeError, match=f"{os.path.basename(victim)}: missing"):
        restore([dest], target)
    _nothing_left(str(tmp_path), target)


def test_a_damaged_manifest_is_refused(store, tmp_path):
    store.put_many(batch("d"))
    dest = str(tmp_path / "dest")
    copied = backup(store.path, dest)
    path = os.path.join(dest, copied.manifest.name)
    document = json.loads(open(path).read())
    document["records"] += 1
    with open(path, "w") as handle:
        json.dump(document, handle)
    with pytest.raises(CorruptionError, match="checksum does not match"):
        restore([dest], str(tmp_path / "restored"))
    _nothing_left(str(tmp_path), str(tmp_path / "restored"))


def test_restore_refuses_a_non_empty_target_and_changes_nothing(store, tmp_path):
    store.put_many(batch("n"))
    dest = str(tmp_path / "dest")
    backup(store.path, dest)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(StemeError, match="not empty"):
        restore([dest], str(target))
    assert os.listdir(target) == ["keep.txt"]


def test_a_destination_of_another_store_is_refused(tmp_path):
    dest = str(tmp_path / "dest")
    for name in ("one", "two"):
        db = database.open(tmp_path / name, segment_size=SEGMENT)
        db.put_many(batch(name))
        db.close()
    backup(str(tmp_path / "one"), dest)
    with pytest.raises(StemeError, match="another store"):
        backup(str(tmp_path / "two"), dest)
    assert len(catalog.manifest_names(catalog_objects(dest))) == 1


def test_backup_of_a_directory_without_a_store_is_refused(tmp_path):
    with pytest.raises(StemeError, match="no StemeDB store here"):
        backup(str(tmp_path), str(tmp_path / "dest"))
    assert not os.path.exists(tmp_path / "dest")


def test_record_digest_adds_up_and_does_not_cancel_duplicates():
    ids = np.frombuffer(os.urandom(32 * 10), dtype=np.uint8).reshape(10, 32)
    whole = catalog.record_digest(ids)
    assert (catalog.record_digest(ids[:4]) + catalog.record_digest(ids[4:])) % catalog.MODULUS == whole
    expected = sum(int.from_bytes(bytes(row), "little") for row in ids) % catalog.MODULUS
    assert whole == expected
    assert catalog.record_digest(np.concatenate([ids, ids[:1]])) != whole


def test_cli_backup_list_and_restore(store, tmp_path, capsys):
    for n in range(4):
        store.put_many(batch(f"c{n}"))
    dest = str(tmp_path / "dest")
    assert main(["backup", "--data", store.path, "--to", dest]) == 0
    out = capsys.readouterr().out
    assert f"backed up {store.path} to {dest}: 80 records" in out
    assert main(["backup", "--list", dest, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["records"] for entry in listed] == [80] and listed[0]["kind"] == "backup"
    assert main(["restore", dest, "--to", str(tmp_path / "r")]) == 0
    assert "restored 80 records" in capsys.readouterr().out
    assert main(["restore", dest, "--to", str(tmp_path / "r")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_a_tail_the_store_rewrote_is_copied_again(tmp_path):
    """After a crash, recovery may set a torn tail aside and new batches take its place: the
    bytes a backup holds are then no longer the store's, and the segment is copied again."""
    import shutil

    original, rewritten, dest = tmp_path / "a", tmp_path / "a-after-crash", str(tmp_path / "dest")
    db = database.open(original, segment_size=SEGMENT)
    db.put_many(batch("common"))
    db.close()
    shutil.copytree(original, rewritten)              # the same store, as a crash left it
    db = database.open(original)
    db.put_many(batch("lost-in-the-crash"))
    db.close()
    backup(str(original), dest)
    db = database.open(rewritten)
    db.put_many(batch("written-after-recovery", 40))
    db.close()
    copied = backup(str(rewritten), dest)
    assert copied.recopied == [0]
    restore([dest], str(tmp_path / "restored"))
    assert stored_ids(tmp_path / "restored")[0] == stored_ids(rewritten)[0]


def test_a_lost_footer_before_a_written_segment_is_reported(store, tmp_path):
    for n in range(24):
        store.put_many(batch(f"l{n}"))
    assert store.stats()["segments"] >= 2
    store.close()
    first = os.path.join(store.path, "segments", "00000000.seg")
    with open(first, "r+b") as handle:            # what durability "none" and a power loss can do
        handle.seek(SEGMENT - 128)
        handle.write(bytes(128))
    with pytest.raises(StemeError, match="a footer was lost"):
        backup(store.path, str(tmp_path / "dest"))
    assert not os.path.exists(tmp_path / "dest" / "backups")


def test_a_damaged_footer_is_refused_naming_the_segment(store, tmp_path):
    for n in range(24):
        store.put_many(batch(f"f{n}"))
    store.close()
    first = os.path.join(store.path, "segments", "00000000.seg")
    with open(first, "r+b") as handle:
        handle.seek(SEGMENT - 100)
        handle.write(b"\xff")
    with pytest.raises(CorruptionError, match="00000000.seg: segment footer: checksum mismatch"):
        backup(store.path, str(tmp_path / "dest"))


def test_a_store_written_before_footers_backs_up_and_restores(tmp_path):
    """Version-1 segments have no footer: one with a written successor is sealed by position."""
    import struct

    from stemedb import _hash

    path = tmp_path / "v1"
    db = database.open(path, segment_size=SEGMENT)
    for n in range(24):
        db.put_many(batch(f"v{n}"))
    db.close()
    expected = stored_ids(path)[0]
    manifest = json.loads((path / "MANIFEST").read_text())     # as version 1 wrote a store
    (path / "MANIFEST").write_text(json.dumps({"version": 1, "segment_size": SEGMENT,
                                               "created_us": manifest["created_us"]}))
    segments = sorted((path / "segments").glob("*.seg"))
    assert len(segments) >= 2
    for number, segment in enumerate(segments):
        header = b"STEMESEG" + struct.pack("<IIQQQ", 1, 0, number, SEGMENT, 123) + bytes(20)
        with open(segment, "r+b") as handle:
            handle.write(header + struct.pack("<I", _hash.crc32c(header)))
            handle.seek(SEGMENT - 128)
            handle.write(bytes(128))
    copied = backup(str(path), str(tmp_path / "dest"))
    assert [s["sealed"] for s in copied.manifest.segments][:-1] == [True] * (len(segments) - 1)
    restore([str(tmp_path / "dest")], str(tmp_path / "restored"))
    assert stored_ids(tmp_path / "restored") == (expected, True)
