"""The storage rows of design/RELIABILITY.md, each printing its figure.

crash-kill, power-loss, dir-fsync, torn-tail, bit-flip, fsync-EIO, disk-full.
Run with `-s` to see the figures; each is also part of its assertion message.
Randomized tests print their seed; replay one with STEMEDB_SEED=<seed>. The
large runs are marked `slow` (`pytest -m slow tests/test_reliability.py`).

The fault model lives in tests/faults.py (FaultyFiles): what a power loss
keeps, which call fails with which errno.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from faults import FaultyFiles, NoSyncFiles

import stemedb
from stemedb import _segment
from stemedb.engine.files import FileLayer

SMALL = 1 << 16           # 64 KiB segments: rolls happen every few hundred records
SEGMENT_HEADER = 64       # docs/format.md "Segment files"
SEGMENT_FOOTER = 128      # version 2: the seal, in a sealed segment's last 128 bytes
FRAME_HEADER = 48
FRAME_MAGIC = 0x31465453  # "STF1"
RECORD_FRAME, BATCH_FRAME = 1, 2

SIGNERS = [stemedb.Signer.from_seed(bytes([0x51 + i]) * 32) for i in range(3)]


def _seed(label: str) -> int:
    value = os.environ.get("STEMEDB_SEED")
    seed = int(value) if value else random.SystemRandom().randrange(1 << 32)
    print(f"\n{label}: seed {seed} (replay with STEMEDB_SEED={seed})")
    return seed


def claim(tag: str, i: int, signer: stemedb.Signer = SIGNERS[0]) -> Any:
    return stemedb.Assertion(tag, "p", i, timestamp=1_000_000 + i).sign(signer)


def unsigned(tag: str, i: int) -> Any:
    return stemedb.Assertion(tag, "q", i, timestamp=2_000_000 + i)


class QuietFiles(NoSyncFiles):
    """No syncs and no snapshot on close: for opening a damaged copy thousands of times.

    close() writes an index snapshot (tens of files); refusing the snapshot
    directory makes close skip it (the engine treats a failed snapshot as
    harmless: the segments are the truth).
    """

    def makedirs(self, path: str) -> None:
        if os.path.basename(os.path.dirname(path)) == "index" or os.path.basename(path) == "index":
            raise OSError(errno.EROFS, "snapshots disabled in this test", path)
        super().makedirs(path)


# ------------------------------------------------------------------ checking


@dataclass
class Check:
    """What reopening a store found."""

    opened: bool
    error: str = ""
    lost: list[bytes] = field(default_factory=list)   # expected IDs not served intact
    problems: list[str] = field(default_factory=list)  # verify() report, less what a crash may leave
    torn: int = 0
    writable: bool = True
    leftovers: set[tuple[str, int]] = field(default_factory=set)  # what a crash may leave, by place


def served_intact(db: stemedb.Database, ids: Iterable[bytes]) -> list[bytes]:
    """The IDs among `ids` that the store does not serve as a record with exactly that ID."""
    ids = list(ids)
    if not ids:
        return []
    try:
        records = db.get_many(ids)
    except stemedb.CorruptionError:
        records = []
        for record_id in ids:
            try:
                records.append(db.get(record_id))
            except (stemedb.CorruptionError, stemedb.NotFound):
                records.append(None)
    return [i for i, r in zip(ids, records) if r is None or r.id != i]


CRASH_LEFTOVERS = ("set aside", "zeroed", "held back")


def crash_leftovers(db: stemedb.Database, report: Any, acked: Iterable[bytes],
                    allowed: set[tuple[str, int]]) -> list[Any]:
    """The verify lines a crash may legitimately leave: bytes of the unacknowledged last batch.

    A crash tears at most the batch being written, in the active segment, past
    every acknowledged frame: such bytes are set aside (docs/format.md,
    "Recovery") and verify reports them until their file is removed. Any other
    damage, or set-aside bytes before an acknowledged frame, is a finding.
    `allowed`: (segment, offset) of leftovers an earlier check of this store allowed (a
    later write may have gone past them since).
    """
    active = db.log.active
    ids = list(acked)
    acked_end = SEGMENT_HEADER
    if ids:
        rows = db.state.lookup_many(np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 32))
        rows = rows[rows >= 0]
        locations = db.state.columns.arrays["location"][rows]
        lengths = db.state.columns.arrays["length"][rows]
        here = (locations >> np.uint64(32)) == active.number
        if here.any():
            ends = (locations[here] & np.uint64(0xFFFFFFFF)) + FRAME_HEADER + lengths[here]
            acked_end = int(ends.max())
    return [d for d in report.damage if d.kind in CRASH_LEFTOVERS and (
        (d.path == active.path and d.offset >= acked_end) or _place(d) in allowed)]


def _place(damage: Any) -> tuple[str, int]:
    return os.path.basename(damage.path), damage.offset


def check_store(path: str | os.PathLike[str], expected: Iterable[bytes], *,
                files: FileLayer | None = None, write_after: bool = False,
                allowed: frozenset[tuple[str, int]] = frozenset()) -> Check:
    """Reopen `path`; every expected ID must be served intact; then verify (and write)."""
    expected = list(expected)
    try:
        db = stemedb.open(path, files=files or NoSyncFiles())
    except Exception as exc:  # any refusal to open is a finding, whatever its type
        return Check(False, f"{type(exc).__name__}: {exc}")
    with db:
        report = db.verify()
        leftovers = crash_leftovers(db, report, expected, set(allowed))
        texts = {d.text() for d in leftovers}
        result = Check(True, lost=served_intact(db, expected),
                       problems=[p for p in report.problems if p not in texts],
                       torn=db.recovery.torn_bytes_dropped,
                       leftovers=allowed | {_place(d) for d in leftovers})
        if write_after:
            fresh = claim("after-recovery", len(result.lost) + 7, SIGNERS[2])
            db.put(fresh)
    if write_after:
        again = check_store(path, [fresh.id], files=files, allowed=frozenset(result.leftovers))
        result.writable = again.opened and not again.lost and not again.problems
    return result


@dataclass
class Frame:
    position: int
    kind: int
    length: int
    record_id: bytes

    @property
    def end(self) -> int:          # just past the payload (padding is not checksummed)
        return self.position + FRAME_HEADER + self.length

    @property
    def aligned_end(self) -> int:
        return (self.end + 7) // 8 * 8


def parse_frames(data: bytes | bytearray) -> list[Frame]:
    """The frames of an undamaged segment, read the way docs/format.md describes them."""
    frames = []
    position = SEGMENT_HEADER
    while position + FRAME_HEADER <= len(data):
        magic, kind, length = struct.unpack_from("<IB3xI", data, position)
        if magic != FRAME_MAGIC:
            break
        frame = Frame(position, kind, length, bytes(data[position + 16:position + 48]))
        frames.append(frame)
        position = frame.aligned_end
    return frames


def run_threads(workers: list[Callable[[], None]]) -> None:
    """Run each worker in its own thread; re-raise the first exception one of them hit."""
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def write_load(db: stemedb.Database, tag: str, seed: int, ops: int, acked: set[bytes],
               lock: threading.Lock, threads: int = 3) -> None:
    """Threads mixing put, put_many and writer(signer).put; each ID joins `acked` once returned."""
    def worker(number: int) -> None:
        rng = random.Random(seed * 31 + number)
        writer = db.writer(SIGNERS[1])
        for i in range(ops):
            choice = rng.randrange(3)
            if choice == 0:
                ids = [db.put(claim(f"{tag}-{number}", i))]
            elif choice == 1:
                ids = db.put_many([claim(f"{tag}-{number}-{i}", j) for j in range(rng.randint(1, 12))])
            else:
                ids = [writer.put(unsigned(f"{tag}-w{number}", i))]
            with lock:
                acked.update(ids)

    run_threads([lambda n=n: worker(n) for n in range(threads)])


# ------------------------------------------------------- the fault shim itself


def test_faulty_files_model(tmp_path):
    """FaultyFiles keeps exactly what was synced: the other tests trust its images."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_bytes(b"A" * 5000)          # existed before: durable
    files = FaultyFiles(root, sync_for_real=False)

    def image(name: str, **options: Any) -> Any:
        files.crash_image(tmp_path / name, **options)
        return tmp_path / name

    fd = files.open(str(root / "old"))
    files.pwrite(fd, b"B" * 10, 4096)
    assert (image("1", tear_last_page=False) / "old").read_bytes() == b"A" * 5000
    torn = (image("2", seed=3) / "old").read_bytes()   # the one dirty page, torn
    assert torn[:4096] == b"A" * 4096 and torn[4096:] in (b"B" * 10 + b"A" * 894, b"A" * 904)
    files.fdatasync(fd)
    assert (image("3") / "old").read_bytes()[4096:4106] == b"B" * 10
    files.pwrite(fd, b"C" * 4096, 0)
    torn = (image("4", seed=1) / "old").read_bytes()[:4096]
    sectors = len(torn) - len(torn.lstrip(b"C"))
    assert sectors % 512 == 0 and 0 < sectors < 4096 and torn[sectors:] == b"A" * (4096 - sectors)
    files.close(fd)

    new = files.open(str(root / "new"), create=True)
    files.preallocate(new, 8192)
    files.pwrite(new, b"N" * 100, 0)
    files.fsync(new)
    assert not (image("5") / "new").exists()            # its directory entry is not synced
    kept = image("6", keep_changes="prefix", seed=0)    # journal order: entry may survive alone
    assert not (kept / "new").exists() or (kept / "new").read_bytes()[:100] == b"N" * 100
    files.fsync_dir(str(root))
    assert (image("7") / "new").read_bytes()[:100] == b"N" * 100
    files.close(new)

    files.write_file(str(root / "m.tmp"), b"manifest")
    files.rename(str(root / "m.tmp"), str(root / "m"))
    files.makedirs(str(root / "d" / "e"))
    files.write_file(str(root / "d" / "e" / "f"), b"f")
    files.fsync_dir(str(root / "d" / "e"))
    crashed = image("8")
    assert not (crashed / "m").exists() and not (crashed / "m.tmp").exists()
    assert not (crashed / "d").exists()                 # d's own entry in root is not synced
    files.fsync_dir(str(root))
    crashed = image("9")
    assert (crashed / "m").read_bytes() == b"manifest" and (crashed / "d").is_dir()
    assert not (crashed / "d" / "e").exists()           # e's entry in d is not synced
    files.fsync_dir(str(root / "d"))
    assert (image("10") / "d" / "e" / "f").read_bytes() == b"f"

    files.fail("fdatasync", at_call=files.calls["fdatasync"] + 2, errno=errno.EIO)
    fd = files.open(str(root / "old"))
    files.fdatasync(fd)
    with pytest.raises(OSError) as failure:
        files.fdatasync(fd)
    assert failure.value.errno == errno.EIO and files.injected[-1][0] == "fdatasync"
    files.fdatasync(fd)                                  # times=1: the next one succeeds
    files.fail("pwrite", errno=errno.ENOSPC, partial=True)
    with pytest.raises(OSError):
        files.pwrite(fd, b"D" * 100, 0)
    assert (root / "old").read_bytes()[:100] == b"D" * 50 + b"C" * 50
    files.close(fd)


