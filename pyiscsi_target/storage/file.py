"""Image files (``.img``) and raw block devices as a :class:`~.base.Backend`.

Blocking system calls (``pread``/``pwrite``/``fdatasync``/``fallocate``) run in
one small thread pool shared by every image: they release the GIL, so the
event loop keeps serving the network while the disk works.

One exception, measured (Python 3.11, Linux 6.x, page-cache hit): a 4 KiB
``preadv`` costs ~2 us inline but ~50-80 us through ``run_in_executor``, and a
1 MiB one ~90 us inline against ~180-250 us via the pool.  So reads first try
``preadv(..., RWF_NOWAIT)`` on the event loop: the kernel serves what is already
in the page cache and returns ``EAGAIN`` (or a short count) instead of waiting
for the disk; only the uncached remainder goes to the pool.  The loop never
waits for a disk.  Buffered writes with ``RWF_NOWAIT`` are refused by most
kernels/filesystems (EOPNOTSUPP), so writes always use the pool.

Write cache: data written with ``pwrite`` sits in the page cache and is lost
on a power failure until ``fdatasync``.  That *is* a volatile write cache, so
``write_cache = True``: the SCSI core reports WCE=1 and honours FUA and
SYNCHRONIZE CACHE by calling ``write(fua=True)`` / ``flush()``, which reach
stable storage (``RWF_DSYNC`` or ``fdatasync``).  Claiming WCE=0 while
acknowledging page-cache writes would lie to cluster software.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import sys
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from ..payload import PENDING, FileRegion, settle_pending
from .base import StorageError
from .portable import fdatasync as _fdatasync, pread as _pread, pwrite as _pwrite

__all__ = ["FileBackend", "open_image", "create_image", "set_io_threads"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Shared I/O thread pool
# ---------------------------------------------------------------------------

_DEFAULT_IO_THREADS = 8
_io_threads = _DEFAULT_IO_THREADS
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def set_io_threads(n: int) -> None:
    """Set the size of the shared I/O pool (before the first I/O)."""
    global _io_threads
    if n < 1:
        raise ValueError("need at least one I/O thread")
    _io_threads = n


def _get_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    ex = _executor
    if ex is None:
        with _executor_lock:
            if _executor is None:
                _executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_io_threads, thread_name_prefix="pyiscsi-io"
                )
            ex = _executor
    return ex


# ---------------------------------------------------------------------------
# fallocate(2) through ctypes (os has posix_fallocate only)
# ---------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _fallocate.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _fallocate = None


def _fallocate_mode(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raise OSError (EOPNOTSUPP when unavailable)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
_HAVE_PREADV = hasattr(os, "preadv")
_HAVE_PWRITEV = hasattr(os, "pwritev")
_ZERO_CHUNK = bytes(1 << 20)
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)

# Reads up to this size may be served inline from the page cache (RWF_NOWAIT).
INLINE_READ_MAX = 1 << 20
#: READs at least this large from an image in memory are sent with sendfile
#: (payload.FileRegion); smaller ones are cheaper batched in one writev.
ZERO_COPY_MIN = 64 * 1024


def _storage_error(exc: OSError, what: str, path: str) -> StorageError:
    return StorageError(exc.errno or errno.EIO, f"{what} {path}: {exc.strerror or exc}")


def _write_zeros(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = _pwrite(fd, memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), end - offset)], offset)
        if n <= 0:  # pragma: no cover - pwrite never returns 0 for a regular file
            raise OSError(errno.EIO, "pwrite wrote nothing")
        offset += n


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate blocks for a range: posix_fallocate, else write zeros."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
        return
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in _NOT_SUPPORTED:
            raise
    _write_zeros(fd, offset, length)


def _fmt_size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def _on_memory_fs(path: str) -> bool:
    """True when ``path`` lives on tmpfs/ramfs: its I/O is a memory copy that
    never waits for a disk, so doing it on the event loop beats a thread
    handoff (tmpfs does not support RWF_NOWAIT, which would tell us so)."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, right.split()[0]
        return fstype in _MEMORY_FILESYSTEMS
    except (OSError, IndexError):
        return False


