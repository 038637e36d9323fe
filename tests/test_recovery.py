"""Recovery and write isolation: one test per defect of StemeDB issue 8 (items 1-5).

Each test builds a store, damages it the way the issue describes (zeroed
bytes in a sealed segment, a lost newest segment, damage inside the last
batch of the active segment, damaged or full-disk MANIFEST / snapshot /
recovery, a bad writer among good ones) and asserts exactly what must be
served and reported. Frames are read as docs/format.md lays them out.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from faults import FaultyFiles, NoSyncFiles

import stemedb

SMALL = 1 << 16           # 64 KiB segments: a few hundred records each
SEGMENT_HEADER = 64
FRAME_HEADER = 48
FRAME_MAGIC = 0x31465453  # "STF1"
RECORD_FRAME, BATCH_FRAME = 1, 2
FOOTER = 128              # version 2: the seal in a segment's last 128 bytes

SIGNERS = [stemedb.Signer.from_seed(bytes([0x61 + i]) * 32) for i in range(8)]


def claim(tag: str, i: int, signer: stemedb.Signer = SIGNERS[0]) -> Any:
    return stemedb.Assertion(tag, "p", i, timestamp=1_000_000 + i).sign(signer)


def unsigned(tag: str, i: int) -> Any:
    return stemedb.Assertion(tag, "q", i, timestamp=2_000_000 + i)


class NoSnapshotFiles(NoSyncFiles):
    """No syncs and no snapshot on close, so that every open replays every segment."""

    def makedirs(self, path: str) -> None:
        if "index" in (os.path.basename(path), os.path.basename(os.path.dirname(path))):
            raise OSError(errno.EROFS, "snapshots disabled in this test", path)
        super().makedirs(path)


def not_served(db: Any, ids: list[bytes]) -> list[bytes]:
    """The IDs among `ids` that the store does not serve as a record with exactly that ID."""
    out = []
    for record_id in ids:
        try:
            if db.get(record_id).id != record_id:
                out.append(record_id)
        except (stemedb.NotFound, stemedb.CorruptionError):
            out.append(record_id)
    return out


def mentions(lines: list[str], *parts: str) -> bool:
    return any(all(part in line for part in parts) for line in lines)


# ---------------------------------------------------------------- item 1


# ---------------------------------------------------------------- item 2


# ---------------------------------------------------------------- item 3


# ---------------------------------------------------------------- item 4


def test_checkpoint_on_a_full_disk_is_storage_full_and_leaves_no_temp(tmp_path):
    root = tmp_path / "db"
    files = FaultyFiles(root, sync_for_real=False)
    with stemedb.open(root, segment_size=SMALL, files=files) as db:
        db.put_many([claim("c", i) for i in range(50)])
        db.checkpoint()
        db.put_many([claim("d", i) for i in range(50)])
        for at in (1, 6):   # the first file of the snapshot, and one in the middle
            files.fail("write_file", at_call=files.calls["write_file"] + at, errno=errno.ENOSPC,
                       times=None)
            with pytest.raises(stemedb.StorageFull, match="free disk space"):
                db.checkpoint()
            assert [n for n in os.listdir(root / "index")] == ["snapshot-000000000050"]
            files.clear()
        db.checkpoint()
        assert os.listdir(root / "index") == ["snapshot-000000000100"]


def test_a_member_whose_envelope_proof_names_an_assertion_is_a_signature_error(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:
        stored = claim("not-an-envelope", 1)
        db.put(stored)
        key = SIGNERS[0].public_key
        member = unsigned("member", 1)._with_proof((key,), (), stored.id)
        with pytest.raises(stemedb.SignatureError, match=r"records\[0\]") as raised:
            db.put(member)
        assert member.id.hex() in str(raised.value) and "assertion" in str(raised.value)
        assert not db.contains(member.id)


# ---------------------------------------------------------------- item 5


