"""The write journal: durable before acknowledgement, group commit, replay
after a crash (the process dies: what reached the files stays, nothing is
flushed), wrap-around, torn and stale records, discards not resurrected."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from pyiscsi_target.storage.base import StorageError
from pyiscsi_target.storage.cache import CacheBudget, CachedBackend
from pyiscsi_target.storage.file import open_image
from pyiscsi_target.storage.journal import DATA_START, RECORD_HEADER, Journal, JournalError

MiB = 1 << 20
IMG = 8 * MiB


async def open_lun(tmp_path, *, jsize=16 * MiB, age=3600.0, dirty_limit=None, start=True):
    img = open_image(tmp_path / "lun.img", size=IMG, create=True)
    j = await asyncio.to_thread(Journal.open, tmp_path / "lun.journal", jsize, img.size)
    replayed = await j.replay(img)
    c = CachedBackend(img, CacheBudget(32 * MiB), journal=j, max_dirty_age=age, dirty_limit=dirty_limit)
    if start:
        c.start()
    return c, replayed


async def crash(c: CachedBackend) -> None:
    """What kill -9 leaves: the flusher stops mid-way, nothing more is
    written or synced, the descriptors just close (the page cache keeps
    what was written, as it does for a killed process)."""
    if c._flusher is not None:
        c._flusher.cancel()
        try:
            await c._flusher
        except asyncio.CancelledError:
            pass
    j = c.journal
    if j._committer is not None:
        await asyncio.gather(j._committer, return_exceptions=True)
    os.close(j._fd)
    os.close(c.inner._fd)
    c.inner._fd = -1
    c._closed = True
    c.budget.caches.remove(c)


def image_bytes(tmp_path, off=0, n=IMG) -> bytes:
    with open(tmp_path / "lun.img", "rb") as f:
        f.seek(off)
        return f.read(n)


async def test_journal_lun_reports_wce0_and_is_not_switchable(tmp_path):
    c, _ = await open_lun(tmp_path)
    assert c.write_cache is False and c.mode == "journal"
    assert getattr(c, "set_write_cache", None) is None  # MODE SELECT cannot turn WCE on
    await c.close()


async def test_acknowledged_writes_survive_a_crash_without_write_out(tmp_path):
    c, _ = await open_lun(tmp_path)
    await c.write(4096, b"\x01" * 4096)
    await c.write(512, b"\x02" * 512)
    assert image_bytes(tmp_path, 0, 8192) == bytes(8192)  # the image was not touched
    await crash(c)
    c, (n, nbytes) = await open_lun(tmp_path)
    assert n == 2 and nbytes == 4608
    assert image_bytes(tmp_path, 0, 8192) == bytes(512) + b"\x02" * 512 + bytes(3072) + b"\x01" * 4096
    assert await c.read(4096, 4096) == b"\x01" * 4096
    await c.close()
    # Closed cleanly: nothing left to replay.
    c, (n, _) = await open_lun(tmp_path)
    assert n == 0
    await c.close()


async def test_group_commit(tmp_path):
    c, _ = await open_lun(tmp_path)
    await asyncio.gather(*(c.write(i * 4096, bytes([i]) * 4096) for i in range(64)))
    assert c.journal.stats["records"] == 64
    assert c.journal.stats["commits"] < 64  # fdatasyncs were shared
    await crash(c)
    c, (n, _) = await open_lun(tmp_path)
    assert n == 64
    for i in range(64):
        assert image_bytes(tmp_path, i * 4096, 4096) == bytes([i]) * 4096
    await c.close()


async def test_wrap_around_with_a_small_journal_under_load(tmp_path):
    """Four times the journal's capacity written at random: the tail must
    move (write-out + image fdatasync) and records wrap at the end."""
    rng = random.Random(3)
    c, _ = await open_lun(tmp_path, jsize=DATA_START + 2 * MiB, age=3600.0)
    model = bytearray(IMG)
    total = 0
    while total < 4 * c.journal.capacity:
        off = rng.randrange(0, IMG // 4096) * 4096
        data = rng.randbytes(rng.choice((512, 4096, 16384)))
        await asyncio.wait_for(c.write(off, data), 30)
        model[off : off + len(data)] = data
        total += len(data)
    assert c.journal.head > 3 * c.journal.capacity  # it wrapped
    await crash(c)
    c, _ = await open_lun(tmp_path, jsize=DATA_START + 2 * MiB)
    assert image_bytes(tmp_path) == bytes(model)
    await c.close()


async def test_torn_last_record_is_ignored_and_earlier_ones_kept(tmp_path):
    c, _ = await open_lun(tmp_path)
    await c.write(0, b"\x05" * 4096)
    await c.write(8192, b"\x06" * 4096)
    j = c.journal
    second = RECORD_HEADER + 4096  # position of the second record
    await crash(c)
    with open(tmp_path / "lun.journal", "r+b") as f:  # tear the second record's data
        f.seek(DATA_START + second + RECORD_HEADER + 100)
        f.write(b"\xff" * 10)
    c, (n, _) = await open_lun(tmp_path)
    assert n == 1
    assert image_bytes(tmp_path, 0, 4096) == b"\x05" * 4096
    assert image_bytes(tmp_path, 8192, 4096) == bytes(4096)
    await c.close()
    del j


async def test_records_of_an_earlier_generation_are_not_replayed(tmp_path):
    c, _ = await open_lun(tmp_path)
    await c.write(0, b"\x07" * 4096)
    await crash(c)
    c, (n, _) = await open_lun(tmp_path)  # replays, new generation, empty
    assert n == 1
    await crash(c)  # old records still in the file, behind the new tail
    with open(tmp_path / "lun.img", "r+b") as f:
        f.write(bytes(4096))  # if replayed again, they would rewrite this
    c, (n, _) = await open_lun(tmp_path)
    assert n == 0 and image_bytes(tmp_path, 0, 4096) == bytes(4096)
    await c.close()


async def test_discard_is_journaled_so_old_data_does_not_come_back(tmp_path):
    c, _ = await open_lun(tmp_path)
    await c.write(0, b"\x09" * 8192)
    await c.discard(0, 8192)
    await c.write(8192, b"\x0a" * 512)
    await crash(c)
    c, (n, _) = await open_lun(tmp_path)
    assert n == 3
    assert image_bytes(tmp_path, 0, 8704) == bytes(8192) + b"\x0a" * 512
    await c.close()


async def test_journal_of_another_image_is_refused(tmp_path):
    c, _ = await open_lun(tmp_path)
    await c.close()
    with pytest.raises(JournalError, match="another LUN"):
        Journal.open(tmp_path / "lun.journal", 16 * MiB, IMG * 2)
    (tmp_path / "junk").write_bytes(b"x" * (DATA_START + 10))
    with pytest.raises(JournalError, match="not a pyiscsi-target journal"):
        Journal.open(tmp_path / "junk", 16 * MiB, IMG)


async def test_journal_write_error_fails_the_write(tmp_path, monkeypatch):
    c, _ = await open_lun(tmp_path)
    real = os.fdatasync

    def failing(fd):
        if fd == c.journal._fd:
            raise OSError(5, "injected")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(StorageError):
        await c.write(0, b"\x01" * 4096)
    monkeypatch.setattr(os, "fdatasync", real)
    await c.write(0, b"\x02" * 4096)
    await c.close()
