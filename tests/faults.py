"""A file layer for tests that fails chosen calls and knows what a power loss would keep.

Owns: `FaultyFiles`, a `stemedb.engine.files.FileLayer` that (a) raises a
chosen errno from a chosen call (`fail("fdatasync", at_call=3, errno=EIO)`),
(b) remembers, per file, the contents every page had before the first write
not yet covered by a completed fdatasync/fsync of that file, and every
directory change (file or directory created, renamed, removed, resized) not
yet covered by an fsync of its directory (or, for a size change, of the file),
and (c) `crash_image(target)`: a copy of the store as a power loss at this
instant could leave it. Must never: decide anything for the engine, or touch
files outside the directory it was given.

The model, deliberately simple (LevelDB's FaultInjectionTestEnv, SQLite's
crash VFS, ALICE): an unsynced page reverts to the bytes it held at the last
sync; the last page written may be torn (a prefix of its 512-byte sectors
new, the rest old); an unsynced directory entry is absent and an unsynced
rename is undone. Optionally some unsynced pages survive anyway, and the
unsynced directory changes survive as an ordered prefix (a journal commits
metadata in order, without the file data: ext4's 5-second commit).

Known limits: the store's own directory (`root`) is assumed durable (it is
the caller's); the LOCK file and `shutil.rmtree` of old snapshots bypass the
file layer, so what they do counts as durable at once.

Resource handling: descriptors are the real ones (the real FileLayer opens
them); this layer only maps them to paths. `crash_image` copies under a lock
that every layer call also takes, so an image never sees half a call.
Error handling: an injected fault raises OSError(errno) before the call does
anything, unless `partial=True` for pwrite (half the bytes are written first,
like a short write followed by a failing one).
"""

from __future__ import annotations

import errno as errno_module
import os
import random
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from stemedb.engine.files import FileLayer

PAGE = 4096
SECTOR = 512

# A hook runs inside every layer call, before and after the real work:
# hook(files, method, call_number, phase) with phase "before" or "after".
Hook = Callable[["FaultyFiles", str, int, str], None]


@dataclass
class Fault:
    method: str
    at_call: int | None      # the call number (per method, from 1) that fails first; None = next
    errno: int
    times: int | None        # how many calls fail in a row; None = until clear()
    partial: bool = False    # pwrite only: write the first half, then fail
    fired: int = 0


@dataclass
class DirectoryChange:
    """One unsynced change of a directory entry (or a file's size), in program order."""

    kind: str                     # "create", "rename", "remove", "resize"
    path: str                     # created / removed / resized path, or the rename target
    source: str | None = None     # rename source
    old_bytes: bytes | None = None   # removed file's content, or a replaced rename target's
    old_size: int = 0             # resize: the size before
    is_dir: bool = False
    waiting_on: set[str] = field(default_factory=set)  # directories (or the file) whose sync covers it


@dataclass
class ImageInfo:
    """What one crash image kept, for failure messages."""

    seed: int | None
    dirty_pages: int
    kept_pages: int
    torn: str | None
    changes_pending: int
    changes_kept: int
    undone: list[str]        # the directory changes this image undid, oldest first

    def __str__(self) -> str:
        return (f"seed={self.seed} dirty_pages={self.dirty_pages} kept={self.kept_pages} "
                f"torn={self.torn} dir_changes={self.changes_pending} kept={self.changes_kept} "
                f"undone={self.undone[:4]}")


