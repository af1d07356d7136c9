"""The cache under the real SCSI core: WCE in the caching page, MODE SELECT
WCE=0 flushing and switching to write-through, SYNCHRONIZE CACHE reporting a
failed background write-out as MEDIUM ERROR / WRITE ERROR."""

from __future__ import annotations

import asyncio
import errno

from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice
from pyiscsi_target.storage.cache import CacheBudget, CachedBackend
from tests.scsi.conftest import NEXUS_A, NEXUS_B, Harness, assert_check, assert_good, cdb10, make_lu
from tests.storage.test_cache import DiskModel

MiB = 1 << 20
BS = 512


def ms6_caching() -> bytes:
    return bytes([0x1A, 0x08, 0x08, 0, 255, 0])  # DBD=1, page 08h, current


def mode_select6(params: bytes) -> bytes:
    return bytes([0x15, 0x10, 0, 0, len(params), 0])


async def harness(backend) -> Harness:
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: make_lu(backend=backend)})
    dev.add_nexus(NEXUS_A)
    dev.add_nexus(NEXUS_B)
    h = Harness(dev)
    await h.drain_ua(NEXUS_A)
    await h.drain_ua(NEXUS_B)
    return h


async def caching_page(h) -> bytearray:
    r = await h.run(ms6_caching())
    assert_good(r)
    return bytearray(bytes(r.data_in)[4:])


async def test_mode_select_wce0_flushes_and_switches_to_write_through():
    disk = DiskModel(4 * MiB)
    c = CachedBackend(disk, CacheBudget(16 * MiB), max_dirty_age=3600)
    h = await harness(c)
    page = await caching_page(h)
    assert page[2] & 0x04  # WCE=1: write-back
    assert_good(await h.run(cdb10(0x2A, 8, 8), b"\x11" * 4096))
    assert disk.durable[4096:8192] == bytes(4096)  # only cached
    page[2] &= ~0x04
    assert_good(await h.run(mode_select6(bytes(4) + page), bytes(4) + page))
    assert disk.durable[4096:8192] == b"\x11" * 4096  # flushed before switching
    assert not (await caching_page(h))[2] & 0x04 and c.mode == "write-through"
    assert_good(await h.run(cdb10(0x2A, 16, 8), b"\x22" * 4096))
    assert disk.durable[8192:12288] == b"\x22" * 4096  # durable before GOOD


async def test_synchronize_cache_reports_a_failed_background_write_out():
    disk = DiskModel(4 * MiB)
    c = CachedBackend(disk, CacheBudget(16 * MiB), max_dirty_age=0.01)
    c.start()
    h = await harness(c)
    disk.fail = errno.EIO
    assert_good(await h.run(cdb10(0x2A, 0, 8), b"\x33" * 4096))  # acknowledged from the cache
    for _ in range(500):
        if c._error is not None:
            break
        await asyncio.sleep(0.01)
    assert_check(await h.run(cdb10(0x35, 0, 0)), Reason.WRITE_ERROR)
    disk.fail = None
    assert_good(await h.run(cdb10(0x35, 0, 0)))
    assert disk.durable[:4096] == b"\x33" * 4096
    await c.close()


async def test_fua_write_through_the_core_is_durable():
    disk = DiskModel(4 * MiB)
    c = CachedBackend(disk, CacheBudget(16 * MiB), max_dirty_age=3600)
    h = await harness(c)
    assert_good(await h.run(cdb10(0x2A, 0, 8, flags=0x08), b"\x44" * 4096))
    assert disk.durable[:4096] == b"\x44" * 4096