# ---------------------------------------------------------------- crash-kill
#
# A forked writer process (from a forkserver that has already imported
# stemedb, so a kill costs milliseconds, not an interpreter start) writes from
# four threads and reports each acknowledged ID through a pipe the moment the
# call returns. The parent SIGKILLs it after a random delay, or the child
# SIGKILLs itself at an instrumented point (before/after a pwrite, fdatasync,
# segment preallocate, directory fsync, snapshot rename, or an ack).

READY = b"\xff" * 32
DYING = b"\xfe" * 32     # the child reached its instrumented kill point
KILL_POINTS = ("pwrite", "fdatasync", "preallocate", "fsync_dir", "rename", "ack")
_report_pipe = [-1]      # in the child: where acks go


def _die() -> None:
    os.write(_report_pipe[0], DYING)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


class KillingFiles(FileLayer):
    """The real file layer, except that the process SIGKILLs itself at one chosen call."""

    def __init__(self, method: str | None, number: int, phase: str) -> None:
        self.method, self.number, self.phase = method, number, phase
        self._count = 0
        self._lock = threading.Lock()

    def _around(self, method: str, call: Callable[..., Any], *args: Any) -> Any:
        if method != self.method:
            return call(*args)
        with self._lock:
            self._count += 1
            mine = self._count == self.number
        if mine and self.phase == "before":
            _die()
        result = call(*args)
        if mine and self.phase == "after":
            _die()
        return result

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        self._around("pwrite", super().pwrite, fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._around("fdatasync", super().fdatasync, fd)

    def preallocate(self, fd: int, length: int) -> None:
        self._around("preallocate", super().preallocate, fd, length)

    def fsync_dir(self, path: str) -> None:
        self._around("fsync_dir", super().fsync_dir, path)

    def rename(self, source: str, target: str) -> None:
        self._around("rename", super().rename, source, target)


def crash_child(path: str, seed: int, connection: Any, point: tuple[str, int, str] | None) -> None:
    """The writer process of the crash-kill test (runs until it is killed)."""
    method, number, phase = point or (None, 0, "")
    pipe = _report_pipe[0] = connection.fileno()
    acks = [0]
    lock = threading.Lock()

    def report(ids: list[bytes]) -> None:
        mine = False
        if method == "ack":
            with lock:
                acks[0] += 1
                mine = acks[0] == number
        if mine and phase == "before":
            _die()
        for start in range(0, len(ids), 128):   # ≤ PIPE_BUF: each write is atomic
            os.write(pipe, b"".join(ids[start:start + 128]))
        if mine and phase == "after":
            _die()

    try:
        db = stemedb.open(path, segment_size=SMALL, snapshot_every=300,
                          files=KillingFiles(method, number, phase))
        os.write(pipe, READY)

        def single(t: int) -> None:
            for i in range(1 << 30):
                report([db.put(claim(f"k{seed}-{t}", i))])

        def many(t: int) -> None:
            rng = random.Random(seed + t)
            for i in range(1 << 30):
                report(db.put_many([claim(f"m{seed}-{t}-{i}", j) for j in range(rng.randint(1, 30))]))

        def grouped(t: int) -> None:
            writer = db.writer(SIGNERS[1])
            for i in range(1 << 30):
                report([writer.put(unsigned(f"g{seed}-{t}", i))])

        threads = [threading.Thread(target=_or_exit, args=(work, t))
                   for t, work in enumerate((single, many, grouped, grouped))]
        for thread in threads:
            thread.start()
        time.sleep(60)   # the parent kills us long before
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)


