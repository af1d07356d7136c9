"""The non-Linux paths, forced on Linux: what Windows (and other POSIX
systems) run.  No preadv/pwritev/RWF_* flags, no fallocate/posix_fallocate,
no SEEK_DATA, no flock (fcntl), no pread/pwrite/fdatasync (lseek+read/write
under a lock, fsync), no SIGHUP and no loop signal handlers: reads, writes,
FUA, discard, write zeroes, allocation, the journal and a whole served
session still work.  Tripwires make sure the Linux calls are not used."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from pyiscsi_target.storage import file as filemod
from pyiscsi_target.storage import journal as journalmod
from pyiscsi_target.storage import portable
from pyiscsi_target.storage.cache import CacheBudget, CachedBackend
from pyiscsi_target.storage.file import open_image
from pyiscsi_target.storage.journal import Journal

MiB = 1 << 20


@pytest.fixture
def no_linux_calls(monkeypatch):
    """Flip every capability flag to 'absent' and trip on the real calls."""
    for name, value in (("_HAVE_PREADV", False), ("_HAVE_PWRITEV", False), ("_RWF_NOWAIT", 0),
                        ("_RWF_DSYNC", 0), ("_fallocate", None), ("fcntl", None)):
        monkeypatch.setattr(filemod, name, value)
    monkeypatch.setattr(journalmod, "_HAVE_PWRITEV", False)
    for name in ("_HAVE_PREAD", "_HAVE_PWRITE", "_HAVE_FDATASYNC"):
        monkeypatch.setattr(portable, name, False)
    for name in ("SEEK_DATA", "SEEK_HOLE", "posix_fallocate"):
        monkeypatch.delattr(os, name)

    def tripwire(name):
        def f(*a, **k):
            raise AssertionError(f"os.{name} used although the platform is said not to have it")
        return f

    for name in ("preadv", "pwritev", "pread", "pwrite", "fdatasync"):
        monkeypatch.setattr(os, name, tripwire(name))
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    return fsyncs


def file_bytes(path, off, n) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


async def test_file_backend_without_linux_calls(tmp_path, no_linux_calls):
    fsyncs = no_linux_calls
    p = tmp_path / "lun.img"
    b = open_image(p, size=16 * MiB, create=True)
    assert b.thin is False and not b._nowait_read and not b._dsync_write   # no hole punching: thick
    rnd = random.Random(9)
    model = bytearray(16 * MiB)
    # many writes at once: the per-descriptor lock keeps lseek+write pairs apart
    writes = []
    for _ in range(64):
        off = rnd.randrange(0, 16 * MiB // 512 - 256) * 512
        data = rnd.randbytes(rnd.choice((512, 4096, 65536, 2 * MiB)))
        data = data[: min(len(data), 16 * MiB - off)]
        model[off:off + len(data)] = data
        writes.append((off, data))
    for off, data in writes:  # sequential model order: overlapping writes must land in order
        await b.write(off, data)
    reads = [(rnd.randrange(0, 16 * MiB - 70000), rnd.choice((512, 65536))) for _ in range(64)]
    got = await asyncio.gather(*(b.read(o, n) for o, n in reads))
    for (o, n), g in zip(reads, got):
        assert bytes(g) == bytes(model[o:o + n])
    assert bytes(await b.read(3 * MiB, 2 * MiB)) == bytes(model[3 * MiB:5 * MiB])   # a pool read, big

    n = len(fsyncs)
    await b.write(8 * MiB, b"\x11" * 4096, fua=True)   # FUA: fsync instead of RWF_DSYNC/fdatasync
    model[8 * MiB:8 * MiB + 4096] = b"\x11" * 4096
    assert len(fsyncs) > n
    await b.writev(9 * MiB, [memoryview(b"\x22" * 512), memoryview(b"\x33" * 1024)])  # pwrite per buffer
    model[9 * MiB:9 * MiB + 1536] = b"\x22" * 512 + b"\x33" * 1024
    await b.flush()

    await b.discard(1 * MiB, 64 * 1024)          # zeros written (no fallocate)
    await b.write_zeroes(2 * MiB, 8192)
    model[1 * MiB:1 * MiB + 65536] = bytes(65536)
    model[2 * MiB:2 * MiB + 8192] = bytes(8192)
    assert await b.allocation(0, 16 * MiB) == [(0, 16 * MiB, True)]   # no SEEK_DATA: all allocated
    assert bytes(await b.read(0, 16 * MiB)) == bytes(model)
    await b.close()
    assert file_bytes(p, 0, 16 * MiB) == bytes(model)


async def test_preallocated_image_without_fallocate(tmp_path, no_linux_calls):
    p = tmp_path / "thick.img"
    b = open_image(p, size=4 * MiB, create=True, preallocate=True)
    assert os.stat(p).st_size == 4 * MiB and os.stat(p).st_blocks * 512 >= 4 * MiB   # zeros written
    await b.write(4 * MiB - 512, b"z" * 512)
    await b.close()
    b = open_image(p, size=4 * MiB)          # reopen without flock
    assert bytes(await b.read(4 * MiB - 1024, 1024)) == bytes(512) + b"z" * 512
    await b.close()


async def test_journal_without_linux_calls(tmp_path, no_linux_calls):
    img = open_image(tmp_path / "lun.img", size=8 * MiB, create=True)
    j = await asyncio.to_thread(Journal.open, tmp_path / "lun.journal", 16 * MiB, img.size)
    await j.replay(img)
    c = CachedBackend(img, CacheBudget(32 * MiB), journal=j, max_dirty_age=3600.0)
    c.start()
    data = random.Random(4).randbytes(256 * 1024)
    await c.write(4096, data)
    await c.write(1 * MiB, b"\x7f" * 4096, fua=True)
    assert bytes(await c.read(4096, len(data))) == data
    await c.close()
    assert file_bytes(tmp_path / "lun.img", 4096, len(data)) == data
    assert file_bytes(tmp_path / "lun.img", 1 * MiB, 4096) == b"\x7f" * 4096
    # reopened and replayed with the fallbacks too
    img = open_image(tmp_path / "lun.img", size=8 * MiB)
    j = await asyncio.to_thread(Journal.open, tmp_path / "lun.journal", 16 * MiB, img.size)
    await j.replay(img)
    await j.close()
    await img.close()


async def test_served_without_signal_handlers_or_sighup(tmp_path, no_linux_calls, monkeypatch, caplog):
    """Windows' event loop has no add_signal_handler and signal has no SIGHUP:
    the server still starts, serves a session (READ/WRITE), answers status
    over the TCP admin transport, and stops cleanly."""
    from pyiscsi_target import admin as adminmod
    from pyiscsi_target.config import load_config
    from pyiscsi_target.server import serve
    from tests.e2e.ops_support import read10, write10
    from tests.support.initiator import Initiator
    from tests.support.target import DATA, free_port, write_config

    monkeypatch.delattr(signal, "SIGHUP")
    loop = asyncio.get_running_loop()

    def no_signals(*a, **k):
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_signal_handler", no_signals)
    monkeypatch.setattr(loop, "remove_signal_handler", no_signals)
    port, aport = free_port(), free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text() + f'\n[admin]\ntransport = "tcp"\nlisten = "127.0.0.1:{aport}"\n')
    config = load_config(cfg)
    caplog.set_level("INFO", logger="pyiscsi_target")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop))

    async def listening() -> None:
        deadline = loop.time() + 30
        while True:
            assert not task.done(), f"serve ended early: {task.result()}\n{caplog.text[-3000:]}"
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                assert loop.time() < deadline, caplog.text[-3000:]
                await asyncio.sleep(0.05)

    def client() -> bytes:
        ini = Initiator("127.0.0.1", port, name="iqn.1991-05.com.microsoft:node1")
        try:
            ini.login(DATA)
            ini.clear_unit_attentions()
            assert write10(ini, 100, b"\xc3" * 4096).status == 0
            r = read10(ini, 100, 8)
            assert r.status == 0
            st = adminmod.request(adminmod.endpoint_for_config(cfg), "status", timeout=10)
            assert st["ok"] and any(s["initiator"] == "iqn.1991-05.com.microsoft:node1" for s in st["status"]["sessions"])
            return r.data
        finally:
            ini.close()

    try:
        await listening()
        data = await asyncio.to_thread(client)
    finally:
        stop.set()
        rc = await asyncio.wait_for(task, 30)
    assert data == b"\xc3" * 4096 and rc == 0, caplog.text[-3000:]
    assert file_bytes(tmp_path / "luns" / "data.img", 100 * 512, 4096) == b"\xc3" * 4096


WINDOWS_LIKE = r"""
import asyncio, signal, sys
sys.modules["uvloop"] = None                     # not on Windows: plain asyncio.run
del signal.SIGHUP                                # no SIGHUP on Windows
def _none(self, *a, **k):
    raise NotImplementedError                    # ProactorEventLoop has no signal handlers
