"""A client that stops reading cannot make the server buffer unbounded Data-In."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, DataIn, ScsiCommand, ScsiResponse
from tests.support.initiator import Initiator
from tests.support.target import DATA

MiB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_unread_reads_stay_within_the_budget_then_all_complete(target):
    ini = Initiator(target.host, target.port, isid=bytes.fromhex("400001370040"))
    ini.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    ini.login(DATA)
    ini.clear_unit_attentions()
    before = rss(target.proc.pid)
    n, size = 128, 4 * MiB                     # 512 MiB of Data-In owed
    wire = b""
    for i in range(n):
        lba = (i % 32) * (size // 512)
        cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + (size // 512).to_bytes(2, "big") + b"\0"
        wire += ScsiCommand(flags=F_FINAL | F_READ | 1, itt=0x7000 + i, expected_length=size,
                            cmdsn=ini.cmdsn + i, expstatsn=ini.expstatsn, cdb=cdb.ljust(16, b"\0")).encode(0)
    ini.send_raw(wire)
    peak = before
    for _ in range(20):                        # 2 s without reading a byte
        time.sleep(0.1)
        peak = max(peak, rss(target.proc.pid))
    # READ_BUDGET (64 MiB) plus one command and the transport's buffer, far below 512 MiB.
    assert peak - before < 160 * MiB, (before, peak)
    done = set()
    got = 0
    while len(done) < n:
        rec = ini.recv()
        if isinstance(rec.bhs, DataIn):
            got += len(rec.data)
        if isinstance(rec.bhs, (DataIn, ScsiResponse)) and (not isinstance(rec.bhs, DataIn) or rec.bhs.flags & 1):
            assert rec.bhs.status == 0
            done.add(rec.bhs.itt)
    assert got == n * size
    ini.close()
