"""CachedBackend: coherence, flush ordering, back-pressure, error reporting.

The image under the cache is a :class:`DiskModel`: a memory backend that
keeps a *volatile* image (what pwrite reached) and a *durable* one (what a
flush made stable), can hold writes at a gate, and can fail on demand.  So the
tests check what would survive a power cut, not only what reads return.
"""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from pyiscsi_target.storage.base import Backend, StorageError
from pyiscsi_target.storage.cache import PAGE, PAGE_COST, CacheBudget, CachedBackend, GroupSync
from pyiscsi_target.storage.memory import MemoryBackend

MiB = 1 << 20
SIZE = 8 * MiB


class DiskModel(MemoryBackend):
    def __init__(self, size: int = SIZE) -> None:
        super().__init__(size, thin=True, write_cache=True)
        self.durable = bytearray(size)
        self.gate = asyncio.Event()
        self.gate.set()
        self.read_gate = asyncio.Event()
        self.read_gate.set()
        self.fail: int | None = None  # errno to fail writes/flushes with
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.writevs = 0

    async def write(self, offset, data, *, fua=False):
        await self.gate.wait()
        if self.fail is not None:
            raise StorageError(self.fail, "injected write error")
        mv = memoryview(data).cast("B")
        await super().write(offset, mv)
        self.writes.append((offset, len(mv)))
        if fua:
            self.durable[offset : offset + len(mv)] = mv

    async def writev(self, offset, bufs):
        # Like pwritev in a thread: the buffers are read when the disk is
        # ready, not when the call is made.
        self.writevs += 1
        await self.gate.wait()
        await self.write(offset, b"".join(bufs))

    async def read(self, offset, length):
        data = await super().read(offset, length)  # what the disk held when asked
        await self.read_gate.wait()
        return data

    async def flush(self, offset=0, length=0):
        await self.gate.wait()
        if self.fail is not None:
            raise StorageError(self.fail, "injected flush error")
        self.flushes += 1
        self.durable[:] = await super().read(0, self.size)

    async def discard(self, offset, length):
        await super().discard(offset, length)

    def volatile(self, offset, length) -> bytes:
        return bytes(asyncio.get_event_loop().run_until_complete(super().read(offset, length)))


def blk(tag: int, n: int = 4096) -> bytes:
    return bytes([tag & 0xFF]) * n


async def vol(disk: DiskModel, offset: int, length: int) -> bytes:
    return bytes(await MemoryBackend.read(disk, offset, length))


@pytest.fixture
async def disk():
    return DiskModel()


def make(disk, *, budget=32 * MiB, **kw) -> CachedBackend:
    c = CachedBackend(disk, CacheBudget(budget), **kw)
    return c


async def test_is_a_backend_and_reports_wce(disk):
    wb = make(disk)
    assert isinstance(wb, Backend)
    assert wb.write_cache is True and callable(getattr(wb, "set_write_cache", None))
    wt = make(DiskModel(), mode="write-through")
    assert wt.write_cache is False