asyncio.AbstractEventLoop.add_signal_handler = _none
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = _none
asyncio.unix_events._UnixSelectorEventLoop.remove_signal_handler = _none
from pyiscsi_target.cli import main
sys.exit(main(["serve", sys.argv[1]]))
"""


def test_ctrl_c_without_signal_handlers_flushes_write_back(tmp_path):
    """How a Windows service stops (NSSM sends Ctrl-C): with no loop signal
    handlers asyncio.run cancels the main task; serve still closes sessions
    and flushes the write-back cache, and exits 0."""
    import signal as _signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.e2e.ops_support import write10
    from tests.support.initiator import Initiator
    from tests.support.target import DATA, free_port, write_config

    port = free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text().replace('path = "luns/data.img"',
                                           'path = "luns/data.img"\n  cache = "write-back"\n  max_dirty_age = "1h"'))
    script = tmp_path / "windows_like.py"
    script.write_text(WINDOWS_LIKE)
    repo = Path(__file__).resolve().parents[2]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), str(cfg)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        import socket
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        ini = Initiator("127.0.0.1", port, name="iqn.1991-05.com.microsoft:node1")
        ini.login(DATA)
        ini.clear_unit_attentions()
        assert write10(ini, 2048, b"\x5a" * 65536).status == 0     # acknowledged from the cache
        assert file_bytes(tmp_path / "luns" / "data.img", 2048 * 512, 65536) != b"\x5a" * 65536  # still dirty
        proc.send_signal(_signal.SIGINT)                           # Ctrl-C
        rc = proc.wait(60)
        ini.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert rc == 0, text
    assert "interrupted" in text and "stopped" in text
    assert file_bytes(tmp_path / "luns" / "data.img", 2048 * 512, 65536) == b"\x5a" * 65536
