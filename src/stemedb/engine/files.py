"""The file layer under the storage engine: every syscall that touches the disk.

Owns: opening, preallocating, writing, syncing, mapping, renaming and removing
files, and syncing directories. The engine calls nothing else for disk I/O, so
tests can substitute a layer that fails a chosen call or forgets data that was
not synced (tests/faults.py). Must never: decide policy (what to do after a
failure is the engine's business); it reports errors as OSError with errno.

Resource handling: callers own the descriptors they open and close them.
Error handling: OSError propagates unchanged; ENOSPC is turned into
StorageFull by the engine, EIO on sync into DurabilityError.
"""

from __future__ import annotations

import mmap
import os
import shutil


class FileLayer:
    """Real files, via os.* (each call releases the GIL while it waits)."""

    def open(self, path: str, *, create: bool = False) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        return os.open(path, flags, 0o644)

    def close(self, fd: int) -> None:
        os.close(fd)

    def preallocate(self, fd: int, length: int) -> None:
        """Reserve real blocks (never a sparse file): a later write cannot hit ENOSPC."""
        os.posix_fallocate(fd, 0, length)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def map(self, fd: int, length: int) -> mmap.mmap:
        """A read-only shared mapping: reads see every pwrite at once (one page cache)."""
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)

    def read(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def write_file(self, path: str, data: bytes) -> None:
        """Create (or replace) a small file and fsync it; the caller syncs the directory."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self.pwrite(fd, data, 0)
            self.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def remove(self, path: str) -> None:
        os.remove(path)

    def remove_tree(self, path: str) -> None:
        """Remove a directory and everything in it (old snapshots; no durability needed)."""
        shutil.rmtree(path, ignore_errors=True)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)
