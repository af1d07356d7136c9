"""The RBD backend against a real (private) Ceph cluster."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from pyiscsi_target.storage import rbd as rbdmod
from pyiscsi_target.storage.base import Backend, StorageError
from pyiscsi_target.storage.ceph_bindings import import_rados_rbd
from pyiscsi_target.storage.rbd import CephSettings, RbdBackend, open_rbd, parse_rbd_path

MiB = 1 << 20
_names = itertools.count()


@pytest.fixture
def settings(ceph_cluster):
    return CephSettings(conf=str(ceph_cluster.conf), client=ceph_cluster.client, keyring=str(ceph_cluster.keyring))


@pytest.fixture
def image(ceph_cluster):
    """A fresh 16 MiB layering-only image; its name."""
    name = f"unit-{os.getpid()}-{next(_names)}"
    ceph_cluster.create_image(name, 16 * MiB)
    yield name
    try:
        ceph_cluster.remove_image(name)
    except Exception:
        pass


async def _open(path, settings, **kw) -> RbdBackend:
    return await asyncio.to_thread(open_rbd, path, settings, **kw)


def test_parse_rbd_path():
    assert parse_rbd_path("rbd:rbd/disk1") == ("rbd", "disk1")
    for bad in ("rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:pool/img@snap", "rbd:p/ns/img", "pool/img"):
        with pytest.raises(ValueError):
            parse_rbd_path(bad)


async def test_read_write_roundtrip_unaligned_and_zero_length(settings, image):
    b = await _open(f"rbd:rbd/{image}", settings)
    try:
        assert isinstance(b, Backend)
        assert b.size == 16 * MiB and b.thin and not b.write_cache
        assert await b.read(0, 4096) == bytes(4096)  # never written: zeros
        data = os.urandom(3 * MiB + 1234)
        # Across object boundaries (4 MiB objects), unaligned, from a memoryview slice.
        buf = bytearray(b"X" * 7) + data
        await b.write(4 * MiB - 777, memoryview(buf)[7:])
        assert await b.read(4 * MiB - 777, len(data)) == data
        assert await b.read(4 * MiB - 778, 1) == b"\0"
        await b.write(100, b"", fua=True)  # zero-length: nothing, no error
        assert await b.read(100, 0) == b""
        await b.write(16 * MiB - 512, b"\xee" * 512, fua=True)  # the last block
        assert await b.read(16 * MiB - 512, 512) == b"\xee" * 512
        await b.flush()
        await b.flush(0, 4096)
    finally:
        await b.close()


async def test_out_of_range_and_closed(settings, image):
    b = await _open(f"rbd:rbd/{image}", settings)
    for call in (b.read(16 * MiB - 512, 1024), b.write(16 * MiB, b"x"), b.discard(-1, 10), b.read(0, -1)):
        with pytest.raises(StorageError):
            await call
    await b.close()
    await b.close()  # idempotent
    with pytest.raises(StorageError):
        await b.read(0, 512)
    with pytest.raises(StorageError):
        await b.write(0, b"x" * 512)
    with pytest.raises(StorageError):
        await b.flush()


async def test_discard_reads_zeros_even_partial_objects(settings, image):
    """LBPRZ=1: a discarded range reads back zeros, also where it covers only
    part of an object (librbd's default skips those)."""
    b = await _open(f"rbd:rbd/{image}", settings)
    try:
        await b.write(0, b"\xff" * (12 * MiB))
        await b.discard(512, 1024)              # inside one object
        await b.discard(4 * MiB - 4096, 8192)   # across an object boundary
        await b.discard(8 * MiB, 4 * MiB)       # a whole object
        got = await b.read(0, 12 * MiB)
        want = bytearray(b"\xff" * (12 * MiB))
        for off, n in ((512, 1024), (4 * MiB - 4096, 8192), (8 * MiB, 4 * MiB)):
            want[off:off + n] = bytes(n)
        assert got == want
        await b.write_zeroes(1 * MiB, 4096)
        assert await b.read(1 * MiB - 1, 4098) == b"\xff" + bytes(4096) + b"\xff"
    finally:
        await b.close()


async def test_allocation_reports_written_extents(settings, image, monkeypatch):
    b = await _open(f"rbd:rbd/{image}", settings)
    try:
        assert await b.allocation(0, 16 * MiB) == [(0, 16 * MiB, False)]
        await b.write(4 * MiB, b"\x01" * MiB)
        ext = await b.allocation(0, 16 * MiB)
        assert sum(n for _, n, _ in ext) == 16 * MiB and ext[0][0] == 0
        allocated = [(o, n) for o, n, a in ext if a]
        assert allocated and all(o <= 4 * MiB and o + n >= 5 * MiB for o, n in allocated), ext
        assert not any(a for o, n, a in ext if o + n <= 4 * MiB)
        await b.discard(4 * MiB, 4 * MiB)  # the whole object goes
        assert await b.allocation(0, 16 * MiB) == [(0, 16 * MiB, False)]
        assert await b.allocation(0, 0) == []
        # Beyond the scan window the rest is reported allocated (conservative).
        monkeypatch.setattr(rbdmod, "ALLOCATION_SCAN_MAX", 4 * MiB)
        assert await b.allocation(0, 16 * MiB) == [(0, 4 * MiB, False), (4 * MiB, 12 * MiB, True)]
    finally:
        await b.close()


async def test_concurrent_io(settings, image):
    """Many aio operations in flight at once, completions out of order."""
    b = await _open(f"rbd:rbd/{image}", settings)
    try:
        blocks = [os.urandom(64 * 1024) for _ in range(64)]
        await asyncio.gather(*(b.write(i * 65536, d) for i, d in enumerate(blocks)))
        reads = await asyncio.gather(*(b.read(i * 65536, 65536) for i in range(64)))
        assert reads == blocks
    finally:
        await b.close()


async def test_close_waits_for_inflight_and_cancelled_io(settings, image):
    b = await _open(f"rbd:rbd/{image}", settings)
    tasks = [asyncio.ensure_future(b.write(i * MiB, os.urandom(MiB))) for i in range(8)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    await b.close()  # does not return while librbd still holds an operation
    assert b._inflight == 0
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_create_with_size_layering_only_and_existing_size_wins(settings, ceph_cluster, caplog):
    _, rbd = import_rados_rbd()
    name = f"created-{os.getpid()}-{next(_names)}"
    with pytest.raises(StorageError, match="does not exist"):
        await _open(f"rbd:rbd/{name}", settings, create=True)  # no size: cannot create
    b = await _open(f"rbd:rbd/{name}", settings, size=8 * MiB, create=True)
    try:
        assert b.size == 8 * MiB
        assert b.image.features() == rbd.RBD_FEATURE_LAYERING
        assert b.fsid == ceph_cluster.fsid
        assert b.pool_id == ceph_cluster.rados().pool_lookup("rbd")
        assert isinstance(b.image_id, str) and b.image_id
        assert b.ioctx.get_pool_name() == "rbd"
        assert b.rados.get_fsid() == ceph_cluster.fsid
    finally:
        await b.close()
    # Existing image, another configured size: the image's size is used, with a warning.
    b = await _open(f"rbd:rbd/{name}", settings, size=32 * MiB, create=True)
    try:
        assert b.size == 8 * MiB
        assert "not the configured size" in caplog.text
    finally:
        await b.close()
    ceph_cluster.remove_image(name)


async def test_missing_pool_and_image(settings):
    with pytest.raises(StorageError, match="no pool"):
        await _open("rbd:nosuchpool/x", settings, size=MiB, create=True)
    with pytest.raises(StorageError, match="does not exist"):
        await _open("rbd:rbd/nosuchimage", settings)
    assert not rbdmod._connections  # failures give the connection back


async def test_one_connection_shared_and_released(settings, ceph_cluster):
    names = [f"shared-{os.getpid()}-{next(_names)}" for _ in range(2)]
    for n in names:
        ceph_cluster.create_image(n, MiB)
    a = await _open(f"rbd:rbd/{names[0]}", settings)
    b = await _open(f"rbd:rbd/{names[1]}", settings)
    assert a.rados is b.rados and len(rbdmod._connections) == 1
    await a.close()
    assert rbdmod._connections[settings].users == 1
    await b.close()
    assert not rbdmod._connections
    for n in names:
        ceph_cluster.remove_image(n)


async def test_resize_refresh_size(settings, ceph_cluster, image):
    b = await _open(f"rbd:rbd/{image}", settings, block_size=4096)
    try:
        await b.write(16 * MiB - 4096, b"\x07" * 4096)
        ceph_cluster.cli("rbd", "resize", "--size", "24M", f"rbd/{image}")
        assert await asyncio.to_thread(b.refresh_size) == 24 * MiB
        await b.write(24 * MiB - 4096, b"\x08" * 4096)
        assert await b.read(16 * MiB - 4096, 8192) == b"\x07" * 4096 + bytes(4096)
        # An image size that is not a whole number of blocks: the tail is unused.
        ceph_cluster.resize_image(image, 24 * MiB + 1000)
        assert await asyncio.to_thread(b.refresh_size) == 24 * MiB
        assert b.image_size == 24 * MiB + 1000
    finally:
        await b.close()


async def test_read_only(settings, ceph_cluster, image):
    ceph_cluster.resize_image(image, 16 * MiB)
    b = await _open(f"rbd:rbd/{image}", settings, read_only=True)
    try:
        with pytest.raises(StorageError):
            await b.write(0, b"x" * 512)
        with pytest.raises(StorageError):
            await b.discard(0, 512)
        await b.flush()  # nothing to do
        assert len(await b.read(0, 512)) == 512
    finally:
        await b.close()
    with pytest.raises(StorageError, match="read-only"):
        await _open("rbd:rbd/never-created", settings, size=MiB, create=True, read_only=True)


async def test_cancelled_write_ends_only_after_librbd_completed_it(settings, image, ceph_cluster):
    """An aborted WRITE must not land after the abort completed (a preempted
    node's write after PREEMPT AND ABORT): cancelling waits for librbd."""
    b = await _open(f"rbd:rbd/{image}", settings)
    try:
        data = os.urandom(MiB)
        task = asyncio.ensure_future(b.write(0, data))
        await asyncio.sleep(0)  # the aio write is issued
        assert b._inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b._inflight == 0  # completed before the cancelled command ended
        _, rbd = ceph_cluster.bindings()
        with ceph_cluster.rados().open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image) as img:
            assert img.read(0, MiB) == data
    finally:
        await b.close()