def _or_exit(work: Callable[[int], None], number: int) -> None:
    """Run `work`; any exception ends the child with exit code 3 (the parent reports it)."""
    try:
        work(number)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)


def _collect(process: Any, reader: Any, delay: float, limit: float = 10.0) -> tuple[bytes, int]:
    """Read the child's acks; SIGKILL it `delay` seconds after it is ready (or at `limit`)."""
    fd = reader.fileno()
    received = bytearray()
    started = time.monotonic()
    kill_at: float | None = None
    killed = False
    while True:
        now = time.monotonic()
        if kill_at is None and received[:32] == READY:
            kill_at = now + delay
        if not killed and ((kill_at is not None and now >= kill_at) or now - started > limit):
            process.kill()
            killed = True
        wait = 0.05 if kill_at is None or killed else min(0.05, max(0.0, kill_at - now))
        readable, _, _ = select.select([fd], [], [], wait)
        if readable:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break   # every write end is closed: the child is gone
            received += chunk
    process.join()
    if received[:32] == READY:
        del received[:32]
    return bytes(received), process.exitcode


def _run_crash_kill(tmp_path: Any, kills: int) -> None:
    seed = _seed("crash-kill")
    rng = random.Random(seed)
    context = multiprocessing.get_context("forkserver")
    # What the forkserver imports once, so that a child starts in milliseconds. (This module
    # itself cannot be preloaded: the forkserver does not have the tests directory on its path.)
    context.set_forkserver_preload(["stemedb", "pytest"])
    path = str(tmp_path / "db")
    acked: dict[bytes, None] = {}
    lost: set[bytes] = set()
    findings: list[str] = []
    points = Counter()
    reached = aimed = failed_opens = acked_total = set_aside = 0
    allowed: frozenset[tuple[str, int]] = frozenset()   # crash leftovers already accepted
    started = time.monotonic()
    for kill in range(kills):
        point = None
        if kill % 2:   # every other kill at an instrumented point, each point in turn
            method = KILL_POINTS[kill // 2 % len(KILL_POINTS)]
            number = rng.randint(1, 25) if method in ("pwrite", "fdatasync", "ack") else 1
            point = (method, number, ("before", "after")[kill // (2 * len(KILL_POINTS)) % 2])
        points[point[0] if point else "random"] += 1
        if kill % 100 == 0:   # a fresh store now and then keeps each check short
            path = str(tmp_path / f"db-{kill // 100}")
            acked = {}
            allowed = frozenset()
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=crash_child, daemon=True,
                                  args=(path, rng.randrange(1 << 31), writer, point))
        process.start()
        writer.close()
        # A child aimed at a kill point kills itself there; the parent's kill is only the
        # backstop, and a run it had to end is a finding (the point was never reached).
        delay = rng.uniform(0.005, 0.3) if point is None else 8.0
        received, exitcode = _collect(process, reader, delay)
        reader.close()
        if exitcode != -signal.SIGKILL or len(received) % 32:
            findings.append(f"kill {kill} at {point}: child exit code {exitcode}, "
                            f"{len(received)} bytes of acks")
        chunks = [received[i:i + 32] for i in range(0, len(received), 32)]
        if point is not None:
            aimed += 1
            reached += DYING in chunks
            if DYING not in chunks:
                findings.append(f"kill {kill}: kill point {point} never reached (the parent's "
                                "backstop kill ended the run)")
        fresh = [c for c in chunks if c != DYING]
        acked_total += len(fresh)
        acked.update(dict.fromkeys(fresh))
        check = check_store(path, acked, allowed=allowed)
        set_aside += len(check.leftovers - allowed)
        allowed = frozenset(check.leftovers)
        if not check.opened:
            failed_opens += 1
            findings.append(f"kill {kill} at {point}: reopen failed: {check.error}")
            if not _discard_unborn_segment(path):
                findings.append(f"kill {kill}: not an unborn last segment; stopping the run")
                break
            check = check_store(path, acked, allowed=allowed)   # measure the rest all the same
            if not check.opened:
                findings.append(f"kill {kill}: still failing after the repair: {check.error}")
                break
        lost.update(check.lost)
        if check.lost or check.problems:
            findings.append(f"kill {kill} at {point}: {len(check.lost)} acked lost, "
                            f"problems {check.problems[:3]}")
    figure = (f"crash-kill: kills tried {kill + 1}, acked lost {len(lost)}, failed reopens "
              f"{failed_opens}, unacknowledged tails set aside {set_aside} "
              f"(acked {acked_total}, kill points {dict(points)}, instrumented points reached "
              f"{reached} of {aimed}, {time.monotonic() - started:.1f} s, seed {seed})")
    print(figure)
    shown = findings if len(findings) <= 12 else findings[:8] + ["..."] + findings[-3:]
    assert not lost and not findings and reached == aimed, f"{figure}\n" + "\n".join(shown)


def _discard_unborn_segment(path: str) -> bool:
    """Remove a last segment that a kill left before its header was written; True if removed.

    Such a file holds no frame (an ack needs the header synced first), so a
    repaired store loses nothing; this lets a run that found the failure go on
    measuring the rest.
    """
    directory = os.path.join(path, "segments")
    last = os.path.join(directory, max(n for n in os.listdir(directory) if n.endswith(".seg")))
    with open(last, "rb") as handle:
        data = handle.read()
    if data[:8] == b"STEMESEG" or data.strip(b"\0"):
        return False
    os.remove(last)
    return True


def test_crash_kill(tmp_path):
    _run_crash_kill(tmp_path, kills=50)


@pytest.mark.slow
def test_crash_kill_many(tmp_path):
    """STEMEDB_CRASH_KILLS sets the count (default 1,000; CI's mid-size slow run uses 100)."""
    text = os.environ.get("STEMEDB_CRASH_KILLS", "1000")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"STEMEDB_CRASH_KILLS: {text!r} is not a positive whole number")
    _run_crash_kill(tmp_path, kills=int(text))


# ---------------------------------------------------------------- power-loss


class CrashPoints:
    """A FaultyFiles hook: at chosen calls, take a crash image and check it at once.

    `choose(method, phase, rng)` picks the points; `modes` cycles through the
    crash_image options. Every image must open, serve every ID acknowledged
    before the crash point intact, and verify clean.
    """

    def __init__(self, workdir: Any, seed: int, acked: set[bytes], lock: threading.Lock,
                 choose: Callable[[str, str, random.Random], bool], modes: list[dict[str, Any]],
                 limit: int) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.acked, self.lock = acked, lock
        self.choose, self.modes, self.limit = choose, modes, limit
        self.states = 0
        self.lost: set[bytes] = set()
        self.failed_opens = 0
        self.with_problems = 0
        self.with_leftovers = 0   # images whose unacknowledged last batch was set aside
        self.not_writable = 0
        self.findings: list[str] = []

    def __call__(self, files: FaultyFiles, method: str, number: int, phase: str) -> None:
        if self.states >= self.limit or not self.choose(method, phase, self.rng):
            return
        with self.lock:
            expected = list(self.acked)
        mode = self.modes[self.states % len(self.modes)]
        image = self.workdir / f"image-{self.states}"
        info = files.crash_image(image, seed=self.rng.randrange(1 << 32), **mode)
        check = check_store(image, expected, files=QuietFiles(), write_after=self.states % 8 == 0)
        self.states += 1
        self.lost.update(check.lost)
        self.failed_opens += not check.opened
        self.with_problems += bool(check.problems)
        self.with_leftovers += bool(check.leftovers)
        self.not_writable += not check.writable
        if not check.opened or check.lost or check.problems or not check.writable:
            self.findings.append(
                f"{phase} {method} #{number} {mode}: {info}: "
                + (check.error if not check.opened else
                   f"{len(check.lost)} of {len(expected)} acked lost, problems {check.problems[:2]}, "
                   f"writable after recovery {check.writable}"))
        shutil.rmtree(image)

    def figure(self, label: str, seed: int) -> str:
        return (f"{label}: crash states {self.states}, acked lost {len(self.lost)}, "
                f"failed opens {self.failed_opens}, images reporting corruption {self.with_problems}, "
                f"images with the unacknowledged last batch set aside {self.with_leftovers}, "
                f"not writable after recovery {self.not_writable} (seed {seed})")

    def assert_clean(self, label: str, seed: int) -> None:
        figure = self.figure(label, seed)
        print(figure)
        assert self.states and not self.findings, f"{figure}\n" + "\n".join(self.findings[:8])


def _durable_skeleton(root: Any) -> None:
    """An existing store, taken as durable: FaultyFiles only tracks what happens after.

    (test_dir_fsync_new_store covers the creation of a store.)
    """
    stemedb.open(root, segment_size=SMALL, files=NoSyncFiles()).close()


POWER_MODES = [
    {"keep_pages": "none", "tear_last_page": True},
    {"keep_pages": "random", "tear_last_page": True},
    {"keep_pages": "prefix", "tear_last_page": True},
    {"keep_pages": "none", "tear_last_page": False},
]


def test_power_loss(tmp_path):
    seed = _seed("power-loss")
    root = tmp_path / "db"
    _durable_skeleton(root)
    acked: set[bytes] = set()
    lock = threading.Lock()
    roll_or_rename = {"open", "preallocate", "fsync_dir", "rename", "makedirs"}

    def choose(method: str, phase: str, rng: random.Random) -> bool:
        if method in roll_or_rename:
            return True
        return method in ("pwrite", "fdatasync", "fsync") and rng.random() < 0.12

    points = CrashPoints(tmp_path, seed, acked, lock, choose, POWER_MODES, limit=120)
    files = FaultyFiles(root, sync_for_real=False)
    files.hooks.append(points)
    db = stemedb.open(root, segment_size=SMALL, snapshot_every=400, files=files)
    write_load(db, "power", seed, ops=70, acked=acked, lock=lock)
    db.close()
    points.assert_clean("power-loss", seed)


def test_power_loss_checkpoint_racing_a_commit(tmp_path):
    """checkpoint() from another thread, between a batch's append and its index update.

    The hook runs checkpoint() at the moment a concurrent checkpointing thread
    could: after the leader appended the batch, before its fdatasync returned
    and its records were indexed. Then the process loses power with everything
    synced. The acknowledged record must still be there.
    """
    root = tmp_path / "db"
    _durable_skeleton(root)
    files = FaultyFiles(root, sync_for_real=False)
    db = stemedb.open(root, segment_size=SMALL, files=files)
    ids = [db.put(claim("race", i)) for i in range(5)]
    raced: list[int] = []

    def checkpoint_now(files: FaultyFiles, method: str, number: int, phase: str) -> None:
        if method == "fdatasync" and phase == "before" and not raced:
            raced.append(number)
            db.checkpoint()

    files.hooks.append(checkpoint_now)
    ids.append(db.put(claim("race", 99)))
    files.hooks.clear()
    files.crash_image(tmp_path / "image", tear_last_page=False)
    check = check_store(tmp_path / "image", ids)
    figure = f"power-loss (checkpoint racing a commit): crash states 1, acked lost {len(check.lost)}"
    print(figure)
    db.close()
    assert check.opened and not check.lost, (
        f"{figure}: {check.error or [i.hex() for i in check.lost]}: the snapshot's position covers "
        "a batch its index does not hold, so replay skips it")


# ------------------------------------------------------------------ dir-fsync


def _roll_and_rename_points(tmp_path: Any, seed: int, modes: list[dict[str, Any]],
                            limit: int) -> CrashPoints:
    """Crash images around every segment creation and snapshot rename of one writer."""
    root = tmp_path / "db"
    _durable_skeleton(root)
    acked: set[bytes] = set()
    lock = threading.Lock()
    creating = [False]

    def choose(method: str, phase: str, rng: random.Random) -> bool:
        if method == "preallocate" and phase == "before":
            creating[0] = True          # a new segment: preallocate, header, fsync, fsync_dir
        if method == "fsync_dir" and phase == "after":
            creating[0] = False
        if method in ("open", "preallocate", "fsync_dir", "rename", "makedirs", "remove"):
            return True
        if method in ("pwrite", "fsync", "fdatasync") and creating[0]:
            return True
        return method == "fsync" and rng.random() < 0.1   # the snapshot's file syncs

    points = CrashPoints(tmp_path, seed, acked, lock, choose, modes, limit)
    files = FaultyFiles(root, sync_for_real=False)
    files.hooks.append(points)
    db = stemedb.open(root, segment_size=SMALL, snapshot_every=250, files=files)
    for i in range(40):
        records = [claim(f"dir-{i}", j) for j in range(20)]
        ids = db.put_many(records[:10]) + [db.put(r) for r in records[10:]]
        with lock:
            acked.update(ids)
    db.close()
    return points


def test_dir_fsync_segment_roll_and_snapshot_rename(tmp_path):
    seed = _seed("dir-fsync")
    points = _roll_and_rename_points(tmp_path, seed, [{"keep_pages": "none", "tear_last_page": True}],
                                     limit=300)
    print(f"dir-fsync: points tried {points.states}")
    points.assert_clean("dir-fsync", seed)


def test_dir_fsync_journal_commits_an_entry_before_its_contents(tmp_path):
    """A journal may commit a new segment's directory entry (ext4: every 5 s) before its data.

    The crash then leaves segments/NNNNNNNN.seg empty or all zeros; nothing in
    it was acknowledged (acks follow the header fsync and directory fsync), so
    the store must still open.
    """
    seed = _seed("dir-fsync (journal order)")
    modes = [{"keep_pages": "random", "keep_changes": "prefix", "tear_last_page": True}]
    points = _roll_and_rename_points(tmp_path, seed, modes, limit=300)
    print(f"dir-fsync (journal order): points tried {points.states}")
    points.assert_clean("dir-fsync (journal order)", seed)


def test_dir_fsync_new_store(tmp_path):
    """Power lost after the first acknowledged writes to a store this process created."""
    seed = _seed("dir-fsync (new store)")
    root = tmp_path / "db"
    acked: set[bytes] = set()
    lock = threading.Lock()
    points = CrashPoints(tmp_path, seed, acked, lock, lambda m, p, r: m != "close",
                         [{"keep_pages": "none", "tear_last_page": False}], limit=150)
    files = FaultyFiles(root, sync_for_real=False)
    files.hooks.append(points)
    db = stemedb.open(root, segment_size=SMALL, files=files)
    for i in range(12):
        record_id = db.put(claim("new-store", i))
        with lock:
            acked.add(record_id)
    files.hooks.clear()
    points.limit += 1
    points(files, "after all acks", 0, "")
    db.close()
    print(f"dir-fsync (new store): points tried {points.states}")
    points.assert_clean("dir-fsync (new store)", seed)


# ------------------------------------------------------------------ torn-tail


def _tail_fixture(tmp_path: Any) -> tuple[bytes, bytes, int, list[Frame]]:
    """(segment bytes, MANIFEST bytes, where the last records start, frames) of a store."""
    live = tmp_path / "live"
    db = stemedb.open(live, segment_size=SMALL, files=QuietFiles())
    for i in range(6):
        db.put(claim("early", i))
    segment = live / "segments" / "00000000.seg"
    tail_start = parse_frames(segment.read_bytes())[-1].aligned_end
    db.put_many([claim("tail-many", i) for i in range(2)])
    db.writer(SIGNERS[1]).put(unsigned("tail-group", 0))
    db.put(claim("tail-one", 0))
    pristine = segment.read_bytes()   # what a kill -9 now would leave: no snapshot
    manifest = (live / "MANIFEST").read_bytes()
    db.close()
    return pristine, manifest, tail_start, parse_frames(pristine)


def test_torn_tail(tmp_path):
    seed = _seed("torn-tail")
    rng = random.Random(seed)
    # This test reads frames itself, as docs/format.md lays them out.
    assert (_segment.HEADER_SIZE, _segment.FRAME_HEADER, _segment.RECORD, _segment.BATCH) == (
        SEGMENT_HEADER, FRAME_HEADER, RECORD_FRAME, BATCH_FRAME)
    pristine, manifest, tail_start, frames = _tail_fixture(tmp_path)
    data_end = frames[-1].aligned_end
    records = {f.record_id for f in frames if f.kind == RECORD_FRAME}
    work = tmp_path / "work"
    (work / "segments").mkdir(parents=True)
    (work / "MANIFEST").write_bytes(manifest)
    segment = work / "segments" / "00000000.seg"
    tried = 0
    failures: list[str] = []
    for offset in range(tail_start, data_end + 1):
        for variant in ("zero", "garbage"):
            damaged = bytearray(pristine)
            damaged[offset:] = bytes(len(pristine) - offset)
            if variant == "garbage":
                length = rng.randint(1, 600)
                damaged[offset:offset + length] = rng.randbytes(length)
            # A frame is whole while its bytes are unchanged (zeroing a zero byte changes
            # nothing); the scan stops at the first frame that is not.
            changed = [f for f in frames if damaged[f.position:f.end] != pristine[f.position:f.end]]
            stop = changed[0].position if changed else data_end
            whole = [f for f in frames if f.position < stop]
            expected_ids = {f.record_id for f in whole if f.kind == RECORD_FRAME}
            expected_torn = len(bytes(damaged[stop:]).rstrip(b"\0"))
            for name in os.listdir(work / "segments"):   # a previous cut's quarantine copy
                os.remove(work / "segments" / name)
            segment.write_bytes(damaged)
            tried += 1
            failure = _torn_check(work, records, expected_ids, expected_torn, stop,
                                  reopen=(offset % 16 == 0))
            if failure:
                failures.append(f"{variant} from offset {offset}: {failure}")
    figure = (f"torn-tail: offsets tried {tried} (every offset of the last "
              f"{data_end - tail_start} bytes, zero and garbage tails), wrong recoveries "
              f"{len(failures)} (seed {seed})")
    print(figure)
    assert not failures, f"{figure}\n" + "\n".join(failures[:10])


def _torn_check(work: Any, records: set[bytes], expected: set[bytes], expected_torn: int,
                stop: int, reopen: bool) -> str:
    """'' if the store at `work` recovers exactly `expected` and sets aside `expected_torn` bytes.

    Set-aside bytes are reported by verify (not OK) until their quarantine
    file is removed; nothing else may be reported.
    """
    for attempt in range(2 if reopen else 1):   # the second open drops nothing more
        try:
            db = stemedb.open(work, files=QuietFiles())
        except Exception as exc:
            return f"open failed: {type(exc).__name__}: {exc}"
        with db:
            present = {r for r in records if db.contains(r)}
            torn = db.recovery.torn_bytes_dropped
            wrong = served_intact(db, expected)
            report = db.verify()
        aside = [(d.kind, d.offset, d.length) for d in report.damage]
        wanted = [("set aside", stop, expected_torn)] if expected_torn else []
        others = [p for p in report.problems if "set aside" not in p]
        if (present != expected or torn != (0 if attempt else expected_torn) or wrong
                or aside != wanted or others or report.ok != (not expected_torn)):
            return (f"open {attempt + 1}: recovered {len(present)} records (expected "
                    f"{len(expected)}), torn bytes {torn} (expected {expected_torn}), not intact "
                    f"{len(wrong)}, verify {report.problems[:2]}")
    return ""


# ------------------------------------------------------------------- bit-flip


@dataclass
class FlipStore:
    pristine: Any                  # a copy of the store as a crash left it
    records: dict[bytes, bytes]    # ID → encoding of every record written
    segments: list[str]            # relative paths, sealed first
    frames: dict[str, list[Frame]]
    snapshot: str                  # relative path of the snapshot directory
    members: dict[bytes, list[bytes]]   # envelope ID → the IDs of its members
    position: tuple[int, int]      # (segment, offset) the snapshot covers up to

    def replayed(self, relative: str, offset: int) -> bool:
        """Whether an open with the snapshot reads the frame at this place again."""
        number = int(os.path.basename(relative)[:-4])
        return (number, offset) >= self.position


def _flip_fixture(tmp_path: Any) -> FlipStore:
    """Five segments; a snapshot after the third; the last two replayed at open."""
    live = tmp_path / "live"
    db = stemedb.open(live, segment_size=SMALL, files=NoSyncFiles())
    records: dict[bytes, bytes] = {}
    members: dict[bytes, list[bytes]] = {}
    writer = db.writer(SIGNERS[1])
    i = 0
    while db.stats()["segments"] < 5:
        batch = [claim(f"flip-{i}", j) for j in range(8)]
        db.put_many(batch)
        records.update((r.id, r.encode()) for r in batch)
        group = writer.put_many([unsigned(f"flip-g{i}", j) for j in range(3)])
        for record_id in group:
            records[record_id] = db.get(record_id).encode()
        single = claim("flip-single", i)
        db.put(single)
        records[single.id] = single.encode()
        for record_id in group:   # the group's envelope is a record too
            envelope = db.get(record_id).envelope
            records[envelope] = db.get(envelope).encode()
            members.setdefault(envelope, []).append(record_id)
        if db.stats()["segments"] == 3 and not (live / "index").exists():
            db.checkpoint()
        i += 1
    pristine = tmp_path / "pristine"
    shutil.copytree(live, pristine)
    db.close()
    segments = sorted(f"segments/{n}" for n in os.listdir(pristine / "segments"))
    frames = {s: parse_frames((pristine / s).read_bytes()) for s in segments}
    snapshot = "index/" + os.listdir(pristine / "index")[0]
    manifest = json.loads((pristine / snapshot / "MANIFEST.json").read_text())
    return FlipStore(pristine, records, segments, frames, snapshot, members,
                     tuple(manifest["position"]))


@dataclass
class FlipOutcome:
    detected: bool
    wrong: int = 0        # records served with other content than was written
    lost: int = 0         # records not served whose bytes were not damaged
    note: str = ""


def _flip_and_check(store: FlipStore, work: Any, relative: str, offset: int, new: bytes,
                    drop_snapshot: bool, expect: Callable[[Any, str, list[str]], bool],
                    damaged: set[bytes]) -> FlipOutcome:
    """Write `new` over bytes of a copy of the store, open it, and check what it serves.

    The copy is made once; each change touches one file and is undone afterwards
    (QuietFiles writes no snapshot, and damage in a sealed segment is never cut).
    `damaged`: the records that may go unserved (their own frame or proof is hit).
    """
    if not work.exists():
        shutil.copytree(store.pristine, work)
    target = work / relative
    original = target.read_bytes()
    data = bytearray(original)
    data[offset:offset + len(new)] = new
    target.write_bytes(data)
    if drop_snapshot:
        os.rename(work / "index", work / "index-hidden")
    try:
        return _check_flipped(store, work, target, expect, damaged)
    finally:
        target.write_bytes(original)
        if drop_snapshot:
            os.rename(work / "index-hidden", work / "index")
        active = store.segments[-1]
        if (work / active).read_bytes() != (store.pristine / active).read_bytes():
            shutil.copyfile(store.pristine / active, work / active)
        for name in os.listdir(work / "segments"):   # e.g. a cut tail's quarantine copy
            if not (store.pristine / "segments" / name).exists():
                os.remove(work / "segments" / name)


def _check_flipped(store: FlipStore, work: Any, target: Any,
                   expect: Callable[[Any, str, list[str]], bool], damaged: set[bytes]) -> FlipOutcome:
    try:
        db = stemedb.open(work, files=QuietFiles())
    except stemedb.CorruptionError as exc:
        return FlipOutcome(exc.path == str(target), note=f"open refused: {exc}")
    except Exception as exc:
        return FlipOutcome(False, note=f"open raised {type(exc).__name__}: {exc}")
    with db:
        problems = list(db.verify().problems)
        wrong = lost = 0
        ids = list(store.records)
        try:
            served = db.get_many(ids)
        except stemedb.CorruptionError:   # find which, one by one
            served = []
            for record_id in ids:
                try:
                    served.append(db.get(record_id))
                except (stemedb.NotFound, stemedb.CorruptionError):
                    served.append(None)
        for record_id, record in zip(ids, served):
            if record is None:
                lost += record_id not in damaged
            else:
                wrong += record.id != record_id or record.encode() != store.records[record_id]
        detected = expect(db, str(target), problems)
    return FlipOutcome(detected, wrong, lost, "; ".join(problems[:2]))


def test_bit_flip_segments_and_snapshot_columns(tmp_path):
    """One damaged byte (or one zeroed frame magic) at a time in sealed segments and snapshots.

    Every damage must be detected and named, no wrong record served, and every
    record whose own frame is intact still served — except, after a full
    replay, the members of a damaged envelope: they are held back (reported).
    """
    seed = _seed("bit-flip")
    rng = random.Random(seed)
    store = _flip_fixture(tmp_path)
    work = tmp_path / "work"
    kinds = Counter()
    missed: list[str] = []
    wrong = collateral = held_back = 0
    sealed = store.segments[:-1]
    columns = sorted(n for n in os.listdir(store.pristine / store.snapshot) if n.endswith(".npy"))
    plan = (["frame"] * 100 + ["zeroed magic"] * 20 + ["segment header"] * 10
            + ["segment footer"] * 10 + ["snapshot column"] * 40)
    for kind in plan:
        relative = rng.choice(sealed)
        drop, damaged = rng.random() < 0.5, set()
        size = (store.pristine / relative).stat().st_size
        if kind == "snapshot column":
            relative = f"{store.snapshot}/{rng.choice(columns)}"
            offset = rng.randrange((store.pristine / relative).stat().st_size)
            drop = False

            def expect(db: Any, path: str, problems: list[str]) -> bool:
                return any("snapshot ignored" in p and path in p for p in problems)
        elif kind == "segment header":
            offset = rng.randrange(SEGMENT_HEADER)

            def expect(db: Any, path: str, problems: list[str]) -> bool:
                return False   # the header is checked at open, which must refuse
        elif kind == "segment footer":
            offset = rng.randrange(size - SEGMENT_FOOTER, size)

            def expect(db: Any, path: str, problems: list[str], place: int = size - SEGMENT_FOOTER
                       ) -> bool:
                return any(path in p and f"offset {place}" in p and "footer" in p for p in problems)
        else:
            frame = rng.choice(store.frames[relative])
            offset = frame.position if kind == "zeroed magic" else rng.randrange(frame.position,
                                                                                 frame.end)
            if frame.kind == RECORD_FRAME:
                damaged = {frame.record_id}
                if drop or store.replayed(relative, frame.position):
                    # a replay holds back the members of a damaged envelope
                    damaged |= set(store.members.get(frame.record_id, ()))
            kind = f"{kind} ({'full replay' if drop else 'snapshot'})"

            def expect(db: Any, path: str, problems: list[str], frame: Frame = frame,
                       damaged: set[bytes] = damaged) -> bool:
                named = any(path in p and f"offset {frame.position}" in p for p in problems)
                if len(damaged) > 1 and not any("held back" in p and frame.record_id.hex() in p
                                                for p in problems):
                    return False
                if frame.kind == RECORD_FRAME and db.contains(frame.record_id):
                    try:
                        db.get(frame.record_id)
                        return False
                    except stemedb.CorruptionError as exc:
                        return named and exc.path == path and exc.offset == frame.position
                return named
        original = (store.pristine / relative).read_bytes()
        if kind.startswith("zeroed magic"):
            new = bytes(4)
        else:
            new = bytes([original[offset] ^ rng.randrange(1, 256)])
        outcome = _flip_and_check(store, work, relative, offset, new, drop, expect, damaged)
        kinds[kind] += 1
        wrong += outcome.wrong
        collateral += outcome.lost
        held_back += len(damaged) - 1 if len(damaged) > 1 else 0
        if not outcome.detected or outcome.wrong or outcome.lost:
            missed.append(f"{kind} {relative} offset {offset} := {new.hex()}: lost {outcome.lost}, "
                          f"wrong {outcome.wrong}; {outcome.note}")
    flips = sum(kinds.values())
    figure = (f"bit-flip: damages {flips}, detected {100 * (flips - len(missed)) / flips:.1f} %, "
              f"wrong records served {wrong}, intact records left unreachable {collateral}, "
              f"members held back (and reported) {held_back} ({dict(kinds)}, seed {seed})")
    print(figure)
    assert not missed and not wrong and not collateral, f"{figure}\n" + "\n".join(missed[:10])


def _manifest_flips(tmp_path: Any, every_byte: bool) -> None:
    seed = _seed("bit-flip (snapshot MANIFEST.json)")
    rng = random.Random(seed)
    store = _flip_fixture(tmp_path)
    relative = f"{store.snapshot}/MANIFEST.json"
    original = (store.pristine / relative).read_bytes()
    # Single-bit flips (a flipped bit turns many digits into other digits): one random bit
    # of every byte of the fields before the checksums (position, batch_seq, version, ...)
    # and of a sample of the checksum table; with every_byte, all 8 bits of every byte.
    fields_end = original.index(b'"checksums"') + len(b'"checksums"')
    rest = range(fields_end, len(original))
    if every_byte:
        flips = [(offset, 1 << bit) for offset in range(len(original)) for bit in range(8)]
    else:
        flips = [(offset, 1 << rng.randrange(8))
                 for offset in [*range(fields_end), *sorted(rng.sample(rest, 30))]]
    outcomes = Counter()
    missed: list[tuple[int, str]] = []
    lost = 0
    for offset, mask in flips:

        def expect(db: Any, path: str, problems: list[str]) -> bool:
            return any("snapshot" in p and path.rsplit("/", 1)[0] in p for p in problems)

        outcome = _flip_and_check(store, tmp_path / "work", relative, offset,
                                  bytes([original[offset] ^ mask]), False, expect, set())
        if outcome.detected and not outcome.wrong and not outcome.lost:
            outcomes["detected"] += 1
            continue
        what = ("undetected, records lost or wrong" if outcome.wrong or outcome.lost else
                "open crashed" if outcome.note.startswith("open raised") else "undetected")
        outcomes[what] += 1
        lost += outcome.lost
        context = original[max(0, offset - 12):offset + 12]
        missed.append((-outcome.lost - outcome.wrong - (what == "open crashed"),
                       f"offset {offset} ({context!r}) ^{mask:#04x}: {what}: lost {outcome.lost}, "
                       f"wrong {outcome.wrong}; {outcome.note}"))
    total = sum(outcomes.values())
    figure = (f"bit-flip (snapshot MANIFEST.json): flips {total}, detected "
              f"{100 * outcomes['detected'] / total:.1f} %, acknowledged records lost {lost} "
              f"({dict(outcomes)}, seed {seed})")
    print(figure)
    worst_first = [line for _, line in sorted(missed)]
    assert outcomes["detected"] == total, f"{figure}\n" + "\n".join(worst_first[:12])


def test_bit_flip_snapshot_manifest(tmp_path):
    _manifest_flips(tmp_path, every_byte=False)


@pytest.mark.slow
def test_bit_flip_snapshot_manifest_every_byte(tmp_path):
    _manifest_flips(tmp_path, every_byte=True)


# ------------------------------------------------------------------ fsync-EIO


@dataclass
class Outcomes:
    acked: set[bytes] = field(default_factory=set)
    durability_errors: int = 0
    acks_after_failure: int = 0
    other: list[str] = field(default_factory=list)


def _writes_through_failure(db: stemedb.Database, failed: threading.Event, tag: str,
                            threads: int = 3, ops: int = 40) -> Outcomes:
    """Writer threads until they stop; an op that starts after the failure must not be acked."""
    out = Outcomes()
    lock = threading.Lock()

    def worker(number: int) -> None:
        writer = db.writer(SIGNERS[1])
        for i in range(ops):
            after = failed.is_set()
            try:
                if i % 3 == 0:
                    ids = db.put_many([claim(f"{tag}-{number}-{i}", j) for j in range(8)])
                elif i % 3 == 1:
                    ids = [db.put(claim(f"{tag}-{number}", i))]
                else:
                    ids = [writer.put(unsigned(f"{tag}-{number}", i))]
            except stemedb.DurabilityError:
                with lock:
                    out.durability_errors += 1
                continue
            except Exception as exc:
                with lock:
                    out.other.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                out.acked.update(ids)
                out.acks_after_failure += after

    run_threads([lambda n=n: worker(n) for n in range(threads)])
    return out


def test_fsync_eio(tmp_path):
    points = [("fdatasync", n) for n in (1, 2, 3, 5, 8, 13, 21)]
    points += [("fsync", 1), ("fsync_dir", 1), ("pwrite", 4)]   # segment creation, a write
    tried = acks_after = 0
    findings: list[str] = []
    for index, (method, n) in enumerate(points):
        root = tmp_path / f"store-{index}"
        files = FaultyFiles(root, sync_for_real=False)
        db = stemedb.open(root, segment_size=SMALL, snapshot_every=10**9, files=files)
        before = {db.put(claim(f"warm-{index}", i)) for i in range(5)}
        at_call = files.calls[method] + n
        files.fail(method, at_call=at_call, errno=errno.EIO)
        failed = threading.Event()

        def mark(files: FaultyFiles, name: str, number: int, phase: str, method: str = method,
                 at_call: int = at_call, failed: threading.Event = failed) -> None:
            if name == method and number == at_call and phase == "before":
                failed.set()

        files.hooks.append(mark)
        out = _writes_through_failure(db, failed, f"eio-{index}")
        fired = bool(files.injected)
        tried += fired
        acks_after += out.acks_after_failure
        problem = []
        if out.other:
            problem.append(f"other errors {out.other[:2]}")
        if out.acks_after_failure:
            problem.append(f"{out.acks_after_failure} acks after the failure")
        if fired:
            if not out.durability_errors or not db.stats()["failed"]:
                problem.append("no DurabilityError / store not marked failed")
            try:
                db.put(claim("after-failure", index))
                problem.append("a write after the failure was acked")
            except stemedb.DurabilityError:
                pass
        lost = served_intact(db, before | out.acked)
        if lost:
            problem.append(f"{len(lost)} acked unreadable before reopen")
        db.close()
        check = check_store(root, before | out.acked, write_after=True)
        if not check.opened or check.lost or check.problems or not check.writable:
            problem.append(f"reopen: {check.error} lost {len(check.lost)} {check.problems[:2]}")
        if problem:
            findings.append(f"{method} call {n}: " + "; ".join(problem))
    figure = f"fsync-EIO: points {tried} (of {len(points)}), acks after failure {acks_after}"
    print(figure)
    assert tried == len(points) and not findings, f"{figure}\n" + "\n".join(findings)


def test_fsync_eio_and_enospc_while_writing_a_snapshot(tmp_path):
    """The snapshot a leader writes after its batch fails: an OSError must not reach writers raw.

    The batch is already durable. Acceptable: the ack, or DurabilityError (the
    store then refuses writes), or StorageFull for ENOSPC. Not acceptable: a
    bare OSError for a write that was in fact stored, the store writing on.
    """
    cases = [("fsync", errno.EIO, stemedb.DurabilityError),
             ("write_file", errno.ENOSPC, stemedb.StorageFull)]
    findings: list[str] = []
    for index, (method, code, allowed) in enumerate(cases):
        root = tmp_path / f"store-{index}"
        files = FaultyFiles(root, sync_for_real=False)
        with stemedb.open(root, segment_size=SMALL, snapshot_every=10, files=files) as db:
            files.fail(method, errno=code)
            for i in range(15):
                record = claim(f"snap-{index}", i)
                try:
                    db.put(record)
                except (stemedb.DurabilityError, stemedb.StorageFull) as exc:
                    if not isinstance(exc, allowed):
                        findings.append(f"{method} {errno.errorcode[code]}: {type(exc).__name__}")
                    break
                except OSError as exc:
                    findings.append(
                        f"{method} {errno.errorcode[code]} on put {i}: raw {type(exc).__name__}: "
                        f"{exc}; record stored anyway: {db.contains(record.id)}; store failed: "
                        f"{db.stats()['failed']}")
                    break
            files.clear()
    figure = f"fsync-EIO (snapshot): points {len(cases)}, raw OSErrors delivered {len(findings)}"
    print(figure)
    assert not findings, f"{figure}\n" + "\n".join(findings)


# ------------------------------------------------------------------ disk-full


def _fill_until_full(db: stemedb.Database, tag: str, limit: int = 3000) -> tuple[set[bytes], Any, Any]:
    """Single puts until one raises StorageFull: (acked IDs, the refused record, the error)."""
    acked: set[bytes] = set()
    for i in range(limit):
        record = claim(tag, i)
        try:
            acked.add(db.put(record))
        except stemedb.StorageFull as exc:
            return acked, record, exc
    return acked, None, None


def test_disk_full(tmp_path):
    points = [("preallocate", 1), ("preallocate", 2), ("preallocate", 4), ("pwrite", 3),
              ("pwrite", 40)]
    crashes: list[str] = []
    for index, (method, n) in enumerate(points):
        root = tmp_path / f"store-{index}"
        files = FaultyFiles(root, sync_for_real=False)
        try:
            _disk_full_point(root, files, method, n, index)
        except Exception as exc:  # anything but the promised behaviour is counted
            crashes.append(f"ENOSPC at {method} #{n}: {type(exc).__name__}: {exc}")
    figure = f"disk-full: points {len(points)}, crashes {len(crashes)}"
    print(figure)
    assert not crashes, f"{figure}\n" + "\n".join(crashes)


def _disk_full_point(root: Any, files: FaultyFiles, method: str, n: int, index: int) -> None:
    db = stemedb.open(root, segment_size=SMALL, snapshot_every=10**9, files=files)
    acked = {db.put(claim(f"before-{index}", i)) for i in range(3)}
    files.fail(method, at_call=files.calls[method] + n, errno=errno.ENOSPC, times=None)
    more, refused, error = _fill_until_full(db, f"full-{index}")
    acked |= more
    assert error is not None, "no StorageFull"
    assert isinstance(error, OSError) and "free" in str(error) and str(root) in str(error), error
    assert not db.stats()["failed"], "StorageFull must not poison the store"
    assert not db.contains(refused.id), "the refused record was stored"
    assert not served_intact(db, acked), "reads stopped working"
    assert sum(1 for _ in db.scan(subject=f"full-{index}")) == len(more)
    for _ in range(3):   # still full: still StorageFull, never DurabilityError
        with pytest.raises(stemedb.StorageFull):
            db.put(refused)
    files.clear()        # space freed
    acked.add(db.put(refused))
    acked |= {db.put(claim(f"after-{index}", i)) for i in range(400)}   # crosses a roll
    assert not served_intact(db, acked)
    db.close()
    check = check_store(root, acked, write_after=True)
    assert check.opened and not check.lost and not check.problems and check.writable, check


def test_disk_full_refused_put_many_changes_nothing(tmp_path):
    """put_many promises: nothing is written if any record is refused."""
    root = tmp_path / "db"
    files = FaultyFiles(root, sync_for_real=False)
    stored = refused_total = 0
    with stemedb.open(root, segment_size=SMALL, files=files) as db:
        files.fail("preallocate", errno=errno.ENOSPC, times=None)
        for i in range(400):
            batch = [claim(f"many-{i}", j) for j in range(20)]
            try:
                db.put_many(batch)
            except stemedb.StorageFull:
                refused_total = len(batch)
                stored = sum(db.contains(r.id) for r in batch)
                break
    figure = f"disk-full (put_many at a roll): refused {refused_total}, of which stored {stored}"
    print(figure)
    assert refused_total and stored == 0, figure


def test_disk_full_message_names_the_segment_size(tmp_path):
    root = tmp_path / "db"
    files = FaultyFiles(root, sync_for_real=False)
    with stemedb.open(root, segment_size=SMALL, files=files) as db:
        files.fail("preallocate", errno=errno.ENOSPC, times=None)
        _, _, error = _fill_until_full(db, "message")
    print(f"disk-full message: {error}")
    assert error is not None
    assert "0 MiB" not in str(error) and ("64 KiB" in str(error) or "65536" in str(error)), (
        f"StorageFull should say how much room a segment needs: {error}")


def test_disk_full_short_write_leaves_no_refused_records(tmp_path):
    """A pwrite that writes part of a batch, then fails with ENOSPC (a short write).

    The writer is told StorageFull (nothing stored); after the next write and a
    reopen, none of the refused records may appear.
    """
    root = tmp_path / "db"
    files = FaultyFiles(root, sync_for_real=False)
    with stemedb.open(root, segment_size=SMALL, files=files) as db:
        db.put(claim("short", 0))
        files.fail("pwrite", errno=errno.ENOSPC, partial=True)
        refused = [claim("short", j) for j in range(10, 20)]   # all frames the same size
        with pytest.raises(stemedb.StorageFull):
            db.put_many(refused)
        db.put(claim("short", 1))   # overwrites the refused batch's first two frames
    with stemedb.open(root, files=NoSyncFiles()) as db:
        appeared = sum(db.contains(r.id) for r in refused)
    figure = f"disk-full (short write): refused 10, present after reopen {appeared}"
    print(figure)
    assert appeared == 0, figure
