"""Keepalive and login timers on the live server (short values set in the config)."""

from __future__ import annotations

import time

from pyiscsi_target.iscsi.pdu import ALL_ONES, NopIn, NopOut
from tests.support.initiator import Initiator
from tests.support.target import DATA, free_port, start_target, write_config


def test_nop_in_pings_drop_a_silent_initiator_and_keep_a_live_one(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port, extra_server='nop_interval = "1s"\nnop_timeout = "1s"\nlogin_timeout = "1s"')
    t = start_target(cfg, "127.0.0.1", port)
    try:
        live = Initiator("127.0.0.1", port, isid=bytes.fromhex("400001370030"))
        live.login(DATA)
        dead = Initiator("127.0.0.1", port, isid=bytes.fromhex("400001370031"))
        dead.login(DATA)
        # The live one answers each ping with a NOP-Out carrying the ping's TTT (§11.18).
        pings = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            rec = live.recv()
            assert isinstance(rec.bhs, NopIn) and rec.bhs.itt == ALL_ONES and rec.bhs.ttt != ALL_ONES
            live.send(NopOut(itt=ALL_ONES, ttt=rec.bhs.ttt, cmdsn=live.cmdsn, expstatsn=live.expstatsn))
            pings += 1
        assert pings >= 2
        assert dead.closed_by_target(timeout=5)       # ignored its pings: dropped
        assert live.nop(b"alive") == b"alive"
        # A connection that never logs in is closed after login_timeout.
        idle = Initiator("127.0.0.1", port)
        assert idle.closed_by_target(timeout=5)
        for c in (live, dead, idle):
            c.close()
    finally:
        assert t.stop() == 0
    log = t.log_text()
    assert "no answer to NOP-In ping" in log
    assert "login not finished" in log