class FileBackend:
    """A LUN stored in a regular file or on a block device."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fd: int,
        size: int,
        *,
        thin: bool,
        block_device: bool,
        read_only: bool,
        preallocated: bool = False,
    ) -> None:
        self.path = str(path)
        self._fd = fd
        self.size = size
        self.thin = thin
        self.write_cache = True  # page cache is volatile until fdatasync; see module doc
        self.block_device = block_device
        self.read_only = read_only
        self.preallocated = preallocated
        self._closing = False
        self._pending: set[concurrent.futures.Future] = set()
        self._nowait_read = bool(_RWF_NOWAIT) and _HAVE_PREADV
        self._dsync_write = bool(_RWF_DSYNC) and _HAVE_PWRITEV
        self._in_memory = not block_device and _HAVE_PREADV and _on_memory_fs(self.path)
        if not self._in_memory:
            # sendfile could block the loop on a page-cache miss: READs here
            # always read their bytes (and don't even ask, see LogicalUnit).
            self.read_for_transfer = None

    # -- construction -------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        create: bool = False,
        preallocate: bool = False,
        block_size: int = 512,
        read_only: bool = False,
    ) -> "FileBackend":
        """Open (and, with ``create``, create) an image or a block device.

        Rules, chosen to never destroy data:

        * missing file: created (``create`` and ``size`` needed), sparse unless
          ``preallocate``;
        * existing file, ``size`` None: the file's size is used;
        * existing file smaller than ``size``: extended (sparse, or allocated
          with ``preallocate``) and logged; read-only images are not extended;
        * existing file larger than ``size``: error -- never shrink;
        * block device: its size; a different ``size`` is an error.

        This call blocks (preallocating may take long); from asyncio use
        ``await asyncio.to_thread(FileBackend.open, ...)``.
        """
        p = str(path)
        if block_size not in (512, 4096):
            raise ValueError(f"block_size must be 512 or 4096, not {block_size}")
        if size is not None and (size <= 0 or size % block_size):
            raise StorageError(
                errno.EINVAL, f"{p}: size {size} is not a positive multiple of the block size {block_size}"
            )
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            if stat.S_ISBLK(os.stat(p).st_mode):
                # O_EXCL on a block device = exclusive open: fails with EBUSY
                # while it is mounted or held by another exclusive opener.
                flags |= os.O_EXCL
        except OSError:
            pass
        created = False
        try:
            try:
                fd = os.open(p, flags)
            except FileNotFoundError:
                if not create:
                    raise StorageError(errno.ENOENT, f"{p}: image does not exist (and creating it was not asked)")
                if read_only:
                    raise StorageError(errno.ENOENT, f"{p}: image does not exist and the LUN is read-only")
                if size is None:
                    raise StorageError(errno.ENOENT, f"{p}: image does not exist; a size is needed to create it")
                parent = os.path.dirname(os.path.abspath(p))
                if not os.path.isdir(parent):
                    os.makedirs(parent, exist_ok=True)
                    log.info("%s: created directory", parent)
                fd = os.open(p, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
        except StorageError:
            raise
        except OSError as e:
            raise _storage_error(e, "cannot open", p) from e

        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                dev_size = os.lseek(fd, 0, os.SEEK_END)
                if size is not None and size != dev_size:
                    raise StorageError(
                        errno.EINVAL,
                        f"{p}: block device holds {dev_size} bytes, not the configured {size}",
                    )
                usable = dev_size - dev_size % block_size
                if usable != dev_size:
                    log.warning("%s: %d trailing bytes beyond the last whole block are unused", p, dev_size - usable)
                if usable == 0:
                    raise StorageError(errno.EINVAL, f"{p}: block device is smaller than one block")
                # Discard on block devices (BLKDISCARD) is not wired up: not thin.
                return cls(p, fd, usable, thin=False, block_device=True, read_only=read_only)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(errno.EINVAL, f"{p}: neither a regular file nor a block device")

            _lock_image(fd, p, read_only)
            cur = st.st_size
            if created:
                assert size is not None
                if preallocate:
                    _preallocate(fd, 0, size)
                os.ftruncate(fd, size)
                os.fsync(fd)
                _fsync_dir(os.path.dirname(os.path.abspath(p)))
                log.info("%s: created %s image (%s)", p, "preallocated" if preallocate else "sparse", _fmt_size(size))
                final = size
            elif size is None:
                if cur == 0 or cur % block_size:
                    raise StorageError(
                        errno.EINVAL,
                        f"{p}: image size {cur} is not a positive multiple of the block size {block_size}",
                    )
                final = cur
            elif cur > size:
                raise StorageError(
                    errno.EINVAL,
                    f"{p}: image holds {cur} bytes ({_fmt_size(cur)}), more than the configured size "
                    f"{size} ({_fmt_size(size)}); refusing to shrink it - remove 'size' or set it to {_fmt_size(cur)}",
                )
            elif cur < size:
                if read_only:
                    raise StorageError(
                        errno.EROFS,
                        f"{p}: image holds {cur} bytes, less than the configured size {size}, "
                        "and the LUN is read-only so it cannot be extended",
                    )
                if preallocate:
                    _preallocate(fd, cur, size - cur)
                os.ftruncate(fd, size)
                os.fsync(fd)
                log.warning("%s: extended image from %d to %d bytes (%s)", p, cur, size, _fmt_size(size))
                final = size
            else:
                final = size
            thin = (not preallocate) and (not read_only) and _probe_punch_hole(fd, final)
            return cls(p, fd, final, thin=thin, block_device=False, read_only=read_only, preallocated=preallocate)
        except BaseException as e:
            os.close(fd)
            if created:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if isinstance(e, OSError) and not isinstance(e, StorageError):
                raise _storage_error(e, "cannot set up image", p) from e
            raise

    def set_write_cache(self, enabled: bool) -> None:
        """MODE SELECT caching page, WCE bit: with the cache off every write is
        made durable before it completes (as if FUA).  Not saved: every open
        starts with the write cache on.  The caller flushes before disabling."""
        self.write_cache = bool(enabled)

    # -- plumbing -----------------------------------------------------------

    def _check(self, offset: int, length: int, writing: bool) -> int:
        if self._closing or self._fd < 0:
            raise StorageError(errno.EBADF, f"{self.path}: image is closed")
        if writing and self.read_only:
            raise StorageError(errno.EROFS, f"{self.path}: image is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(
                errno.EINVAL, f"{self.path}: range {offset}+{length} outside the image (size {self.size})"
            )
        return self._fd

    def _job_done(self, fut: concurrent.futures.Future) -> None:
        self._pending.discard(fut)

    async def _run(self, what: str, fn, *args):
        """Run ``fn(*args)`` in the shared pool; OSError -> StorageError."""
        fut = _get_executor().submit(fn, *args)
        self._pending.add(fut)
        fut.add_done_callback(self._job_done)
        wrapped = asyncio.wrap_future(fut)
        try:
            return await asyncio.shield(wrapped)
        except asyncio.CancelledError:
            # An aborted command (ABORT TASK, LUN RESET, PREEMPT AND ABORT)
            # may end only once it can no longer change the image (SAM-5
            # §7.2): a job not started yet never runs, one already in a
            # system call is waited for -- else a preempted cluster node's
            # write could land after the preemptor was told it is fenced.
            if not fut.cancel():
                await asyncio.wait([wrapped])
            raise
        except StorageError:
            raise
        except OSError as e:
            raise _storage_error(e, what, self.path) from e

    # -- Backend API ----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        buf = self.read_now(offset, length)
        if buf is not None:
            return buf
        # Not in the page cache (or too large to read on the loop): the pool.
        fd = self._check(offset, length, False)
        buf = bytearray(length)
        await self._run("cannot read", self._read_sync, fd, buf, offset, 0)
        return buf

    def read_now(self, offset: int, length: int) -> bytearray | None:
        """The bytes, read without waiting, or None when that could block the
        event loop (a page-cache miss, a read above INLINE_READ_MAX): then
        :meth:`read` gets them from the pool.  Images in memory are always
        read here; others with RWF_NOWAIT, which fails instead of waiting for
        the disk.  A plain call, not a coroutine: the SCSI core's quick lane
        (scsi/target.py) asks it first."""
        fd = self._check(offset, length, False)
        if length > INLINE_READ_MAX:
            return None
        buf = bytearray(length)
        if length == 0:
            return buf
        if self._in_memory:
            try:
                # One preadv into the new buffer; _read_sync finishes a short read.
                done = os.preadv(fd, [buf], offset)
                if done != length:
                    self._read_sync(fd, buf, offset, done)
            except OSError as e:
                raise _storage_error(e, "cannot read", self.path) from e
            return buf
        if not self._nowait_read:
            return None
        try:
            done = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in _NOT_SUPPORTED:
                self._nowait_read = False
                return None
            raise _storage_error(e, "cannot read", self.path) from e
        # Short (part of the range not cached) or a real end of file: the pool
        # reads it all again and reports a truncated image.
        return buf if done == length else None

    def read_for_transfer(self, offset: int, length: int) -> FileRegion | None:
        """What a READ sends to the initiator, when it need not be read now: for
        a large read of an image in memory, a FileRegion the server sends with
        sendfile (no copy through Python).  None: use :meth:`read`.  Not a
        coroutine, so the usual small READ pays one plain call for asking;
        images not in memory have none (set to None in __init__)."""
        if ZERO_COPY_MIN <= length <= INLINE_READ_MAX:
            return FileRegion(self._check(offset, length, False), offset, length)
        return None

    def _read_sync(self, fd: int, buf: bytearray, offset: int, done: int) -> None:
        mv = memoryview(buf)
        length = len(buf)
        while done < length:
            if _HAVE_PREADV:
                n = os.preadv(fd, [mv[done:]], offset + done)
            else:  # pragma: no cover - Windows / old platforms
                chunk = _pread(fd, length - done, offset + done)
                n = len(chunk)
                mv[done : done + n] = chunk
            if n == 0:
                raise StorageError(
                    errno.EIO, f"{self.path}: unexpected end of image at {offset + done} (was it truncated?)"
                )
            done += n

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        fd = self._check(offset, mv.nbytes, True)
        if PENDING:
            settle_pending()  # READs that completed before this write keep their bytes
        if mv.nbytes == 0:
            if fua or not self.write_cache:
                await self.flush()
            return
        if self._in_memory and mv.nbytes <= INLINE_READ_MAX:
            # tmpfs: a memory copy, and fdatasync is a no-op there.
            try:
                self._write_sync(fd, mv, offset, fua or not self.write_cache)
            except OSError as e:
                raise _storage_error(e, "cannot write", self.path) from e
            return
        await self._run("cannot write", self._write_sync, fd, mv, offset, fua or not self.write_cache)

    def _write_sync(self, fd: int, mv: memoryview, offset: int, fua: bool) -> None:
        done = 0
        length = mv.nbytes
        dsync = fua and self._dsync_write
        while done < length:
            if dsync:
                try:
                    n = os.pwritev(fd, [mv[done:]], offset + done, _RWF_DSYNC)
                except OSError as e:
                    if e.errno not in _NOT_SUPPORTED:
                        raise
                    self._dsync_write = dsync = False
                    continue
            else:
                n = _pwrite(fd, mv[done:], offset + done)
            if n <= 0:  # pragma: no cover
                raise OSError(errno.EIO, "pwrite wrote nothing")
            done += n
        if fua and not dsync:
            _fdatasync(fd)

    async def writev(self, offset: int, buffers: list[memoryview]) -> None:
        """One ``pwritev`` of several buffers at ``offset`` (the cache merges
        adjacent dirty pages into one call instead of one per page)."""
        total = sum(len(b) for b in buffers)
        fd = self._check(offset, total, True)
        if total:
            await self._run("cannot write", self._writev_sync, fd, list(buffers), offset)

    @staticmethod
    def _writev_sync(fd: int, bufs: list[memoryview], offset: int) -> None:
        while bufs:
            if _HAVE_PWRITEV:
                n = os.pwritev(fd, bufs, offset)
            else:  # pragma: no cover - Windows
                n = _pwrite(fd, bufs[0], offset)
            if n <= 0:  # pragma: no cover
                raise OSError(errno.EIO, "pwritev wrote nothing")
            offset += n
            while bufs and n >= len(bufs[0]):  # short write: drop what went out
                n -= len(bufs[0])
                bufs.pop(0)
            if n:
                bufs[0] = bufs[0][n:]

    async def flush(self, offset: int = 0, length: int = 0) -> None:
        if self._closing or self._fd < 0:
            raise StorageError(errno.EBADF, f"{self.path}: image is closed")
        if self.read_only:
            return
        await self._run("cannot flush", _fdatasync, self._fd)

    async def discard(self, offset: int, length: int) -> None:
        fd = self._check(offset, length, True)
        if PENDING:
            settle_pending()
        if length:
            await self._run("cannot discard", self._discard_sync, fd, offset, length)

    def _discard_sync(self, fd: int, offset: int, length: int) -> None:
        if self.thin:
            try:
                _fallocate_mode(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                log.warning("%s: punching holes failed (%s); no longer thin", self.path, e.strerror)
                self.thin = False
        self._zero_range_sync(fd, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        # Thin images deallocate (a punched hole reads as zeros); preallocated
        # images and block devices keep their blocks allocated.
        await self.discard(offset, length)

    def _zero_range_sync(self, fd: int, offset: int, length: int) -> None:
        if not self.block_device:
            try:
                _fallocate_mode(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
        _write_zeros(fd, offset, length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        fd = self._check(offset, length, False)
        if length == 0:
            return []
        if self.block_device or not hasattr(os, "SEEK_DATA"):
            return [(offset, length, True)]
        return await self._run("cannot map", self._allocation_sync, fd, offset, length)

    def _allocation_sync(self, fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = offset + length
        out: list[tuple[int, int, bool]] = []

        def add(start: int, stop: int, allocated: bool) -> None:
            if stop <= start:
                return
            if out and out[-1][2] == allocated and out[-1][0] + out[-1][1] == start:
                s, n, a = out[-1]
                out[-1] = (s, n + stop - start, a)
            else:
                out.append((start, stop - start, allocated))

        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data at or after pos
                    raise
                data = end
            if data > pos:
                add(pos, min(data, end), False)
                pos = min(data, end)
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole <= pos:  # pragma: no cover - defensive, filesystem bug
                hole = end
            add(pos, min(hole, end), True)
            pos = min(hole, end)
        return out

    async def close(self) -> None:
        if self._fd < 0 or self._closing:
            return
        self._closing = True
        try:
            # Never close the descriptor under a worker still using it.
            while self._pending:
                await asyncio.wait([asyncio.wrap_future(f) for f in list(self._pending)])
            if not self.read_only:
                await asyncio.wrap_future(_get_executor().submit(_fdatasync, self._fd))
        except OSError as e:
            raise _storage_error(e, "cannot flush", self.path) from e
        finally:
            if PENDING:
                settle_pending()  # nothing may read this descriptor after it closes
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        kind = "blockdev" if self.block_device else ("thin" if self.thin else "thick")
        return f"<FileBackend {self.path} {self.size} bytes {kind}{' ro' if self.read_only else ''}>"


def _lock_image(fd: int, path: str, read_only: bool) -> None:
    """Two servers (or two LUNs) writing one image corrupt it: take a
    whole-file lock, exclusive for read-write, shared for read-only."""
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StorageError(errno.EBUSY, f"{path}: image is in use (locked by another process or LUN)") from None
    except OSError as e:
        if e.errno not in _NOT_SUPPORTED + (errno.ENOLCK,):
            raise


def _probe_punch_hole(fd: int, size: int) -> bool:
    """Can holes be punched in this file?  Tries one beyond the end of data.

    With KEEP_SIZE, a hole past EOF touches no data (it may only drop blocks
    preallocated past EOF, which hold nothing), so the probe is harmless.
    """
    start = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
    try:
        _fallocate_mode(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, 4096)
    except OSError:
        return False
    return hasattr(os, "SEEK_DATA")


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def open_image(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    create: bool = False,
    preallocate: bool = False,
    block_size: int = 512,
    read_only: bool = False,
) -> FileBackend:
    """Open (or create) an image or block device; see :meth:`FileBackend.open`."""
    return FileBackend.open(
        path, size=size, create=create, preallocate=preallocate, block_size=block_size, read_only=read_only
    )


PREALLOCATE_CHUNK = 256 << 20


def create_image(
    path: str | os.PathLike[str], size: int, *, preallocate: bool = False, block_size: int = 512, force: bool = False,
    progress=None,
) -> None:
    """Create a new image file of ``size`` bytes (for ``pyiscsi-target create-lun``).

    Refuses to touch an existing file unless ``force``; with ``force`` the old
    file is replaced by a fresh one (its data is gone).
    """
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not force:
            raise FileExistsError(errno.EEXIST, f"{p} already exists (use --force to replace it)")
        if not p.is_file():
            raise StorageError(errno.EINVAL, f"{p}: not a regular file; refusing to replace it")
        p.unlink()
    # Preallocation goes in chunks so ``progress(done, total)`` can report it
    # (writing zeros where the filesystem cannot fallocate takes minutes).
    b = FileBackend.open(p, size=size, create=True, preallocate=preallocate and progress is None,
                         block_size=block_size)
    try:
        if preallocate and progress is not None:
            done = 0
            progress(0, size)
            while done < size:
                n = min(PREALLOCATE_CHUNK, size - done)
                _preallocate(b._fd, done, n)
                done += n
                progress(done, size)
            b.thin = False
            b.preallocated = True
    finally:
        os.close(b._fd)
        b._fd = -1
