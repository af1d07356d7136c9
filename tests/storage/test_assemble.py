"""assemble.build_devices: config -> ScsiTargetDevice with FileBackend LUNs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyiscsi_target.assemble import AssembleError, build_devices, close_devices
from pyiscsi_target.config import ConfigError, load_config
from pyiscsi_target.storage.file import FileBackend

import pyiscsi_target.scsi.target  # noqa: F401  (the devices assembled below)

REPO = Path(__file__).resolve().parents[2]


def cfg(tmp_path: Path, extra: str = "") -> Path:
    text = (REPO / "config" / "example.toml").read_text().replace(
        'listen = ["0.0.0.0:3260", "[::]:3260"]', 'listen = ["127.0.0.1:3260"]'
    )
    # The example lives in config/ and points at ../luns and ../state.
    (tmp_path / "config").mkdir(exist_ok=True)
    p = tmp_path / "config" / "c.toml"
    p.write_text(text + extra)
    return p


async def test_build_devices_from_example(tmp_path):
    config = load_config(cfg(tmp_path))
    devs = await build_devices(config)
    try:
        assert list(devs) == ["iqn.2026-11.org.example:quorum", "iqn.2026-11.org.example:data"]
        q = devs["iqn.2026-11.org.example:quorum"]
        assert q.name == "iqn.2026-11.org.example:quorum"
        lu = q.luns[0]
        assert isinstance(lu.backend, FileBackend)
        assert lu.backend.size == 1 << 30 and lu.block_size == 512 and lu.backend.thin
        assert lu.num_blocks == (1 << 30) // 512
        d = devs["iqn.2026-11.org.example:data"].luns[0]
        assert d.backend.size == 16 << 30
        assert lu.identity.serial != d.identity.serial and lu.identity.naa != d.identity.naa
        st = os.stat(tmp_path / "luns" / "data.img")
        assert st.st_size == 16 << 30 and st.st_blocks * 512 < (1 << 20)  # sparse
    finally:
        await close_devices(devs)
    assert lu.backend._fd == -1  # closed


async def test_identity_survives_a_restart(tmp_path):
    config = load_config(cfg(tmp_path))
    devs = await build_devices(config)
    first = {iqn: dev.luns[0].identity for iqn, dev in devs.items()}
    await close_devices(devs)
    devs = await build_devices(load_config(cfg(tmp_path)))  # "restart": config reloaded
    try:
        assert {iqn: dev.luns[0].identity for iqn, dev in devs.items()} == first
    finally:
        await close_devices(devs)


async def test_lun_options_reach_the_logical_unit(tmp_path):
    extra = '\n  [[target.lun]]\n  id = 5\n  path = "luns/ssd.img"\n  size = "4MiB"\n  block_size = 4096\n' \
            '  preallocate = true\n  serial = "SSD-5"\n  rotation_rate = 1\n'
    devs = await build_devices(load_config(cfg(tmp_path, extra)))
    try:
        lu = devs["iqn.2026-11.org.example:data"].luns[5]
        assert (lu.block_size, lu.rotation_rate, lu.identity.serial, lu.backend.thin) == (4096, 1, "SSD-5", False)
        assert lu.num_blocks == 1024
    finally:
        await close_devices(devs)


async def test_failure_names_the_lun_and_closes_what_was_opened(tmp_path):
    config = load_config(cfg(tmp_path))
    (tmp_path / "luns").mkdir()
    # data.img appears after validation, larger than configured: refused at open
    with open(tmp_path / "luns" / "data.img", "wb") as f:
        f.truncate(32 << 30)
    with pytest.raises(AssembleError) as ei:
        await build_devices(config)
    assert isinstance(ei.value, ConfigError)
    msg = str(ei.value)
    assert "iqn.2026-11.org.example:data LUN 0" in msg and "refusing to shrink" in msg
    # the quorum image opened before the failure was closed (its lock released)
    os.truncate(tmp_path / "luns" / "data.img", 16 << 30)
    devs = await build_devices(config)
    await close_devices(devs)
