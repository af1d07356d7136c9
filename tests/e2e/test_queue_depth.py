"""At least 128 commands in flight on one session (RFC 7143 §4.2.2.1 window)."""

from __future__ import annotations

import subprocess

from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, DataIn, ScsiCommand, ScsiResponse
from tests.conftest import require
from tests.support.initiator import Initiator
from tests.support.target import DATA


def test_128_pipelined_reads_all_answered(target):
    ini = Initiator(target.host, target.port, isid=bytes.fromhex("400001370020"))
    ini.login(DATA)
    ini.clear_unit_attentions()
    base = ini.cmdsn
    wire = b""
    for i in range(128):
        lba = i * 8
        cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, 8, 0])
        wire += ScsiCommand(flags=F_FINAL | F_READ | 1, itt=0x5000 + i, expected_length=4096, cmdsn=base + i,
                            expstatsn=ini.expstatsn, cdb=cdb.ljust(16, b"\0")).encode(0)
    ini.send_raw(wire)       # all 128 before reading a single answer
    done = {}
    while len(done) < 128:
        rec = ini.recv()
        pdu = rec.bhs
        if isinstance(pdu, (DataIn, ScsiResponse)) and (not isinstance(pdu, DataIn) or pdu.flags & 1):
            done[pdu.itt] = pdu.status
        max_cmdsn = pdu.maxcmdsn
    assert sorted(done) == [0x5000 + i for i in range(128)] and set(done.values()) == {0}
    assert (max_cmdsn - (base + 128)) & 0xFFFFFFFF >= 127      # the window reopened to 128
    ini.close()


def test_qemu_img_bench_queue_depth_128(target):
    out = subprocess.run([require("qemu-img"), "bench", "-c", "4096", "-d", "128", "-s", "4096", "--image-opts",
                          f"driver=iscsi,transport=tcp,portal={target.portal},target={DATA},lun=0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "128 in parallel" in out.stdout and "Run completed" in out.stdout, out.stdout
