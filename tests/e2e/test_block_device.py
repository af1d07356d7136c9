"""A raw block device (a loop device the test creates) exported as a LUN."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import require
from tests.support.target import free_port, start_target

MiB = 1024 * 1024


def test_loop_device_lun_round_trip_with_qemu(tmp_path):
    require("losetup")
    require("qemu-img")
    backing = tmp_path / "disk.raw"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        port = free_port()
        cfg = tmp_path / "blk.toml"
        cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[[target]]
iqn = "iqn.2026-11.test:blk"
  [[target.lun]]
  id = 0
  path = "{dev}"
  block_size = 4096
""")
        t = start_target(cfg, "127.0.0.1", port)
        try:
            out = subprocess.run([require("iscsi-readcapacity16"), f"iscsi://127.0.0.1:{port}/iqn.2026-11.test:blk/0"],
                                 capture_output=True, text=True, timeout=60)
            assert "RETURNED LOGICAL BLOCK ADDRESS:16383" in out.stdout, out.stdout + out.stderr
            assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in out.stdout
            src = tmp_path / "src.raw"
            src.write_bytes(os.urandom(8 * MiB))
            url = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target=iqn.2026-11.test:blk,lun=0"
            subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), url],
                           check=True, capture_output=True, timeout=120)
        finally:
            assert t.stop() == 0
        # What the initiator wrote is on the device itself.
        with open(dev, "rb") as f:
            assert f.read(8 * MiB) == src.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
