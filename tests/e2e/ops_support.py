"""Helpers for the operations tests (status, reload, dashboard): the CLI as a
user runs it, a long-lived libiscsi session, SCSI CDBs for our test initiator."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """``pyiscsi-target ARGS`` from this checkout (not whatever is installed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pyiscsi_target", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def status(config: Path) -> dict:
    p = cli("status", config, "--json")
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class LibiscsiSession:
    """A real libiscsi session kept open: qemu-storage-daemon with an iscsi
    blockdev logs in and stays logged in until it is stopped (by PID)."""

    def __init__(self, portal: str, iqn: str, lun: int, initiator: str, workdir: Path):
        require("qemu-storage-daemon")
        host, port = portal.rsplit(":", 1)
        self.log = workdir / f"qsd-{initiator.rsplit(':', 1)[-1]}.log"
        fh = open(self.log, "wb")
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev",
             f"driver=iscsi,node-name=d0,transport=tcp,portal={host}:{port},target={iqn},lun={lun},"
             f"initiator-name={initiator}"],
            stdout=fh, stderr=subprocess.STDOUT)
        fh.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cdb_read_capacity16() -> bytes:
    return bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)


def capacity(ini, lun: int = 0) -> tuple[int, int]:
    """(number of blocks, block size) by READ CAPACITY(16) on our initiator."""
    r = ini.command(cdb_read_capacity16(), lun=lun, read=32)
    assert r.status == 0, r
    last, bs = struct.unpack_from(">QI", r.data)
    return last + 1, bs


def pr_out(ini, sa: int, key: int = 0, sark: int = 0, type_: int = 0, lun: int = 0):
    params = struct.pack(">QQ", key, sark) + bytes(8)
    cdb = bytes([0x5F, sa, type_ & 0x0F, 0, 0]) + struct.pack(">I", len(params)) + bytes(1)
    return ini.command(cdb, lun=lun, write=params)


def write10(ini, lba: int, data: bytes, lun: int = 0, block_size: int = 512):
    cdb = bytes([0x2A, 0]) + struct.pack(">I", lba) + bytes(1) + struct.pack(">H", len(data) // block_size) + bytes(1)
    return ini.command(cdb, lun=lun, write=data)


def read10(ini, lba: int, blocks: int, lun: int = 0, block_size: int = 512):
    cdb = bytes([0x28, 0]) + struct.pack(">I", lba) + bytes(1) + struct.pack(">H", blocks) + bytes(1)
    return ini.command(cdb, lun=lun, read=blocks * block_size)
