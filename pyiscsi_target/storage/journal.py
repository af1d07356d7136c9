"""A write journal: every write appended sequentially and made durable before
it is acknowledged, then applied lazily to the (slow) image by the cache.

Why: a random 4 KiB write to an HDD costs a seek (~150 per second); appended
to a journal on a fast or even the same disk it costs a share of one
sequential write and one ``fdatasync`` for *every* write that arrived
meanwhile (group commit).  With the journal, WCE=0 is reported truthfully.

Layout (all integers big-endian)::

    0     header slot A (4 KiB)   \\  written alternately; the valid one with
    4096  header slot B (4 KiB)   /   the highest counter wins (no torn header)
    8192  circular record area of ``capacity`` bytes

Positions are *logical* byte offsets that only grow; the physical place is
``8192 + pos % capacity`` and a record may wrap around the end.  A record:

    "PIJR", kind (1 write, 2 discard, 3 write zeroes), generation, its own
    logical position, image offset, length, CRC32C of header and data; then
    ``length`` bytes of data for a write.

A record is valid only if magic, generation, position and CRC all match, so
stale records from an earlier lap or an earlier run (other generation) and
torn writes end the replay.  The header holds the *tail*: every record before
it is on the image and was fdatasync-ed there.  At open, records from the
tail on are applied to the image, the image is fdatasync-ed, and a new
generation starts with an empty journal.

Space: the cache moves the tail (``set_tail``) after writing pages out and
fdatasync-ing the image; writers wait in ``reserve`` while the journal is full.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections.abc import Callable
import crc32c as _crc32c

from .base import Backend, StorageError
from .portable import fdatasync as _fdatasync, pread as _pread, pwrite as _pwrite

_HAVE_PWRITEV = hasattr(os, "pwritev")  # not on Windows

__all__ = ["Journal", "JournalError", "RECORD_HEADER"]

log = logging.getLogger(__name__)

SLOT = 4096
DATA_START = 2 * SLOT
_HDR = struct.Struct(">8sIQQQQQI")  # magic, version, counter, gen, tail, capacity, image size, crc
_HDR_MAGIC = b"PYIJRNL1"
_VERSION = 1
_REC = struct.Struct(">4sB3xQQQQI4x")  # magic, kind, gen, pos, offset, length, crc
RECORD_HEADER = _REC.size  # 48
_REC_MAGIC = b"PIJR"
WRITE, DISCARD, ZEROES = 1, 2, 3
#: Room kept free so a discard (header only) can always be appended after
#: its reserve() without waiting under the cache's write-out lock.
SLACK = 64 * RECORD_HEADER
#: Records per pwritev in one group commit (IOV_MAX is 1024; each record
#: may take three buffers when it wraps).
MAX_IOV = 300


class JournalError(StorageError):
    pass


def _crc(header: bytes, data: memoryview | bytes | None) -> int:
    c = _crc32c.crc32c(header)
    if data is not None and len(data):
        c = _crc32c.crc32c(data, c)
    return c


class Journal:
    """See the module doc.  Create with :meth:`open` (blocking), then
    ``await replay(image)`` before the first write."""

    def __init__(self, path: str, fd: int, capacity: int, image_size: int, gen: int, tail: int, counter: int) -> None:
        self.path = path
        self._fd = fd
        self.capacity = capacity
        self.image_size = image_size
        self.gen = gen
        self.tail = tail  # persisted tail (logical)
        self.head = tail  # next record goes here
        self._counter = counter
        self._queue: list[tuple[int, int, int, int, memoryview | None, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._last: asyncio.Future[None] | None = None
        self._room = asyncio.Event()
        self._pins: dict[int, int] = {}
        self._closed = False
        self.on_full: Callable[[], None] = lambda: None  # the cache kicks its flusher
        self.stats = {"records": 0, "commits": 0, "bytes": 0}

    # -- open / replay ----------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int, image_size: int) -> "Journal":
        """Open or create the journal file (blocking: call in a thread)."""
        p = str(path)
        if size < DATA_START + (1 << 20):
            raise JournalError(errno.EINVAL, f"{p}: journal size {size} is too small")
        try:
            parent = os.path.dirname(os.path.abspath(p))
            os.makedirs(parent, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as e:
            raise JournalError(e.errno or errno.EIO, f"cannot open journal {p}: {e.strerror}") from e
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalError(errno.EBUSY, f"{p}: journal is in use by another process") from None
            except (ImportError, OSError):  # pragma: no cover - no flock
                pass
            st = os.fstat(fd)
            best = None
            if st.st_size >= DATA_START:
                for slot in (0, 1):
                    raw = _pread(fd, _HDR.size, slot * SLOT)
                    if len(raw) < _HDR.size:
                        continue
                    magic, ver, counter, gen, tail, cap, isize, crc = _HDR.unpack(raw)
                    if magic != _HDR_MAGIC or _crc32c.crc32c(raw[:-4]) != crc:
                        continue
                    if ver != _VERSION:
                        raise JournalError(errno.EINVAL, f"{p}: journal format {ver} is not supported")
                    if best is None or counter > best[0]:
                        best = (counter, gen, tail, cap, isize)
                if best is None and any(_pread(fd, DATA_START, 0)):
                    raise JournalError(
                        errno.EINVAL, f"{p}: exists but is not a pyiscsi-target journal (no valid header); refusing to use it"
                    )
            if best is None:
                capacity = size - DATA_START
                os.ftruncate(fd, size)
                j = cls(p, fd, capacity, image_size, gen=1, tail=0, counter=0)
                j._write_header_sync()
                _fsync_dir(parent)
                log.info("%s: created journal (%d MiB)", p, size >> 20)
                return j
            counter, gen, tail, cap, isize = best
            if isize != image_size:
                raise JournalError(
                    errno.EINVAL,
                    f"{p}: journal belongs to an image of {isize} bytes, not {image_size}; "
                    "is it the journal of another LUN?",
                )
            j = cls(p, fd, cap, image_size, gen=gen, tail=tail, counter=counter)
            j._new_capacity = size - DATA_START
            return j
        except BaseException:
            os.close(fd)
            raise

    _new_capacity: int | None = None

    def _read_at(self, pos: int, n: int) -> bytes:
        """Read n bytes at logical ``pos`` (wrapping)."""
        out = bytearray()
        while n:
            phys = pos % self.capacity
            k = min(n, self.capacity - phys)
            chunk = _pread(self._fd, k, DATA_START + phys)
            if len(chunk) < k:
                chunk += bytes(k - len(chunk))  # never written: zeros, invalid record
            out += chunk
            pos += k
            n -= k
        return bytes(out)

    def _records(self):
        """Valid records from the tail on: (pos, kind, offset, length, data)."""
        pos = self.tail
        while True:
            raw = self._read_at(pos, RECORD_HEADER)
            magic, kind, gen, rpos, offset, length, crc = _REC.unpack(raw)
            if magic != _REC_MAGIC or gen != self.gen or rpos != pos or kind not in (WRITE, DISCARD, ZEROES):
                return
            if offset + length > self.image_size:
                return
            dlen = length if kind == WRITE else 0
            if dlen > self.capacity - RECORD_HEADER:
                return
            data = self._read_at(pos + RECORD_HEADER, dlen) if dlen else b""
            if _crc(_REC.pack(_REC_MAGIC, kind, gen, rpos, offset, length, 0), data) != crc:
                return
            yield pos, kind, offset, length, data
            pos += RECORD_HEADER + dlen

    async def replay(self, image: Backend) -> tuple[int, int]:
        """Apply every valid record to ``image``, fdatasync it, start a new
        generation.  Returns (records, bytes) applied."""
        n = nbytes = 0
        it = self._records()
        end = self.tail
        while True:
            rec = await asyncio.to_thread(next, it, None)
            if rec is None:
                break
            pos, kind, offset, length, data = rec
            if kind == WRITE:
                await image.write(offset, data)
                nbytes += length
            elif kind == DISCARD:
                await image.discard(offset, length)
            else:
                await image.write_zeroes(offset, length)
            n += 1
            end = pos + RECORD_HEADER + (length if kind == WRITE else 0)
        if n:
            await image.flush()
            log.warning("%s: replayed %d journal records (%d bytes of writes) onto the image", self.path, n, nbytes)
        # New generation, empty: records of the old one can never be mistaken
        # for new ones, whatever is left in the file.
        self.gen += 1
        self.tail = self.head = end
        if self._new_capacity is not None and self._new_capacity != self.capacity:
            self.capacity = self._new_capacity
            self.tail = self.head = 0
            await asyncio.to_thread(os.ftruncate, self._fd, DATA_START + self.capacity)
        await asyncio.to_thread(self._write_header_sync)
        return n, nbytes

    def _write_header_sync(self, tail: int | None = None) -> None:
        self._counter += 1
        tail = self.tail if tail is None else tail
        body = _HDR.pack(_HDR_MAGIC, _VERSION, self._counter, self.gen, tail, self.capacity, self.image_size, 0)
        raw = body[:-4] + struct.pack(">I", _crc32c.crc32c(body[:-4]))
        _pwrite(self._fd, raw, (self._counter % 2) * SLOT)
        _fdatasync(self._fd)

    # -- appending ------------------------------------------------------------------

    def used(self) -> int:
        return self.head - self.tail

    def needs_room(self) -> bool:
        return self.head - self.tail > self.capacity // 2

    async def reserve(self, length: int) -> None:
        """Wait until a record with ``length`` bytes of data fits."""
        need = RECORD_HEADER + length
        if need > self.capacity - SLACK:
            raise JournalError(errno.EFBIG, f"{self.path}: a {length}-byte write does not fit the journal")
        while self.head + need - self.tail > self.capacity - SLACK:
            if self._closed:
                raise JournalError(errno.EBADF, f"{self.path}: journal is closed")
            self._room.clear()
            self.on_full()
            await self._room.wait()

    def _append(self, kind: int, offset: int, length: int, data: memoryview | None) -> tuple[int, asyncio.Future[None]]:
        if self._closed:
            raise JournalError(errno.EBADF, f"{self.path}: journal is closed")
        pos = self.head
        self.head += RECORD_HEADER + (len(data) if data is not None else 0)
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((pos, kind, offset, length, data, fut))
        self._last = fut
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())
        return pos, fut

    def append_write(self, offset: int, data: memoryview) -> tuple[int, asyncio.Future[None]]:
        """Queue a write record; the future completes once it is durable.
        Call right after ``reserve`` with no await in between."""
        return self._append(WRITE, offset, len(data), data)

    def append_discard(self, offset: int, length: int, *, zero: bool = False) -> tuple[int, asyncio.Future[None]]:
        return self._append(ZEROES if zero else DISCARD, offset, length, None)

    async def _commit_loop(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await asyncio.to_thread(self._commit_sync, batch)
                except BaseException as e:  # noqa: BLE001 - every waiter learns of it
                    err = e if isinstance(e, OSError) else JournalError(errno.EIO, str(e))
                    if isinstance(err, OSError) and not isinstance(err, StorageError):
                        err = JournalError(err.errno or errno.EIO, f"{self.path}: journal write failed: {err}")
                    log.error("%s: journal commit failed: %s", self.path, err)
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                            fut.exception()  # a cancelled writer must not leave it "never retrieved"
                    if not isinstance(e, Exception):
                        raise
                    continue
                self.stats["commits"] += 1
                self.stats["records"] += len(batch)
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._committer = None

    def _commit_sync(self, batch) -> None:
        """Runs in a worker thread: one pwritev per run of records, one fdatasync."""
        bufs: list[memoryview | bytes] = []
        start = batch[0][0]
        phys_start = start % self.capacity
        room = self.capacity - phys_start  # bytes until the wrap point
        written = 0
        pending = 0

        def put(b: memoryview | bytes) -> None:
            nonlocal room, written, phys_start, pending
            b = memoryview(b)
            while len(b):
                if room == 0:
                    self._pwritev(bufs, phys_start)
                    bufs.clear()
                    phys_start, room, pending = 0, self.capacity, 0
                k = min(len(b), room)
                bufs.append(b[:k])
                b = b[k:]
                room -= k
                written += k
                pending += 1
                if pending >= MAX_IOV:
                    self._pwritev(bufs, phys_start)
                    phys_start = (phys_start + sum(len(x) for x in bufs)) % self.capacity
                    bufs.clear()
                    pending = 0

        for pos, kind, offset, length, data, _ in batch:
            hdr0 = _REC.pack(_REC_MAGIC, kind, self.gen, pos, offset, length, 0)
            crc = _crc(hdr0, data)
            put(_REC.pack(_REC_MAGIC, kind, self.gen, pos, offset, length, crc))
            if data is not None and len(data):
                put(data)
        if bufs:
            self._pwritev(bufs, phys_start)
        _fdatasync(self._fd)
        self.stats["bytes"] += written

    def _pwritev(self, bufs: list, phys: int) -> None:
        off = DATA_START + phys
        bufs = list(bufs)
        while bufs:
            if _HAVE_PWRITEV:
                n = os.pwritev(self._fd, bufs, off)
            else:  # Windows: one buffer at a time
                n = _pwrite(self._fd, bufs[0], off)
            off += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if n:
                bufs[0] = bufs[0][n:]

    async def sync(self) -> None:
        """Wait until every record queued so far is durable."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.shield(last)
        elif last is not None and last.exception() is not None:
            pass  # its writer was told; SYNCHRONIZE CACHE is about acknowledged writes

    # -- space -------------------------------------------------------------------------

    def pin(self, pos: int) -> None:
        """Keep the tail at or before ``pos`` until unpinned (a discard whose
        effect on the image is not done yet)."""
        self._pins[pos] = self._pins.get(pos, 0) + 1

    def unpin(self, pos: int) -> None:
        if self._pins[pos] == 1:
            del self._pins[pos]
        else:
            self._pins[pos] -= 1

    def oldest_pending(self) -> int:
        return min(self._pins, default=self.head)

    async def set_tail(self, pos: int) -> None:
        """Every record before ``pos`` is on the image, fdatasync-ed there."""
        if pos <= self.tail:
            return
        # The space before ``pos`` is reused only once the header says so:
        # until then a crash replays from the old tail, and those records
        # must still be there.
        await asyncio.to_thread(self._write_header_sync, pos)
        self.tail = max(self.tail, pos)
        self._room.set()

    async def checkpoint(self) -> None:
        """The image holds everything (the cache flushed it): empty journal."""
        await self.sync()
        await self.set_tail(self.head)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._room.set()
        if self._committer is not None:
            try:
                await self._committer
            except Exception:  # pragma: no cover - reported to writers already
                pass
        os.close(self._fd)
        self._fd = -1


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)