async def test_write_back_acknowledges_from_cache_and_reads_back(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(4096, blk(1))
    await c.write(512, blk(2, 1024))  # sub-page, sector granular
    assert disk.writes == []  # nothing reached the image yet
    assert await c.read(4096, 4096) == blk(1)
    assert await c.read(0, 2048) == bytes(512) + blk(2, 1024) + bytes(512)
    assert c.dirty_bytes == 2 * PAGE_COST


async def test_flush_makes_everything_durable_merged_and_sorted(disk):
    c = make(disk, max_dirty_age=3600)
    for i in (7, 3, 4, 5, 0):  # 3..5 adjacent: one pwritev
        await c.write(i * 4096, blk(i + 1))
    await c.flush()
    assert disk.writes == [(0, 4096), (3 * 4096, 3 * 4096), (7 * 4096, 4096)]
    for i in (7, 3, 4, 5, 0):
        assert disk.durable[i * 4096 : (i + 1) * 4096] == blk(i + 1)
    assert c.dirty_bytes == 0
    assert await c.read(3 * 4096, 4096) == blk(4)  # still cached, clean


async def test_partial_page_reads_merge_cache_and_image(disk):
    await disk.write(0, blk(9, 8192))
    c = make(disk, max_dirty_age=3600)
    await c.write(1024, blk(1, 512))  # one dirty sector in page 0
    got = await c.read(0, 8192)
    assert got == blk(9, 1024) + blk(1, 512) + blk(9, 8192 - 1536)
    # The filled sectors are cached now: the image can change under a clean
    # page only through the cache, so reading again must hit.
    hits = c.stats["hits"]
    assert await c.read(0, 8192) == got
    assert c.stats["hits"] == hits + 1


async def test_slow_read_does_not_cache_data_older_than_the_disk(disk):
    """A read of the image that overlaps a write, its write-out and the
    eviction of that page must not put its (older) data into the cache."""
    c = make(disk, budget=16 * MiB, max_dirty_age=3600)
    disk.read_gate.clear()
    r = asyncio.create_task(c.read(0, 4096))  # sees the old (zero) data
    await asyncio.sleep(0)
    await c.write(0, blk(1))
    await c.flush()
    c.budget.make_room(c.budget.size, c)  # evicts the now clean page
    assert 0 not in c._pages
    disk.read_gate.set()
    await r  # old or new: both are fine for overlapping commands
    assert await c.read(0, 4096) == blk(1)


async def test_fua_write_is_durable_on_return_and_only_its_range(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(0, blk(1))
    await c.write(MiB, blk(2), fua=True)
    assert disk.durable[MiB : MiB + 4096] == blk(2)
    assert (0, 4096) not in disk.writes  # the unrelated dirty page stays cached
    assert c.dirty_bytes == PAGE_COST


async def test_write_during_write_out_is_not_lost_copy_on_write(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(0, blk(1))
    disk.gate.clear()
    fl = asyncio.create_task(c.flush())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert c._pages[0].busy
    await c.write(0, blk(2))  # lands while the old copy is being written
    disk.gate.set()
    await fl
    assert disk.durable[:4096] == blk(1)  # the flush covered what came before it
    assert await c.read(0, 4096) == blk(2)
    assert c.dirty_bytes == PAGE_COST  # the new data is still dirty
    await c.flush()
    assert disk.durable[:4096] == blk(2)  # and no older copy overwrote it


async def test_flush_ends_under_a_steady_write_load(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(0, blk(1))
    stop = False

    async def writer():
        i = 0
        while not stop:
            await c.write(4096 * (1 + i % 64), blk(i))
            i += 1
            await asyncio.sleep(0)

    w = asyncio.create_task(writer())
    await asyncio.wait_for(c.flush(), 30)  # a hang here would be a livelock
    stop = True
    await w
    assert disk.durable[:4096] == blk(1)


async def test_back_pressure_bounds_dirty_data_and_memory(disk):
    budget = CacheBudget(16 * MiB)
    c = CachedBackend(disk, budget, dirty_limit=2 * MiB, max_dirty_age=3600)
    c.start()
    disk.gate.clear()  # the disk stalls: nothing can be written out
    done = 0

    async def w(i):
        nonlocal done
        await c.write(i * 4096, blk(i))
        done += 1

    tasks = [asyncio.create_task(w(i)) for i in range(1024)]  # 4 MiB of writes
    for _ in range(50):
        await asyncio.sleep(0)
    assert c.dirty_bytes <= c.dirty_limit
    assert done < 1024 and done * PAGE_COST <= c.dirty_limit
    assert budget.used <= budget.size
    disk.gate.set()
    await asyncio.gather(*tasks)
    assert done == 1024 and budget.peak <= budget.size
    await c.flush()
    for i in (0, 511, 1023):
        assert disk.durable[i * 4096 : i * 4096 + 4096] == blk(i)
    await c.close()


async def test_large_write_passes_a_small_dirty_limit(disk):
    c = make(disk, budget=16 * MiB, dirty_limit=1 * MiB, max_dirty_age=3600)
    c.start()
    data = bytes(random.Random(1).randbytes(4 * MiB))
    await asyncio.wait_for(c.write(0, data), 30)
    assert await c.read(0, 4 * MiB) == data
    await c.close()
    assert disk.durable[: 4 * MiB] == data


async def test_background_write_out_after_max_dirty_age(disk):
    c = make(disk, max_dirty_age=0.01)
    c.start()
    await c.write(0, blk(5))
    for _ in range(500):
        if c.dirty_bytes == 0:
            break
        await asyncio.sleep(0.01)
    assert c.dirty_bytes == 0 and await vol(disk, 0, 4096) == blk(5)
    await c.close()


async def test_write_out_error_is_reported_on_next_flush_and_data_kept(disk, caplog):
    c = make(disk, max_dirty_age=0.01)
    c.start()
    disk.fail = errno.EIO
    await c.write(0, blk(3))
    for _ in range(500):
        if c._error is not None:
            break
        await asyncio.sleep(0.01)
    assert "background write-out failed" in caplog.text
    assert await c.read(0, 4096) == blk(3)  # still served from the cache
    disk.fail = None
    with pytest.raises(StorageError):
        await c.flush()  # the data got out now, but the earlier failure is told
    assert disk.durable[:4096] == blk(3)
    await c.flush()  # reported once
    await c.close()


async def test_flush_fails_while_the_disk_fails(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(0, blk(3))
    disk.fail = errno.EIO
    with pytest.raises(StorageError):
        await c.flush()
    assert c.dirty_bytes == PAGE_COST  # not dropped
    disk.fail = None
    await c.flush()
    assert disk.durable[:4096] == blk(3)


async def test_write_through_is_durable_on_return_and_switchable(disk):
    c = make(disk, mode="write-through")
    await c.write(8192, blk(4))
    assert disk.durable[8192 : 8192 + 4096] == blk(4)
    assert c.dirty_bytes == 0
    c.set_write_cache(True)
    assert c.write_cache and c.mode == "write-back"
    await c.write(0, blk(6))
    assert disk.durable[:4096] == bytes(4096)
    await c.flush()
    c.set_write_cache(False)
    await c.write(0, blk(7))
    assert disk.durable[:4096] == blk(7)


async def test_group_sync_serves_concurrent_fua_writes_with_few_flushes(disk):
    c = make(disk, mode="write-through")
    await asyncio.gather(*(c.write(i * 4096, blk(i)) for i in range(32)))
    assert disk.flushes < 32
    for i in range(32):
        assert disk.durable[i * 4096 : i * 4096 + 4096] == blk(i)


async def test_group_sync_runs_after_the_call():
    calls = []
    gate = asyncio.Event()

    async def fn():
        calls.append("start")
        await gate.wait()

    g = GroupSync(fn)
    a = asyncio.create_task(g())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    b = asyncio.create_task(g())  # arrives while the first run is in flight
    c = asyncio.create_task(g())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(a, b, c)
    assert calls == ["start", "start"]  # b and c share a second run


async def test_discard_drops_dirty_data_and_nothing_resurrects(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(0, blk(1, 16384))
    await c.discard(4096, 8192)
    assert await c.read(0, 16384) == blk(1) + bytes(8192) + blk(1)
    await c.flush()
    assert disk.durable[:16384] == blk(1) + bytes(8192) + blk(1)
    await c.write_zeroes(0, 512)
    assert await c.read(0, 1024) == bytes(512) + blk(1, 512)


async def test_allocation_sees_dirty_data(disk):
    c = make(disk, max_dirty_age=3600)
    await c.write(MiB, blk(1))
    ext = await c.allocation(MiB, 64 * 1024)
    assert ext[0][2] is True


async def test_read_cache_is_bounded_and_lru(disk):
    budget = CacheBudget(16 * MiB)
    c = CachedBackend(disk, budget, max_dirty_age=3600)
    big = DiskModel(64 * MiB)
    c2 = CachedBackend(big, budget, max_dirty_age=3600)
    for off in range(0, 64 * MiB, MiB):
        await c2.read(off, MiB)
    assert budget.used <= budget.size and budget.peak <= budget.size
    await c.write(0, blk(1, MiB))  # evicts clean pages of the other LUN
    assert budget.used <= budget.size
    assert await c.read(0, MiB) == blk(1, MiB)


async def test_close_writes_everything_out(disk):
    c = make(disk, max_dirty_age=3600)
    c.start()
    await c.write(0, blk(8))
    await c.close()
    assert disk.durable[:4096] == blk(8) and disk.closed
    with pytest.raises(StorageError):
        await c.read(0, 512)


async def test_random_operations_match_a_model():
    """Random writes/FUA/flushes/discards/reads with write-out running all
    the time (tiny age, tiny limits): reads always equal the model, and a
    final flush leaves the durable image equal to it."""
    rng = random.Random(7)
    disk = DiskModel(2 * MiB)
    c = CachedBackend(disk, CacheBudget(16 * MiB), dirty_limit=256 * 1024, max_dirty_age=0.001)
    c.start()
    model = bytearray(2 * MiB)
    for step in range(1500):
        op = rng.random()
        off = rng.randrange(0, 2 * MiB // 512) * 512
        n = min(rng.choice((512, 1024, 4096, 8192, 65536)), 2 * MiB - off)
        if op < 0.55:
            data = rng.randbytes(n)
            await c.write(off, data, fua=rng.random() < 0.1)
            model[off : off + n] = data
        elif op < 0.6:
            await c.discard(off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.63:
            await c.flush()
            assert disk.durable == model
        else:
            assert await c.read(off, n) == model[off : off + n], step
        if step % 50 == 0:
            await asyncio.sleep(0.002)  # let the flusher run
    await c.flush()
    assert disk.durable == model
    await c.close()


async def test_on_a_file_image(tmp_path):
    from pyiscsi_target.storage.file import open_image

    img = open_image(tmp_path / "c.img", size=4 * MiB, create=True)
    c = CachedBackend(img, CacheBudget(16 * MiB), max_dirty_age=3600)
    await c.write(0, blk(1, 3 * 4096))
    await c.write(PAGE * 10, blk(2, 512))
    await c.close()
    raw = (tmp_path / "c.img").read_bytes()
    assert raw[: 3 * 4096] == blk(1, 3 * 4096) and raw[40960:41472] == blk(2, 512)
