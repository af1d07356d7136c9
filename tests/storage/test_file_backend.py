"""FileBackend against real files in tmp_path (ext4/xfs/tmpfs: punch-hole capable)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time

import pytest

from pyiscsi_target.storage import file as filemod
from pyiscsi_target.storage.base import Backend, StorageError
from pyiscsi_target.storage.file import FileBackend, create_image, open_image

MiB = 1 << 20


@pytest.fixture
async def img(tmp_path):
    b = open_image(tmp_path / "a.img", size=8 * MiB, create=True)
    yield b
    await b.close()


async def test_is_a_backend(tmp_path):
    b = open_image(tmp_path / "a.img", size=MiB, create=True)
    assert isinstance(b, Backend)
    assert b.write_cache is True  # page cache is volatile until fdatasync
    await b.close()


async def test_sparse_creation(tmp_path):
    p = tmp_path / "s.img"
    b = open_image(p, size=64 * MiB, create=True)
    st = os.stat(p)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < MiB  # nothing allocated
    assert b.size == 64 * MiB and b.thin
    await b.close()


async def test_preallocated_creation(tmp_path):
    p = tmp_path / "p.img"
    b = open_image(p, size=16 * MiB, create=True, preallocate=True)
    st = os.stat(p)
    assert st.st_size == 16 * MiB
    assert st.st_blocks * 512 >= 16 * MiB
    assert not b.thin
    await b.close()


def test_preallocate_falls_back_to_zeros(tmp_path, monkeypatch):
    def nope(*a):
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(os, "posix_fallocate", nope)
    p = tmp_path / "z.img"
    open_image(p, size=3 * MiB + 4096, create=True, preallocate=True)
    st = os.stat(p)
    assert st.st_size == 3 * MiB + 4096 and st.st_blocks * 512 >= 3 * MiB + 4096


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(size=MiB), "does not exist"),  # create not asked
        (dict(create=True), "size is needed"),
        (dict(size=MiB, create=True, read_only=True), "read-only"),
        (dict(size=1000, create=True), "multiple of the block size"),
        (dict(size=MiB + 512, create=True, block_size=4096), "multiple of the block size"),
    ],
)
def test_open_errors_missing(tmp_path, kwargs, needle):
    with pytest.raises(StorageError, match=needle):
        open_image(tmp_path / "missing.img", **kwargs)
    assert not (tmp_path / "missing.img").exists()


def test_existing_larger_than_config_is_refused(tmp_path):
    p = tmp_path / "big.img"
    p.write_bytes(b"x" * 8192)
    with pytest.raises(StorageError, match="refusing to shrink"):
        open_image(p, size=4096, create=True)
    assert p.stat().st_size == 8192


async def test_existing_smaller_is_extended_keeping_data(tmp_path):
    p = tmp_path / "small.img"
    p.write_bytes(b"A" * 4096)
    b = open_image(p, size=MiB, create=True)
    assert b.size == MiB and p.stat().st_size == MiB
    data = await b.read(0, 8192)
    assert data == b"A" * 4096 + bytes(4096)
    await b.close()


def test_existing_smaller_read_only_is_refused(tmp_path):
    p = tmp_path / "small.img"
    p.write_bytes(b"A" * 4096)
    with pytest.raises(StorageError, match="cannot be extended"):
        open_image(p, size=MiB, read_only=True)


async def test_existing_size_taken_from_file(tmp_path):
    p = tmp_path / "e.img"
    p.write_bytes(b"B" * 8192)
    b = open_image(p, size=None)
    assert b.size == 8192
    await b.close()
    p.write_bytes(b"B" * 1000)
    with pytest.raises(StorageError, match="multiple of the block size"):
        open_image(p, size=None)


def test_directory_is_refused(tmp_path):
    with pytest.raises(StorageError):
        open_image(tmp_path, size=None)


async def test_round_trip_and_holes(img):
    await img.write(4096, b"\x5a" * 8192)
    assert await img.read(4096, 8192) == b"\x5a" * 8192
    assert await img.read(0, 4096) == bytes(4096)  # hole
    assert await img.read(3 * MiB, 512) == bytes(512)
    # unaligned, across the data/hole border
    got = await img.read(4096 + 8192 - 100, 200)
    assert got == b"\x5a" * 100 + bytes(100)
    # memoryview input of a bigger buffer
    buf = bytearray(b"\x01" * 1024 + b"\x02" * 1024)
    await img.write(0, memoryview(buf)[1024:])
    assert await img.read(0, 1024) == b"\x02" * 1024


async def test_large_io_is_exact(img):
    data = os.urandom(3 * MiB + 512)
    await img.write(512, data)
    assert await img.read(512, len(data)) == data  # > INLINE_READ_MAX: pool path


async def test_data_reaches_the_file(img, tmp_path):
    await img.write(MiB, b"hello", fua=True)
    with open(tmp_path / "a.img", "rb") as f:
        f.seek(MiB)
        assert f.read(5) == b"hello"


async def test_fua_uses_dsync_or_fdatasync(img, monkeypatch):
    calls = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd, bufs, off, flags=0):
        calls.append(("pwritev", flags))
        return real_pwritev(fd, bufs, off, flags)

    def fdatasync(fd):
        calls.append(("fdatasync",))
        return real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await img.write(0, b"x" * 512, fua=True)
    if filemod._RWF_DSYNC:
        assert calls == [("pwritev", os.RWF_DSYNC)]
    else:  # pragma: no cover
        assert ("fdatasync",) in calls
    calls.clear()
    img._dsync_write = False
    await img.write(0, b"y" * 512, fua=True)
    assert calls == [("fdatasync",)]
    calls.clear()
    await img.write(0, b"z" * 512)  # no FUA: no sync at all
    assert calls == []
    await img.flush()
    assert calls == [("fdatasync",)]


async def test_dsync_unsupported_falls_back(img, monkeypatch):
    real_fdatasync = os.fdatasync
    synced = []

    def pwritev(fd, bufs, off, flags=0):
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
    await img.write(0, b"q" * 512, fua=True)
    assert synced and img._dsync_write is False
    assert await img.read(0, 512) == b"q" * 512


async def test_inline_read_partial_then_pool(img, monkeypatch):
    await img.write(0, bytes(range(256)) * 64)  # 16 KiB pattern
    real = os.preadv
    seen = []

    def preadv(fd, bufs, off, flags=0):
        seen.append((flags, threading.current_thread().name))
        if flags & filemod._RWF_NOWAIT:
            (mv,) = bufs
            return real(fd, [mv[:4096]], off)  # pretend only one page was cached
        return real(fd, bufs, off, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    got = await img.read(0, 16384)
    assert got == bytes(range(256)) * 64
    assert seen[0][0] == filemod._RWF_NOWAIT and seen[0][1] == threading.current_thread().name
    assert seen[1][0] == 0 and seen[1][1].startswith("pyiscsi-io")


async def test_inline_read_eagain_goes_to_pool(img, monkeypatch):
    await img.write(0, b"w" * 4096)
    real = os.preadv

    def preadv(fd, bufs, off, flags=0):
        if flags:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    assert await img.read(0, 4096) == b"w" * 4096
    assert img._nowait_read  # EAGAIN does not disable the fast path


async def test_read_of_truncated_image_is_storage_error(img, tmp_path):
    os.truncate(tmp_path / "a.img", MiB)
    with pytest.raises(StorageError) as ei:
        await img.read(2 * MiB, 4096)
    assert ei.value.errno == errno.EIO


async def test_io_errors_become_storage_errors(img, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", boom)
    with pytest.raises(StorageError) as ei:
        await img.write(0, b"x" * 512)
    assert ei.value.errno == errno.EIO and "a.img" in str(ei.value)
    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(StorageError):
        await img.flush()


@pytest.mark.parametrize("off, n", [(8 * MiB, 1), (8 * MiB - 512, 1024), (-1, 10)])
async def test_out_of_range(img, off, n):
    with pytest.raises(StorageError):
        await img.read(off, n)
    with pytest.raises(StorageError):
        await img.write(off, b"x" * n)


async def test_read_only(tmp_path):
    p = tmp_path / "ro.img"
    p.write_bytes(b"r" * 4096)
    b = open_image(p, read_only=True)
    assert await b.read(0, 4096) == b"r" * 4096
    for coro in (b.write(0, b"x"), b.discard(0, 512), b.write_zeroes(0, 512)):
        with pytest.raises(StorageError) as ei:
            await coro
        assert ei.value.errno == errno.EROFS
    await b.close()
    assert p.read_bytes() == b"r" * 4096


async def test_closed(tmp_path):
    b = open_image(tmp_path / "c.img", size=MiB, create=True)
    await b.close()
    await b.close()  # idempotent
    with pytest.raises(StorageError):
        await b.read(0, 512)
    with pytest.raises(StorageError):
        await b.flush()


async def test_close_waits_for_inflight_io(tmp_path, monkeypatch):
    b = open_image(tmp_path / "w.img", size=MiB, create=True)
    real = os.pwrite

    def slow(fd, data, off):
        time.sleep(0.2)
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", slow)
    w = asyncio.ensure_future(b.write(0, b"late" * 128))
    await asyncio.sleep(0.01)
    await b.close()
    await w  # must not have failed with EBADF
    assert (tmp_path / "w.img").read_bytes()[:4] == b"late"


def _blocks(p):
    return os.stat(p).st_blocks


async def test_discard_punches_a_hole(img, tmp_path):
    p = tmp_path / "a.img"
    await img.write(0, b"\xff" * (4 * MiB), fua=True)
    before = _blocks(p)
    assert before * 512 >= 4 * MiB
    await img.discard(MiB, 2 * MiB)
    after = _blocks(p)
    assert before - after >= (2 * MiB) // 512
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 3 * MiB
    finally:
        os.close(fd)
    assert await img.read(MiB, 2 * MiB) == bytes(2 * MiB)
    assert await img.read(0, MiB) == b"\xff" * MiB
    assert await img.read(3 * MiB, MiB) == b"\xff" * MiB


async def test_allocation_extents(img):
    size = img.size
    assert await img.allocation(0, size) == [(0, size, False)]
    await img.write(MiB, b"d" * MiB)
    await img.write(4 * MiB, b"e" * 4096)
    ext = await img.allocation(0, size)
    assert ext == [
        (0, MiB, False),
        (MiB, MiB, True),
        (2 * MiB, 2 * MiB, False),
        (4 * MiB, 4096, True),
        (4 * MiB + 4096, size - 4 * MiB - 4096, False),
    ]
    # a window clipped inside extents
    assert await img.allocation(MiB + 512, 1024) == [(MiB + 512, 1024, True)]
    assert await img.allocation(MiB - 512, 1024) == [(MiB - 512, 512, False), (MiB, 512, True)]
    # covers the whole range in order
    assert sum(n for _, n, _ in ext) == size


async def test_write_zeroes_thin_deallocates(img, tmp_path):
    await img.write(0, b"\x11" * (2 * MiB), fua=True)
    await img.write_zeroes(0, MiB)
    assert await img.read(0, MiB) == bytes(MiB)
    assert (await img.allocation(0, 2 * MiB))[0] == (0, MiB, False)


async def test_thick_discard_and_write_zeroes_keep_allocation(tmp_path):
    p = tmp_path / "t.img"
    b = open_image(p, size=4 * MiB, create=True, preallocate=True)
    await b.write(0, b"\x22" * (4 * MiB), fua=True)
    before = _blocks(p)
    await b.discard(0, MiB)
    await b.write_zeroes(MiB, MiB)
    assert await b.read(0, 2 * MiB) == bytes(2 * MiB)
    assert await b.read(2 * MiB, 4096) == b"\x22" * 4096
    assert _blocks(p) >= before - 8  # still allocated (thick)
    assert await b.allocation(0, 4 * MiB) == [(0, 4 * MiB, True)]
    await b.close()


async def test_discard_falls_back_when_punch_unsupported(img, monkeypatch):
    await img.write(0, b"\x33" * 8192)

    def nope(fd, mode, off, n):
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(filemod, "_fallocate_mode", nope)
    await img.discard(0, 4096)
    assert not img.thin
    assert await img.read(0, 8192) == bytes(4096) + b"\x33" * 4096


def test_create_image_refuses_overwrite(tmp_path):
    p = tmp_path / "n.img"
    create_image(p, 2 * MiB)
    assert p.stat().st_size == 2 * MiB
    p.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        create_image(p, 2 * MiB)
    assert p.read_bytes() == b"keep"
    create_image(p, MiB, force=True)
    assert p.stat().st_size == MiB


async def test_write_cache_off_makes_every_write_durable(img, monkeypatch):
    flags_seen = []
    real = os.pwritev

    def pwritev(fd, bufs, off, flags=0):
        flags_seen.append(flags)
        return real(fd, bufs, off, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "pwrite", lambda *a: pytest.fail("plain pwrite with the cache off"))
    img.set_write_cache(False)
    assert img.write_cache is False
    await img.write(0, b"d" * 512)
    assert flags_seen == [os.RWF_DSYNC]
    img.set_write_cache(True)
    monkeypatch.undo()
    assert img.write_cache is True


async def test_image_is_locked_against_a_second_writer(tmp_path):
    p = tmp_path / "l.img"
    a = open_image(p, size=MiB, create=True)
    with pytest.raises(StorageError, match="in use"):
        open_image(p, size=MiB, create=True)
    with pytest.raises(StorageError, match="in use"):
        open_image(p, read_only=True)
    await a.close()
    b = open_image(p, read_only=True)
    c = open_image(p, read_only=True)  # readers share
    with pytest.raises(StorageError, match="in use"):
        open_image(p)
    await b.close()
    await c.close()
    await open_image(p).close()


@pytest.fixture
def loopdev(tmp_path):
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.fail("needs root and losetup for a loop block device (CI runs as root)")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


async def test_block_device(loopdev):
    dev, backing = loopdev
    with pytest.raises(StorageError, match="block device holds"):
        open_image(dev, size=4 * MiB)
    b = open_image(dev, block_size=4096, create=False)
    assert (b.size, b.block_device, b.thin) == (8 * MiB, True, False)
    with pytest.raises(StorageError, match="busy"):
        open_image(dev)  # exclusive open
    await b.write(4096, b"\xab" * 4096, fua=True)
    assert await b.read(4096, 4096) == b"\xab" * 4096
    assert await b.allocation(0, b.size) == [(0, b.size, True)]
    await b.discard(4096, 4096)  # not thin: zeros written
    assert await b.read(4096, 4096) == bytes(4096)
    await b.close()


async def test_cancelled_write_ends_only_after_it_reached_the_image(img, monkeypatch):
    """An aborted WRITE (ABORT TASK, PREEMPT AND ABORT) must not change the
    image after the abort completed: cancelling waits for a pwrite already
    running in the pool."""
    img._in_memory = False  # through the pool even when tmp_path is tmpfs
    real = FileBackend._write_sync
    started = threading.Event()

    def slow_write(self, fd, mv, offset, fua):
        started.set()
        time.sleep(0.3)
        real(self, fd, mv, offset, fua)

    monkeypatch.setattr(FileBackend, "_write_sync", slow_write)
    task = asyncio.ensure_future(img.write(0, b"\x42" * 4096))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The write is on the image by the time the cancelled command ended.
    assert os.pread(img._fd, 4096, 0) == b"\x42" * 4096


async def test_zero_copy_read_keeps_its_bytes_across_a_later_write():
    """read_for_transfer on tmpfs: a FileRegion for large reads (sent with
    sendfile later), bytes for small ones; a write or close first makes every
    pending region take its bytes, so it still shows the data of the READ."""
    import tempfile

    from pyiscsi_target.payload import PENDING, FileRegion

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        b = open_image(os.path.join(d, "z.img"), size=8 * MiB, create=True)
        try:
            await b.write(0, b"\x01" * 65536)
            assert b.read_for_transfer(0, 4096) is None  # small: read the bytes (batched writev)
            region = b.read_for_transfer(0, 65536)
            assert isinstance(region, FileRegion) and len(region) == 65536 and region in PENDING
            await b.write(0, b"\x02" * 65536)          # after the READ completed
            assert region.materialize() == b"\x01" * 65536
            region.done()
            assert region not in PENDING
            late = b.read_for_transfer(65536, 65536)
        finally:
            await b.close()
        assert late.materialize() == bytes(65536)     # settled before the descriptor closed
        late.done()
