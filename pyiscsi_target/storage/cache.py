"""A write-back / write-through cache in front of a slow image.

:class:`CachedBackend` is itself a :class:`~.base.Backend` wrapping another
one, so the SCSI core needs no knowledge of it: it reports WCE from
``write_cache``, switches it with ``set_write_cache`` (MODE SELECT), sends
SYNCHRONIZE CACHE to ``flush`` and FUA as ``write(fua=True)``.

Data lives in 4 KiB pages with one valid and one dirty bit per 512-byte
sector, so a 512-byte write needs no read-modify-write of the slow disk.
Every page costs ``PAGE_COST`` bytes of the shared :class:`CacheBudget`
(data plus Python object overhead, measured), so the budget bounds the memory
really used, not only the payload.

Modes:

``write-back``
    A WRITE completes once its data is in the cache (WCE=1).  Dirty pages are
    written out in the background, sorted by offset and merged into
    ``pwritev`` runs: oldest first once ``max_dirty_age`` passes, in elevator
    order under pressure.  When a LUN's dirty data reaches ``dirty_limit`` (or
    the shared budget is full of dirty pages) new writes wait: back-pressure,
    never growth.  FUA and SYNCHRONIZE CACHE write out the pages concerned and
    ``fdatasync`` before completing.
``write-through``
    Every write is on stable storage before it completes (WCE=0); the cache
    still serves reads.  MODE SELECT WCE=1/0 switches between the two at run
    time (Windows' "enable write caching on the device").
``journal`` (a :class:`~.journal.Journal` given)
    Write-back in memory, but every write is appended to a sequential journal
    and ``fdatasync``-ed (group commit) before it completes, so WCE=0 is
    reported truthfully while random writes run at the journal's sequential
    speed.  The image is updated lazily; the journal is replayed at start.

Coherence rules (why the code below looks the way it does):

* Only one write-out batch per LUN is in flight (``_wlock``).  FUA and flush
  write out through the same lock, so an older copy of a page can never land
  on the disk after a newer one.
* A page under write-out is copied on the next write to it (copy on write):
  the thread doing ``pwritev`` keeps reading a stable buffer, and the page
  stays dirty with the sequence number of that later write.
* Dirty pages are never evicted; clean ones are (LRU).  A read that had to go
  to the image only fills the cache if no page was evicted or discarded
  meanwhile (``_evict_seq``): otherwise it might cache data older than what
  the disk holds.
* Discard/write-zeroes hold ``_wlock``: cached sectors in the range are
  dropped first, so no write-out of older data can follow the discard.

Errors: a background write-out that fails is logged, its pages stay dirty
(retried with back-off) and the error is raised by the next ``flush`` --
SYNCHRONIZE CACHE then ends in MEDIUM ERROR / WRITE ERROR.  Never dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .base import Backend, StorageError

if TYPE_CHECKING:
    from .journal import Journal

__all__ = ["CacheBudget", "CachedBackend", "GroupSync", "PAGE", "PAGE_COST", "MODES"]

log = logging.getLogger(__name__)

PAGE = 4096
SECTOR = 512
SECTORS = PAGE // SECTOR
FULL = (1 << SECTORS) - 1
#: Bytes charged to the budget per cached page: 4096 of data, the bytearray
#: header (57), the _Page object with its slots (~88), its dict entry and an
#: LRU/dirty-order entry (~100); rounded up.
PAGE_COST = PAGE + 256
#: Pages written out per batch (8 MiB): bounds the copy-on-write overhead
#: and how long one batch holds ``_wlock`` against FUA/flush.
BATCH_PAGES = 2048
#: Concurrent pwritev calls of one batch: lets the kernel/disk reorder.
WRITE_DEPTH = 8
#: Start background write-out once dirty data passes this share of the limit,
#: so writers rarely see the limit itself.
PRESSURE = 0.5
#: Back-off after a failed background write-out (seconds, doubling).
RETRY_MIN, RETRY_MAX = 1.0, 30.0
#: Smallest budget: two write-out batches plus room to keep writing.
MIN_BUDGET = 16 << 20

MODES = ("write-back", "write-through", "none")

Buffer = bytes | bytearray | memoryview


def _mask(start: int, length: int) -> int:
    """Sector mask of bytes [start, start+length) within one page."""
    s = start // SECTOR
    return ((1 << (length // SECTOR)) - 1) << s


class _Page:
    __slots__ = ("data", "valid", "dirty", "busy", "seq", "since", "jpos", "redirty")

    def __init__(self) -> None:
        self.data = bytearray(PAGE)
        self.valid = 0
        self.dirty = 0
        self.busy = False  # under write-out: the next write copies ``data`` first
        self.seq = 0  # write sequence number that made it dirty (since last clean)
        self.since = 0.0  # monotonic time it became dirty
        self.jpos: int | None = None  # journal position of the first record since clean
        self.redirty: tuple[int, float, int | None] | None = None  # first write during write-out


class GroupSync:
    """Run ``fn`` (an fdatasync) for many callers at once.

    Every caller is answered by a run of ``fn`` that *started after* the
    call: callers arriving while one runs share the next run.  That is group
    commit -- N concurrent FUA writes cost one or two fdatasyncs, not N.
    """

    def __init__(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._fn = fn
        self._waiting: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    async def __call__(self) -> None:
        if self._waiting is None:
            fut = self._waiting = asyncio.get_running_loop().create_future()
            # If every caller is cancelled, nobody reads the exception: say it is read.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._waiting)

    async def _run(self) -> None:
        try:
            while self._waiting is not None:
                fut, self._waiting = self._waiting, None
                self.runs += 1
                try:
                    await self._fn()
                except BaseException as e:  # noqa: BLE001 - handed to every caller
                    if not fut.done():
                        fut.set_exception(e)
                    if not isinstance(e, Exception):
                        raise
                else:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._task = None


class CacheBudget:
    """The memory shared by every cached LUN (``[cache] size``).

    ``used`` counts ``PAGE_COST`` per page held by any cache.  Room is made
    by evicting clean pages (the asking cache's LRU first); dirty pages only
    leave through write-out, so a writer that finds no room waits.
    """

    def __init__(self, size: int) -> None:
        if size < MIN_BUDGET:
            raise ValueError(f"cache size must be at least {MIN_BUDGET >> 20} MiB")
        self.size = size
        self.used = 0
        self.peak = 0
        self.caches: list[CachedBackend] = []

    def make_room(self, need: int, first: "CachedBackend | None" = None) -> bool:
        """Evict clean pages until ``need`` more bytes fit; True if they do."""
        if self.used + need <= self.size:
            return True
        order = ([first] if first is not None else []) + [c for c in self.caches if c is not first]
        for c in order:
            c._evict(self.used + need - self.size)
            if self.used + need <= self.size:
                return True
        return False

    def wake_all(self) -> None:
        for c in self.caches:
            c._freed.set()

    def dirty_bytes(self) -> int:
        return sum(c.dirty_bytes for c in self.caches)


class CachedBackend:
    """A :class:`~.base.Backend` caching another one; see the module doc."""

    def __init__(
        self,
        inner: Backend,
        budget: CacheBudget,
        *,
        mode: str = "write-back",
        dirty_limit: int | None = None,
        max_dirty_age: float = 5.0,
        journal: "Journal | None" = None,
        name: str = "",
    ) -> None:
        if mode not in ("write-back", "write-through"):
            raise ValueError(f"cache mode must be write-back or write-through, not {mode!r}")
        if inner.size % SECTOR:
            raise ValueError("image size must be a multiple of 512")
        self.inner = inner
        self.budget = budget
        self.name = name or getattr(inner, "path", "") or repr(inner)
        self.size = inner.size
        self.journal = journal
        # With a journal every acknowledged write is durable: WCE=0 is the
        # truth, and there is nothing for the initiator to switch.
        self._write_back = mode == "write-back" and journal is None
        self.write_cache = self._write_back
        if journal is None:
            self.set_write_cache = self._set_write_cache  # WCE changeable (MODE SELECT)
        else:
            journal.on_full = self._wake_for_journal
        limit = dirty_limit if dirty_limit is not None else budget.size // 2
        # A LUN can never hold more dirty data than the budget, and needs
        # room for a few batches to make progress.
        self.dirty_limit = max(min(limit, budget.size), 4 * 64 * PAGE_COST)
        self.max_dirty_age = max_dirty_age
        # Writes larger than this go through the cache in pieces, so one
        # 32 MiB WRITE cannot need more than the whole dirty limit at once.
        self._chunk = max(PAGE, (self.dirty_limit // 4 // PAGE_COST) * PAGE)

        self._pages: dict[int, _Page] = {}
        self._dirty: dict[int, None] = {}  # insertion order = oldest first
        self._clean: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.dirty_bytes = 0
        self._seq = 0  # counts writes; flush() waits for pages with seq <= its start
        self._evict_seq = 0
        self._scan = 0  # elevator position (page index) for pressure write-out
        self._error: StorageError | None = None  # deferred write-out error
        self._retry_delay = RETRY_MIN
        self._closed = False
        self._wlock = asyncio.Lock()
        self._admit = asyncio.Lock()  # FIFO turnstile for writers that must wait
        self._freed = asyncio.Event()
        self._wake = asyncio.Event()
        self._sync = GroupSync(self._inner_flush)
        self._flusher: asyncio.Task[None] | None = None
        budget.caches.append(self)
        # statistics (benchmarks, logs)
        self.stats = {"hits": 0, "misses": 0, "writeouts": 0, "written": 0, "waits": 0, "errors": 0}

    # -- properties ----------------------------------------------------------

    @property
    def thin(self) -> bool:
        return bool(self.inner.thin)

    @property
    def path(self) -> str:
        return str(getattr(self.inner, "path", self.name))

    @property
    def mode(self) -> str:
        if self.journal is not None:
            return "journal"
        return "write-back" if self._write_back else "write-through"

    def _set_write_cache(self, enabled: bool) -> None:
        """MODE SELECT WCE.  The SCSI core flushes before clearing WCE, so no
        acknowledged volatile data is left when writes turn synchronous."""
        enabled = bool(enabled)
        if enabled != self._write_back:
            log.info("%s: write cache %s (MODE SELECT)", self.name, "enabled" if enabled else "disabled")
        self._write_back = self.write_cache = enabled

    # -- start / stop ----------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (needs a running loop)."""
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name=f"flusher {self.name}")

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, f"{self.name}: cache is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(errno.EINVAL, f"{self.name}: range {offset}+{length} outside {self.size} bytes")
        if offset % SECTOR or length % SECTOR:
            raise ValueError("cached I/O must be aligned to 512 bytes")

    # -- reads -------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        self._check(offset, length)
        out = bytearray(length)
        if length == 0:
            return out
        pages, clean = self._pages, self._clean
        missing: list[tuple[int, int]] = []  # (page index, sector mask not in cache)
        pos = 0
        while pos < length:
            at = offset + pos
            i, inpage = divmod(at, PAGE)
            take = min(PAGE - inpage, length - pos)
            m = _mask(inpage, take)
            p = pages.get(i)
            if p is not None and p.valid & m == m:
                out[pos : pos + take] = p.data[inpage : inpage + take]
                if not p.dirty:
                    clean.move_to_end(i)
            else:
                if p is not None and p.valid & m:
                    for s in range(inpage // SECTOR, (inpage + take) // SECTOR):
                        if p.valid >> s & 1:
                            a = s * SECTOR
                            out[pos + a - inpage : pos + a - inpage + SECTOR] = p.data[a : a + SECTOR]
                    missing.append((i, m & ~p.valid))
                else:
                    missing.append((i, m))
            pos += take
        if not missing:
            self.stats["hits"] += 1
            return out
        self.stats["misses"] += 1
        # One read of the image spanning every missing sector; sectors valid in
        # the cache at the start keep the cache's (newer or equal) data.
        first = missing[0][0] * PAGE + _low_sector(missing[0][1]) * SECTOR
        last = missing[-1][0] * PAGE + (_high_sector(missing[-1][1]) + 1) * SECTOR
        evict_seq = self._evict_seq
        data = memoryview(await self.inner.read(first, last - first)).cast("B")
        for i, m in missing:
            base = i * PAGE
            if m == FULL and base >= offset and base + PAGE <= offset + length:
                out[base - offset : base - offset + PAGE] = data[base - first : base - first + PAGE]
                continue
            for s in _sectors(m):
                a = base + s * SECTOR
                out[a - offset : a - offset + SECTOR] = data[a - first : a - first + SECTOR]
        if evict_seq == self._evict_seq and not self._closed:
            self._fill(missing, first, data)
        return out

    def _fill(self, missing: list[tuple[int, int]], first: int, data: memoryview) -> None:
        """Keep what was read as clean pages, if the budget has (clean) room."""
        pages = self._pages
        self.budget.make_room(sum(1 for i, _ in missing if i not in pages) * PAGE_COST, self)
        # Count again: making room may have evicted clean pages of this span.
        new = sum(1 for i, _ in missing if i not in pages)
        if self.budget.used + new * PAGE_COST > self.budget.size:
            return
        for i, m in missing:
            p = self._pages.get(i)
            if p is None:
                p = self._new_page(i)
                self._clean[i] = None
            m &= ~p.valid  # a write that raced with the read is newer: keep it
            base = i * PAGE
            for s in _sectors(m):
                a = s * SECTOR
                p.data[a : a + SECTOR] = data[base + a - first : base + a - first + SECTOR]
            p.valid |= m

    def _new_page(self, i: int) -> _Page:
        p = self._pages[i] = _Page()
        b = self.budget
        b.used += PAGE_COST
        if b.used > b.peak:
            b.peak = b.used
        return p

    def _evict(self, want: int) -> None:
        clean, pages = self._clean, self._pages
        freed = 0
        while clean and freed < want:
            i, _ = clean.popitem(last=False)
            del pages[i]
            freed += PAGE_COST
        if freed:
            self._evict_seq += 1
            self.budget.used -= freed

    # -- writes ------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        self._check(offset, n)
        if n == 0:
            if fua or not self.write_cache:
                await self._flush_range(0, self.size)
            return
        jpos: int | None = None
        journal = self.journal
        pos = 0
        while pos < n:
            take = min(self._chunk, n - pos)
            await self._reserve(offset + pos, take)
            if journal is not None:
                # Space in the journal first (may wait for the image to catch
                # up); then cache and queue the record with no await between,
                # so record order = cache order.
                await journal.reserve(take)
                self._check(offset + pos, take)
                if not self._fits(offset + pos, take):
                    continue  # the journal wait let other writers take the room
                jpos, commit = journal.append_write(offset + pos, mv[pos : pos + take])
                self._put(offset + pos, mv[pos : pos + take], jpos)
                await commit
            else:
                self._put(offset + pos, mv[pos : pos + take], None)
            pos += take
        if journal is None and (fua or not self._write_back):
            await self._flush_range(offset, n)

    def _span(self, offset: int, length: int) -> range:
        return range(offset // PAGE, (offset + length - 1) // PAGE + 1)

    def _fits(self, offset: int, length: int) -> bool:
        """Room for this write now?  Evicts clean pages to make it."""
        pages = self._pages
        span = self._span(offset, length)
        # Evict for the worst case (every page new) before counting, so the
        # count is not invalidated by evicting a clean page of the span.
        self.budget.make_room(len(span) * PAGE_COST, self)
        new = newly_dirty = 0
        for i in span:
            p = pages.get(i)
            if p is None:
                new += 1
                newly_dirty += 1
            elif not p.dirty:
                newly_dirty += 1
        if self.dirty_bytes and self.dirty_bytes + newly_dirty * PAGE_COST > self.dirty_limit:
            return False
        b = self.budget
        return b.used + new * PAGE_COST <= b.size

    async def _reserve(self, offset: int, length: int) -> None:
        """Back-pressure: wait (FIFO per LUN) until the write fits the dirty
        limit and the budget.  Returns with no await after the last check,
        so the caller's _put cannot be overtaken."""
        if not self._admit.locked() and self._fits(offset, length):
            return
        self.stats["waits"] += 1
        async with self._admit:
            while True:
                self._check(offset, length)
                self._freed.clear()
                if self._fits(offset, length):
                    return
                self._kick(pressure=True)
                await self._freed.wait()

    def _put(self, offset: int, mv: memoryview, jpos: int | None) -> None:
        """Copy a write into the cache as dirty pages (room reserved)."""
        self._seq += 1
        seq = self._seq
        now = time.monotonic()
        pages, dirty, clean = self._pages, self._dirty, self._clean
        n = mv.nbytes
        pos = 0
        while pos < n:
            i, inpage = divmod(offset + pos, PAGE)
            take = min(PAGE - inpage, n - pos)
            p = pages.get(i)
            if p is None:
                p = self._new_page(i)
            if p.busy and p.redirty is None:
                # Copy on write: the write-out thread keeps the old buffer.
                p.data = bytearray(p.data)
                p.redirty = (seq, now, jpos)
            p.data[inpage : inpage + take] = mv[pos : pos + take]
            m = _mask(inpage, take)
            p.valid |= m
            if not p.dirty:
                p.seq, p.since, p.jpos = seq, now, jpos
                dirty[i] = None
                if i in clean:
                    del clean[i]
                self.dirty_bytes += PAGE_COST
            p.dirty |= m
            pos += take
        if self.dirty_bytes > self.dirty_limit * PRESSURE:
            self._kick(pressure=True)
        elif self._flusher is not None and not self._wake.is_set() and len(dirty) == 1:
            self._wake.set()  # first dirty page: the flusher starts its age clock

    # -- write-out -----------------------------------------------------------------

    def _runs(self, batch: list[int]) -> list[tuple[int, list[memoryview]]]:
        """Sorted page indices -> merged (offset, buffers) runs of dirty sectors."""
        runs: list[tuple[int, list[memoryview]]] = []
        end = -1
        pages = self._pages
        for i in batch:
            p = pages[i]
            d = p.dirty
            mv = memoryview(p.data)
            base = i * PAGE
            if d == FULL:
                segs = ((0, PAGE),)
            else:
                segs = _segments(d)
            for a, b in segs:
                if base + a == end and len(runs[-1][1]) < 1024:  # IOV_MAX
                    runs[-1][1].append(mv[a:b])
                else:
                    runs.append((base + a, [mv[a:b]]))
                end = base + b
        return runs

    async def _write_out(self, batch: list[int]) -> None:
        """Write these dirty pages (sorted) to the image; caller holds _wlock."""
        pages = self._pages
        for i in batch:
            p = pages[i]
            p.busy = True
            p.redirty = None
        runs = self._runs(batch)
        nbytes = sum(len(b) for _, bufs in runs for b in bufs)
        inner = self.inner
        writev = getattr(inner, "writev", None)

        async def one(off: int, bufs: list[memoryview]) -> None:
            if writev is not None:
                await writev(off, bufs)
            else:
                await inner.write(off, bufs[0] if len(bufs) == 1 else b"".join(bufs))

        failed: BaseException | None = None
        try:
            for k in range(0, len(runs), WRITE_DEPTH):
                results = await asyncio.gather(
                    *(one(o, b) for o, b in runs[k : k + WRITE_DEPTH]), return_exceptions=True
                )
                for r in results:
                    if isinstance(r, BaseException):
                        failed = r
                if failed is not None:
                    break
        finally:
            done = failed is None
            clean, dirty = self._clean, self._dirty
            for i in batch:
                p = pages[i]
                p.busy = False
                r = p.redirty
                p.redirty = None
                if r is not None:
                    # Written again during the write-out: still dirty, and
                    # now as young as that write.
                    p.seq, p.since, p.jpos = r
                    del dirty[i]
                    dirty[i] = None
                elif done:
                    p.dirty = 0
                    del dirty[i]
                    clean[i] = None
                    self.dirty_bytes -= PAGE_COST
            self.budget.wake_all()
        if failed is not None:
            self.stats["errors"] += 1
            err = failed if isinstance(failed, StorageError) else StorageError(
                getattr(failed, "errno", None) or errno.EIO, f"{self.name}: write-out failed: {failed}"
            )
            raise err from failed
        self.stats["writeouts"] += 1
        self.stats["written"] += nbytes

    async def _inner_flush(self) -> None:
        await self.inner.flush()

    async def _flush_range(self, offset: int, length: int) -> None:
        """Write out every page of the range dirtied before this call, then
        fdatasync (shared with concurrent callers).  Later writes are not
        waited for, so a flush under a steady write load still ends."""
        target = self._seq
        first, last = offset // PAGE, (offset + length - 1) // PAGE
        whole = first == 0 and last >= (self.size - 1) // PAGE
        while True:
            async with self._wlock:
                pages = self._pages
                if whole:
                    batch = [i for i in self._dirty if pages[i].seq <= target]
                else:
                    batch = [i for i in self._dirty if first <= i <= last and pages[i].seq <= target]
                if not batch:
                    break
                batch.sort()
                await self._write_out(batch[:BATCH_PAGES])
        await self._sync()

    async def flush(self, offset: int = 0, length: int = 0) -> None:
        """SYNCHRONIZE CACHE: the range (0 = to the end) on stable storage;
        then any error a background write-out met since the last flush."""
        if self._closed:
            raise StorageError(errno.EBADF, f"{self.name}: cache is closed")
        if length == 0:
            length = self.size - offset
        try:
            if length > 0 and self.journal is None:
                await self._flush_range(offset, length)
            elif self.journal is not None:
                await self.journal.sync()  # acknowledged writes are committed; this covers any in flight
        except OSError:
            self._error = None  # this failure tells the initiator as much
            raise
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _kick(self, pressure: bool = False) -> None:
        if pressure:
            self._pressure = True
            for c in self.budget.caches:  # the budget may be full of another LUN's pages
                if c is not self and c.dirty_bytes:
                    c._pressure = True
                    c._wake.set()
        self._wake.set()

    _pressure = False

    def _wake_for_journal(self) -> None:
        self._wake.set()

    def _pick(self, now: float) -> list[int] | None:
        """The next background batch, sorted by offset, or None to wait."""
        dirty, pages = self._dirty, self._pages
        if not dirty:
            return None
        journal_full = self.journal is not None and self.journal.needs_room()
        pressure = self._pressure or journal_full or self.dirty_bytes > self.dirty_limit * PRESSURE
        if pressure and not journal_full:
            # Elevator (C-SCAN) from where the last batch stopped: long sorted
            # runs, every region visited in turn.
            order = sorted(dirty)
            k = bisect.bisect_left(order, self._scan)
            batch = (order[k:] + order[:k])[:BATCH_PAGES]
            self._pressure = False
            self._scan = batch[-1] + 1  # last one in elevator order
            batch.sort()
            return batch
        if journal_full:
            # The journal's tail is held by the oldest records: write those.
            self._pressure = False
            batch = sorted(dirty, key=lambda i: pages[i].jpos if pages[i].jpos is not None else -1)[:BATCH_PAGES]
            batch.sort()
            return batch
        cutoff = now - self.max_dirty_age
        batch = []
        for i in dirty:  # oldest first
            if pages[i].since > cutoff or len(batch) >= BATCH_PAGES:
                break
            batch.append(i)
        if not batch:
            return None
        batch.sort()
        return batch

    async def _flush_loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            self._wake.clear()
            batch = self._pick(now)
            if batch is None and self.journal is not None and self.journal.needs_room():
                # Nothing dirty holds the tail, yet the journal is full:
                # only the tail needs moving (writers may be waiting on it).
                try:
                    await self._advance_journal()
                except Exception as e:  # noqa: BLE001
                    log.error("%s: journal tail update failed: %s", self.name, e)
                    if self._error is None:
                        self._error = e if isinstance(e, StorageError) else StorageError(errno.EIO, str(e))
                    await asyncio.sleep(self._retry_delay)
                    continue
                if self.journal.needs_room() and not self._dirty:
                    await self._wake.wait()
                continue
            if batch is None:
                timeout = None
                if self._dirty:
                    oldest = self._pages[next(iter(self._dirty))].since
                    timeout = max(0.01, oldest + self.max_dirty_age - now)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                async with self._wlock:
                    batch = [i for i in batch if i in self._dirty]  # a flush may have beaten us
                    if batch:
                        await self._write_out(batch)
                if self.journal is not None and batch and (self.journal.needs_room() or not self._dirty):
                    await self._advance_journal()
                self._retry_delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - logged, kept for the next flush
                if self._error is None:
                    self._error = e if isinstance(e, StorageError) else StorageError(errno.EIO, str(e))
                log.error("%s: background write-out failed (retry in %.0fs): %s", self.name, self._retry_delay, e)
                await asyncio.sleep(self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    async def _advance_journal(self) -> None:
        """Image fdatasync, then move the journal's tail past every record
        whose data is now on the image."""
        journal = self.journal
        assert journal is not None
        tail = journal.head
        for i in self._dirty:
            jp = self._pages[i].jpos
            if jp is not None and jp < tail:
                tail = jp
        tail = min(tail, journal.oldest_pending())
        if tail <= journal.tail:
            return
        await self._sync()
        await journal.set_tail(tail)

    # -- discard / zeroes / allocation ------------------------------------------------

    def _drop(self, offset: int, length: int) -> None:
        """Forget cached sectors of a range (caller holds _wlock: none busy)."""
        pages, dirty, clean = self._pages, self._dirty, self._clean
        freed = 0
        pos, end = offset, offset + length
        while pos < end:
            i, inpage = divmod(pos, PAGE)
            take = min(PAGE - inpage, end - pos)
            p = pages.get(i)
            if p is not None:
                m = _mask(inpage, take)
                was_dirty = bool(p.dirty)
                p.valid &= ~m
                p.dirty &= ~m
                if was_dirty and not p.dirty:
                    del dirty[i]
                    self.dirty_bytes -= PAGE_COST
                    clean[i] = None
                if not p.valid:
                    del pages[i]
                    clean.pop(i, None)
                    if p.dirty:  # pragma: no cover - valid covers dirty
                        raise AssertionError("dirty sector not valid")
                    freed += PAGE_COST
            pos += take
        self._evict_seq += 1
        self.budget.used -= freed
        self.budget.wake_all()

    async def _discard_like(self, offset: int, length: int, op: str) -> None:
        self._check(offset, length)
        if length == 0:
            return
        if self.journal is not None:
            # Before _wlock: making journal room needs the flusher, which needs _wlock.
            await self.journal.reserve(0)
        async with self._wlock:
            self._drop(offset, length)
            if self.journal is not None:
                jpos, commit = self.journal.append_discard(offset, length, zero=op == "write_zeroes")
                self.journal.pin(jpos)
                try:
                    await commit
                    await getattr(self.inner, op)(offset, length)
                finally:
                    self.journal.unpin(jpos)
            else:
                await getattr(self.inner, op)(offset, length)
        if self.journal is None and not self._write_back:
            await self._sync()

    async def discard(self, offset: int, length: int) -> None:
        await self._discard_like(offset, length, "discard")

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._discard_like(offset, length, "write_zeroes")

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        # Dirty pages are allocated data the image does not know of yet:
        # write them out first, then ask the image.
        self._check(offset, length)
        if length and any(offset // PAGE <= i <= (offset + length - 1) // PAGE for i in self._dirty):
            first, last = offset // PAGE, (offset + length - 1) // PAGE
            async with self._wlock:
                batch = sorted(i for i in self._dirty if first <= i <= last)
                for k in range(0, len(batch), BATCH_PAGES):
                    await self._write_out(batch[k : k + BATCH_PAGES])
        return await self.inner.allocation(offset, length)

    # -- close -----------------------------------------------------------------------

    async def close(self) -> None:
        """Write out everything, fdatasync, retire the journal, close the image."""
        if self._closed:
            return
        try:
            if self._flusher is not None:
                self._flusher.cancel()
                try:
                    await self._flusher
                except asyncio.CancelledError:
                    pass
                self._flusher = None
            await self._flush_range(0, self.size)
            if self.journal is not None:
                # Everything is on the image: nothing to replay next start.
                await self.journal.checkpoint()
        finally:
            self._closed = True
            self._admit_fail()
            err: BaseException | None = None
            if self.journal is not None:
                try:
                    await self.journal.close()
                except Exception as e:  # noqa: BLE001
                    err = e
            try:
                await self.inner.close()
            finally:
                self.budget.used -= len(self._pages) * PAGE_COST
                self._pages.clear()
                self._clean.clear()
                if self in self.budget.caches:
                    self.budget.caches.remove(self)
            if err is not None:
                raise err

    def _admit_fail(self) -> None:
        self._freed.set()  # waiting writers re-check and see the cache closed

    def __repr__(self) -> str:
        return f"<CachedBackend {self.mode} {self.name} dirty {self.dirty_bytes >> 10} KiB>"


def _sectors(m: int):
    s = 0
    while m:
        if m & 1:
            yield s
        m >>= 1
        s += 1


def _low_sector(m: int) -> int:
    return (m & -m).bit_length() - 1


def _high_sector(m: int) -> int:
    return m.bit_length() - 1


def _segments(m: int) -> list[tuple[int, int]]:
    """Sector mask -> byte (start, end) runs within a page."""
    out: list[tuple[int, int]] = []
    s = 0
    while m:
        if m & 1:
            start = s
            while m & 1:
                m >>= 1
                s += 1
            out.append((start * SECTOR, s * SECTOR))
        else:
            m >>= 1
            s += 1
    return out
