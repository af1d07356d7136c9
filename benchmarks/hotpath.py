"""Per-command CPU cost of the whole stack without sockets, and its profile.

    python benchmarks/hotpath.py [--commands 50000] [--profile]

Feeds pre-encoded 4 KiB READ(10)/WRITE(10) PDUs through the sans-IO
IscsiConnection and the real SCSI core over an in-memory backend, the way the
server does (eager start, output drained per batch of 32), and prints
microseconds per command.  With --profile, the top of a cProfile run — what
the note of the performance issue quotes.  No network and no disk: this is the
Python cost per command that bounds IOPS on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyiscsi_target.iscsi import keys  # noqa: E402
from pyiscsi_target.iscsi.connection import Execute, IscsiConnection  # noqa: E402
from pyiscsi_target.iscsi.framing import encode_pdu  # noqa: E402
from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, F_TRANSIT, F_WRITE, LoginRequest, ScsiCommand  # noqa: E402
from pyiscsi_target.iscsi.session import PortalContext, TargetEntry  # noqa: E402
from pyiscsi_target.scsi.lun import LogicalUnit, LuIdentity  # noqa: E402
from pyiscsi_target.scsi.target import ScsiTargetDevice  # noqa: E402
from pyiscsi_target.server import offers_from_config  # noqa: E402
from pyiscsi_target.config import IscsiConfig  # noqa: E402
from pyiscsi_target.storage.memory import MemoryBackend  # noqa: E402

IQN = "iqn.2026-11.org.example:hot"
QD = 32


def wire(hdr, data=b""):
    return b"".join(bytes(b) for b in encode_pdu(hdr.encode(len(data)), data))


async def run(n: int, write: bool) -> float:
    lu = LogicalUnit(0, MemoryBackend(64 << 20), LuIdentity("HOT0001", bytes.fromhex("6" + "0" * 31)))
    dev = ScsiTargetDevice(IQN, {0: lu})
    ctx = PortalContext(targets={IQN: TargetEntry(IQN, dev)}, offers=offers_from_config(IscsiConfig()),
                        nop_interval=0)
    conn = IscsiConnection(ctx, ("127.0.0.1", 3260), ("127.0.0.1", 5000))
    isid = bytes.fromhex("400001370000")
    conn.receive_data(wire(LoginRequest(flags=F_TRANSIT | 0x07, isid=isid, itt=1, cid=1, cmdsn=1),
                           keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", IQN),
                                             ("MaxRecvDataSegmentLength", "262144")])))
    conn.take_output()
    conn.take_actions()
    # clear the POWER ON unit attention
    dev.luns[0].unit_attentions.remove_nexus(conn.session.nexus)
    payload = bytes(4096)
    pdus = []
    for i in range(n):
        lba = (i * 8) % (64 << 11)
        cdb = bytes([0x2A if write else 0x28, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, 8, 0])
        flags = F_FINAL | 1 | (F_WRITE if write else F_READ)
        pdus.append(wire(ScsiCommand(flags=flags, itt=i, expected_length=4096, cmdsn=1 + i,
                                     cdb=cdb.ljust(16, b"\0")), payload if write else b""))
    done = 0

    def finished(itt, result):
        nonlocal done
        conn.scsi_done(itt, result)
        done += 1

    loop = asyncio.get_running_loop()   # handed to submit, as the server does
    t0 = time.process_time()   # CPU time: steadier than wall time on a shared machine
    for start in range(0, n, QD):
        conn.receive_data(b"".join(pdus[start:start + QD]))
        for a in conn.take_actions():
            if type(a) is Execute:
                a.device.submit(a.task, lambda r, itt=a.itt: finished(itt, r), loop)
        while done < min(n, start + QD):
            await asyncio.sleep(0)
        conn.take_output()
    return (time.process_time() - t0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=50000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    for write in (False, True):
        us = asyncio.run(run(args.commands, write))
        print(f"4 KiB {'WRITE' if write else 'READ '}(10): {us:6.1f} us/command  (~{1e6 / us:,.0f} commands/s on one core)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(run(args.commands // 2, False))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
