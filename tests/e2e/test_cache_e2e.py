"""The cache in the real server process, driven over iSCSI.

* two initiators on one write-back LUN read each other's writes at once;
* SIGTERM writes the cache out before the process exits;
* MODE SELECT WCE=0 flushes and turns the LU write-through: a kill -9 right
  after a write then loses nothing (the cache lives in the process);
* a journal LU reports WCE=0, not changeable; its writes survive kill -9.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.initiator import Initiator
from tests.support.target import free_port, start_target

IQN = "iqn.2026-11.org.example:cached"
BS = 512


def write_cache_config(d: Path, port: int, *, age: str = "1h") -> Path:
    cfg = d / "target.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
nop_interval = 0

[cache]
size = "64MiB"
max_dirty_age = "{age}"

[[target]]
iqn = "{IQN}"
  [[target.lun]]
  id = 0
  path = "luns/wb.img"
  size = "16MiB"
  cache = "write-back"
  [[target.lun]]
  id = 1
  path = "luns/journal.img"
  size = "16MiB"
  journal = "journals/lun1.journal"
  journal_size = "16MiB"
""")
    return cfg


def w10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return bytes([0x2A, 0x08 if fua else 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def r10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def sync10() -> bytes:
    return bytes([0x35]) + bytes(9)


def connect(port: int, name: str = "iqn.2026-11.test:a", isid: bytes = bytes.fromhex("400001370000")) -> Initiator:
    ini = Initiator("127.0.0.1", port, name=name, isid=isid)
    ini.login(IQN)
    for lun in (0, 1):
        ini.clear_unit_attentions(lun)
    return ini


def ok(r) -> None:
    assert r.status == 0, (r.status, r.sense.hex())


def caching_page(ini: Initiator, lun: int, pc: int = 0) -> bytes:
    r = ini.command(bytes([0x1A, 0x08, (pc << 6) | 0x08, 0, 255, 0]), lun=lun, read=255)
    ok(r)
    return r.data[4:]


@pytest.fixture
def served(tmp_path):
    port = free_port()
    cfg = write_cache_config(tmp_path, port)
    t = start_target(cfg, "127.0.0.1", port)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()  # by PID: only the process this test started
        t.proc.wait()


def test_two_initiators_read_each_others_writes(served):
    a = connect(served.port, "iqn.2026-11.test:a")
    b = connect(served.port, "iqn.2026-11.test:b", bytes.fromhex("400001370001"))
    for lun in (0, 1):
        da = os.urandom(8 * BS)
        ok(a.command(w10(100, 8), lun=lun, write=da))
        assert b.command(r10(100, 8), lun=lun, read=8 * BS).data == da
        db = os.urandom(3 * BS)
        ok(b.command(w10(101, 3), lun=lun, write=db))  # sub-page, overlapping
        assert a.command(r10(100, 8), lun=lun, read=8 * BS).data == da[:BS] + db + da[4 * BS :]
    a.close()
    b.close()
    assert served.stop() == 0


def test_sigterm_writes_the_cache_out(served, tmp_path):
    a = connect(served.port)
    data = os.urandom(64 * BS)
    ok(a.command(w10(2048, 64), lun=0, write=data))  # no SYNCHRONIZE CACHE
    img = tmp_path / "luns" / "wb.img"
    assert img.read_bytes()[2048 * BS : 2112 * BS] != data  # only in the cache (max_dirty_age 1h)
    a.close()
    assert served.stop(signal.SIGTERM) == 0
    assert img.read_bytes()[2048 * BS : 2112 * BS] == data


def test_mode_select_wce0_makes_writes_durable(served, tmp_path):
    a = connect(served.port)
    page = bytearray(caching_page(a, 0))
    assert page[2] & 0x04 and caching_page(a, 0, pc=1)[2] & 0x04  # WCE=1, changeable
    before = os.urandom(8 * BS)
    ok(a.command(w10(10, 8), lun=0, write=before))  # cached only
    page[2] &= ~0x04
    params = bytes(4) + bytes(page)
    ok(a.command(bytes([0x15, 0x10, 0, 0, len(params), 0]), lun=0, write=params))
    assert not caching_page(a, 0)[2] & 0x04
    after = os.urandom(8 * BS)
    ok(a.command(w10(30, 8), lun=0, write=after))  # write-through now
    served.proc.send_signal(signal.SIGKILL)  # the cache dies with the process
    served.proc.wait()
    raw = (tmp_path / "luns" / "wb.img").read_bytes()
    assert raw[10 * BS : 18 * BS] == before  # flushed by the MODE SELECT
    assert raw[30 * BS : 38 * BS] == after


def test_journal_lun_reports_wce0_and_survives_kill(served, tmp_path):
    a = connect(served.port)
    assert not caching_page(a, 1)[2] & 0x04
    assert not caching_page(a, 1, pc=1)[2] & 0x04  # not changeable
    data = os.urandom(16 * BS)
    ok(a.command(w10(500, 16), lun=1, write=data))
    served.proc.send_signal(signal.SIGKILL)
    served.proc.wait()
    t = start_target(served.config, "127.0.0.1", served.port, log_name="server2.log")
    try:
        assert "replayed" in t.log_text()
        b = connect(served.port)
        assert b.command(r10(500, 16), lun=1, read=16 * BS).data == data
        b.close()
        assert t.stop() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