class FaultyFiles(FileLayer):
    """The real file layer plus injected errors and a record of everything not yet durable."""

    def __init__(self, root: str | os.PathLike[str], *, sync_for_real: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        # The model above decides what a crash image keeps; the real syncs only cost
        # time, so tests that never lose power may skip them.
        self.sync_for_real = sync_for_real
        self.calls: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self.hooks: list[Hook] = []
        self.injected: list[tuple[str, int, int]] = []   # (method, call number, errno) that fired
        self._lock = threading.RLock()
        self._paths: dict[int, str] = {}
        # path → {page number → the page's bytes at the last sync (zero-padded)}
        self._dirty: dict[str, dict[int, bytes]] = {}
        self._dirty_order: list[tuple[str, int]] = []     # (path, page) in first-dirtied order
        self._last_page: tuple[str, int] | None = None     # the most recently written page
        self._changes: list[DirectoryChange] = []

    # -- faults and hooks ----------------------------------------------------

    def fail(self, method: str, *, at_call: int | None = None, errno: int = errno_module.EIO,
             times: int | None = 1, partial: bool = False) -> Fault:
        """Make `method` raise OSError(errno) at its `at_call`-th call (default: the next one)."""
        fault = Fault(method, at_call, errno, times, partial)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every pending fault (space was freed, the disk came back)."""
        with self._lock:
            self.faults = []

    def _enter(self, method: str, path: str | None) -> tuple[int, Fault | None]:
        self.calls[method] += 1
        number = self.calls[method]
        for hook in list(self.hooks):
            hook(self, method, number, "before")
        for fault in self.faults:
            if fault.method != method:
                continue
            due = fault.at_call is None or number >= fault.at_call
            if due and (fault.times is None or fault.fired < fault.times):
                fault.fired += 1
                self.injected.append((method, number, fault.errno))
                if fault.partial and method == "pwrite":
                    return number, fault
                raise OSError(fault.errno, os.strerror(fault.errno), path)
        return number, None

    def _leave(self, method: str, number: int) -> None:
        for hook in list(self.hooks):
            hook(self, method, number, "after")

    # -- bookkeeping ---------------------------------------------------------

    def _inside(self, path: str) -> bool:
        path = os.path.abspath(path)
        return path != self.root and path.startswith(self.root + os.sep)

    def _remember_pages(self, fd: int, path: str, offset: int, length: int) -> None:
        pages = self._dirty.setdefault(path, {})
        size = os.fstat(fd).st_size
        for page in range(offset // PAGE, (offset + max(length, 1) - 1) // PAGE + 1):
            if page not in pages:
                old = os.pread(fd, PAGE, page * PAGE) if page * PAGE < size else b""
                pages[page] = old.ljust(PAGE, b"\0")
                self._dirty_order.append((path, page))
            self._last_page = (path, page)
        if offset + length > size:
            self._resized(path, size)

    def _resized(self, path: str, old_size: int) -> None:
        """A size change, undone by a crash unless the file is synced first.

        Only the first one counts while the file is unsynced: its old size is
        the size at the last sync, which is what an undo must restore.
        """
        if not any(c.kind == "resize" and c.path == path for c in self._changes):
            self._change(DirectoryChange("resize", path, old_size=old_size, waiting_on={path}))

    def _change(self, change: DirectoryChange) -> None:
        if self._inside(change.path):
            if not change.waiting_on:
                change.waiting_on = {os.path.dirname(change.path)}
                if change.source is not None:
                    change.waiting_on.add(os.path.dirname(change.source))
            self._changes.append(change)

    def _synced_file(self, path: str) -> None:
        self._dirty.pop(path, None)
        self._dirty_order = [(p, n) for p, n in self._dirty_order if p != path]
        if self._last_page is not None and self._last_page[0] == path:
            self._last_page = None
        self._covered(path)

    def _covered(self, synced: str) -> None:
        for change in self._changes:
            change.waiting_on.discard(synced)
        self._changes = [c for c in self._changes if c.waiting_on]

    def _moved(self, source: str, target: str) -> None:
        def move(path: str) -> str:
            if path == source or path.startswith(source + os.sep):
                return target + path[len(source):]
            return path
        self._dirty = {move(p): pages for p, pages in self._dirty.items()}
        self._dirty_order = [(move(p), n) for p, n in self._dirty_order]
        if self._last_page is not None:
            self._last_page = (move(self._last_page[0]), self._last_page[1])
        self._paths = {fd: move(p) for fd, p in self._paths.items()}

    # -- the FileLayer interface ---------------------------------------------

    def open(self, path: str, *, create: bool = False) -> int:
        path = os.path.abspath(path)
        with self._lock:
            number, _ = self._enter("open", path)
            fd = super().open(path, create=create)
            self._paths[fd] = path
            if create:
                self._change(DirectoryChange("create", path))
            self._leave("open", number)
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            number, _ = self._enter("close", self._paths.get(fd))
            super().close(fd)
            self._paths.pop(fd, None)
            self._leave("close", number)

    def preallocate(self, fd: int, length: int) -> None:
        path = self._paths.get(fd)
        with self._lock:
            number, _ = self._enter("preallocate", path)
            size = os.fstat(fd).st_size
            super().preallocate(fd, length)
            if path is not None and length > size:
                self._resized(path, size)
            self._leave("preallocate", number)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        path = self._paths.get(fd)
        with self._lock:
            number, partial = self._enter("pwrite", path)
            view = memoryview(data)
            if partial is not None:
                view = view[: len(view) // 2]
            if path is not None:
                self._remember_pages(fd, path, offset, len(view))
            super().pwrite(fd, view, offset)
            if partial is not None:
                raise OSError(partial.errno, os.strerror(partial.errno), path)
            self._leave("pwrite", number)

    def fdatasync(self, fd: int) -> None:
        path = self._paths.get(fd)
        with self._lock:
            number, _ = self._enter("fdatasync", path)
            if self.sync_for_real:
                super().fdatasync(fd)
            if path is not None:
                self._synced_file(path)
            self._leave("fdatasync", number)

    def fsync(self, fd: int) -> None:
        path = self._paths.get(fd)
        with self._lock:
            number, _ = self._enter("fsync", path)
            if self.sync_for_real:
                super().fsync(fd)
            if path is not None:
                self._synced_file(path)
            self._leave("fsync", number)

    def fsync_dir(self, path: str) -> None:
        path = os.path.abspath(path)
        with self._lock:
            number, _ = self._enter("fsync_dir", path)
            if self.sync_for_real:
                super().fsync_dir(path)
            self._covered(path)
            self._leave("fsync_dir", number)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace, write, fsync: the same steps as FileLayer, each one tracked."""
        path = os.path.abspath(path)
        with self._lock:
            number, _ = self._enter("write_file", path)
            existed = os.path.exists(path)
            if existed:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                # O_TRUNC is a size change: remember the old pages, as a write would.
                self._remember_pages(fd, path, 0, os.fstat(fd).st_size)
                self._resized(path, os.fstat(fd).st_size)
                os.ftruncate(fd, 0)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                self._change(DirectoryChange("create", path))
            self._paths[fd] = path
            try:
                self.pwrite(fd, data, 0)
                self.fsync(fd)
            finally:
                self._paths.pop(fd, None)
                os.close(fd)
            self._leave("write_file", number)

    def rename(self, source: str, target: str) -> None:
        source, target = os.path.abspath(source), os.path.abspath(target)
        with self._lock:
            number, _ = self._enter("rename", target)
            old = None
            if os.path.isfile(target):
                with open(target, "rb") as handle:
                    old = handle.read()
            super().rename(source, target)
            self._moved(source, target)
            self._change(DirectoryChange("rename", target, source=source, old_bytes=old,
                                         is_dir=os.path.isdir(target)))
            self._leave("rename", number)

    def remove(self, path: str) -> None:
        path = os.path.abspath(path)
        with self._lock:
            number, _ = self._enter("remove", path)
            with open(path, "rb") as handle:
                old = handle.read()
            super().remove(path)
            self._synced_file(path)   # its pages go with it; the entry is what matters
            self._change(DirectoryChange("remove", path, old_bytes=old))
            self._leave("remove", number)

    def remove_tree(self, path: str) -> None:
        """Old snapshots: removed at once and treated as durable (see the module's limits),
        but under the lock, so a crash image never copies a half-removed tree."""
        with self._lock:
            super().remove_tree(path)

    def makedirs(self, path: str) -> None:
        path = os.path.abspath(path)
        with self._lock:
            number, _ = self._enter("makedirs", path)
            missing = []
            probe = path
            while not os.path.exists(probe):
                missing.append(probe)
                probe = os.path.dirname(probe)
            super().makedirs(path)
            for created in reversed(missing):
                self._change(DirectoryChange("create", created, is_dir=True))
            self._leave("makedirs", number)

    # -- what a power loss leaves -------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(unsynced pages, unsynced directory changes) right now."""
        with self._lock:
            return len(self._dirty_order), len(self._changes)

    def crash_image(self, target_dir: str | os.PathLike[str], *, tear_last_page: bool = True,
                    seed: int | None = None, keep_pages: str = "none",
                    keep_changes: str = "none") -> ImageInfo:
        """Copy the store to `target_dir` as a power loss right now could leave it.

        keep_pages: "none" (every unsynced page reverts), "random" (each survives
        with probability 1/2) or "prefix" (the first k in write order survive).
        tear_last_page: the most recently written unsynced page that did not
        survive gets a random prefix of its new 512-byte sectors.
        keep_changes: "none" (every unsynced directory change is undone) or
        "prefix" (the first k survive, in order, without the file data).
        """
        rng = random.Random(seed)
        target = os.path.abspath(os.fspath(target_dir))
        with self._lock:
            if os.path.isdir(self.root):
                shutil.copytree(self.root, target, symlinks=True)
            else:
                os.makedirs(target)   # the store's directory was not created yet
            order = list(self._dirty_order)
            if keep_pages == "random":
                kept = {key for key in order if rng.random() < 0.5}
            elif keep_pages == "prefix":
                kept = set(order[: rng.randint(0, len(order))])
            else:
                kept = set()
            torn_key = None
            if tear_last_page:
                dropped = [key for key in order if key not in kept]
                if self._last_page in dropped:
                    torn_key = self._last_page
                elif dropped:
                    torn_key = dropped[-1]
            torn = None
            for path, page in order:
                if (path, page) in kept:
                    continue
                image_path = self._image_path(target, path)
                if not os.path.exists(image_path):
                    continue
                # Restore no further than the file reached at its last sync (pages are
                # zero-padded; a size change is undone below, with the directory changes).
                synced_size = max([os.path.getsize(image_path)] + [
                    c.old_size for c in self._changes if c.kind == "resize" and c.path == path])
                old = self._dirty[path][page][: max(0, synced_size - page * PAGE)]
                with open(image_path, "r+b") as handle:
                    if (path, page) == torn_key:
                        handle.seek(page * PAGE)
                        new = handle.read(len(old))
                        sectors = rng.randint(1, PAGE // SECTOR - 1)
                        old = new[: sectors * SECTOR] + old[sectors * SECTOR:]
                        torn = f"{os.path.relpath(path, self.root)} page {page} ({sectors} sectors new)"
                    handle.seek(page * PAGE)
                    handle.write(old)
            changes = list(self._changes)
            keep = rng.randint(0, len(changes)) if keep_changes == "prefix" else 0
            for change in reversed(changes[keep:]):
                self._undo(target, change)
            undone = [f"{c.kind} {os.path.relpath(c.path, self.root)}" for c in changes[keep:]]
            return ImageInfo(seed, len(order), len(kept), torn, len(changes), keep, undone)

    def _image_path(self, target: str, path: str) -> str:
        return os.path.join(target, os.path.relpath(path, self.root))

    def _undo(self, target: str, change: DirectoryChange) -> None:
        path = self._image_path(target, change.path)
        if change.kind == "create":
            _delete(path)
        elif change.kind == "resize":
            if os.path.isfile(path):
                os.truncate(path, change.old_size)
        elif change.kind == "remove":
            if change.old_bytes is not None and os.path.isdir(os.path.dirname(path)):
                with open(path, "wb") as handle:
                    handle.write(change.old_bytes)
        elif change.kind == "rename":
            assert change.source is not None
            source = self._image_path(target, change.source)
            if os.path.lexists(path) and os.path.isdir(os.path.dirname(source)):
                _delete(source)
                os.rename(path, source)
            if change.old_bytes is not None:
                with open(path, "wb") as handle:
                    handle.write(change.old_bytes)


def _delete(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class NoSyncFiles(FileLayer):
    """The real file layer without fsync: for tests that check logic, not durability.

    A snapshot costs tens of fsyncs; where no power is lost, skipping them
    changes nothing the test can observe and saves most of its time.
    """

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: str) -> None:
        pass
