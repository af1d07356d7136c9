"""Reload removing a write-back LUN flushes its dirty data before the LUN goes."""

from __future__ import annotations

import os

from tests.e2e.ops_support import cli
from tests.support.initiator import Initiator
from tests.support.target import free_port, start_target

IQN = "iqn.2026-11.test:cached"


def config(port: int, with_lun1: bool) -> str:
    lun1 = """
  [[target.lun]]
  id = 1
  path = "luns/cached.img"
  size = "16MiB"
  cache = "write-back"
  max_dirty_age = "1h"
""" if with_lun1 else ""
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[cache]
size = "64MiB"
[[target]]
iqn = "{IQN}"
  [[target.lun]]
  id = 0
  path = "luns/plain.img"
  size = "16MiB"
{lun1}"""


def test_removing_a_write_back_lun_by_reload_flushes_it(tmp_path):
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(config(port, True))
    t = start_target(cfg, "127.0.0.1", port)
    try:
        ini = Initiator("127.0.0.1", port, isid=bytes.fromhex("400001370050"))
        ini.login(IQN)
        ini.clear_unit_attentions(1)
        payload = os.urandom(64 * 1024)
        # WRITE(10) of 128 blocks at LBA 2048, no FUA, no SYNCHRONIZE CACHE:
        # acknowledged from the cache (max_dirty_age 1h: nothing written out yet).
        r = ini.command(bytes([0x2A, 0, 0, 0, 0x08, 0, 0, 0, 128, 0]), lun=1, write=payload)
        assert r.status == 0
        with open(tmp_path / "luns" / "cached.img", "rb") as f:
            f.seek(2048 * 512)
            assert f.read(len(payload)) != payload          # still only in the cache
        cfg.write_text(config(port, False))
        p = cli("reload", cfg)
        assert p.returncode == 0, p.stderr
        with open(tmp_path / "luns" / "cached.img", "rb") as f:
            f.seek(2048 * 512)
            assert f.read(len(payload)) == payload          # flushed before the LUN left
        ini.close()
    finally:
        assert t.stop() == 0
