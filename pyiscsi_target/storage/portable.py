"""Positional I/O and data sync everywhere Python runs.

``os.pread``, ``os.pwrite`` and ``os.fdatasync`` are POSIX-only (Windows has
none of them; macOS has no ``fdatasync``).  These wrappers use them when the
platform has them -- looked up on every call, so tests can still patch
``os`` -- and otherwise fall back to ``lseek`` + ``read``/``write`` under a
per-descriptor lock (the file offset is shared by all threads) and to
``fsync``.  The ``_HAVE_*`` flags exist to force the fallbacks in tests.
"""

from __future__ import annotations

import os
import threading

__all__ = ["pread", "pwrite", "fdatasync"]

_HAVE_PREAD = hasattr(os, "pread")
_HAVE_PWRITE = hasattr(os, "pwrite")
_HAVE_FDATASYNC = hasattr(os, "fdatasync")

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(fd: int) -> threading.Lock:
    with _locks_guard:
        lk = _locks.get(fd)
        if lk is None:
            lk = _locks[fd] = threading.Lock()
        return lk


def pread(fd: int, n: int, offset: int) -> bytes:
    if _HAVE_PREAD:
        return os.pread(fd, n, offset)
    with _lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def pwrite(fd: int, data, offset: int) -> int:
    if _HAVE_PWRITE:
        return os.pwrite(fd, data, offset)
    with _lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def fdatasync(fd: int) -> None:
    if _HAVE_FDATASYNC:
        os.fdatasync(fd)
    else:
        os.fsync(fd)  # Windows: FlushFileBuffers; macOS: fsync
