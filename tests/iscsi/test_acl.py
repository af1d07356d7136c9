"""Access control: initiator names and networks at login, discovery filtering, LUN masking, limits."""

from __future__ import annotations

import asyncio

import pytest

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.acl import AccessList, LunMask, NamePatterns, initiator_from_port, parse_network
from pyiscsi_target.iscsi.connection import Phase
from pyiscsi_target.iscsi.limits import MAX_DELAY, ConnectionLimiter, source_key
from pyiscsi_target.iscsi.pdu import TextRequest
from pyiscsi_target.iscsi.session import TargetEntry
from tests.iscsi.harness import TARGET, RecordingDevice, Wire, make_ctx

OTHER = "iqn.2026-11.test:other"
WIN = "iqn.1991-05.com.microsoft:node1.example.com"


def status(rsp) -> int:
    return rsp.status_class << 8 | rsp.status_detail


# -- the lists themselves ------------------------------------------------------------

@pytest.mark.parametrize("patterns,name,ok", [
    (["iqn.1991-05.com.microsoft:*"], WIN, True),
    (["iqn.1991-05.com.microsoft:*"], "iqn.2026-11.test:x", False),
    ([WIN.upper()], WIN, True),                         # iSCSI names are case-insensitive
    (["iqn.2026-11.test:node?"], "iqn.2026-11.test:node1", True),
    (["iqn.2026-11.test:node?"], "iqn.2026-11.test:node10", False),
    (["iqn.2026-11.test:a"], "iqn.2026-11.test:ab", False),   # exact means exact
])
def test_name_patterns(patterns, name, ok):
    assert NamePatterns(tuple(patterns)).matches(name) is ok


@pytest.mark.parametrize("nets,host,ok", [
    (["10.0.0.0/24"], "10.0.0.7", True),
    (["10.0.0.0/24"], "10.0.1.7", False),
    (["10.0.0.0/24"], "::ffff:10.0.0.7", True),        # IPv4 peer on a dual-stack socket
    (["fd00::/64"], "fd00::1234", True),
    (["fd00::/64"], "fd00:0:0:1::1", False),
    (["fd00::/64"], "fe80::1%eth0", False),
    (["127.0.0.1/32", "::1/128"], "::1", True),
    (["10.0.0.0/8"], "not-an-address", False),
])
def test_networks(nets, host, ok):
    assert AccessList.build((), nets).allows_address(host) is ok


def test_network_syntax():
    with pytest.raises(ValueError, match="not a network"):
        parse_network("10.0.0.1/24")     # host bits set
    with pytest.raises(ValueError):
        parse_network("10.0.0.0/33")


def test_both_axes_must_match():
    acl = AccessList.build(["iqn.2026-11.test:init"], ["127.0.0.0/8"])
    assert acl.allows("iqn.2026-11.test:init", "127.0.0.1")
    assert not acl.allows("iqn.2026-11.test:init", "10.0.0.1")
    assert not acl.allows("iqn.2026-11.test:x", "127.0.0.1")
    assert AccessList.build().allows("anything", "1.2.3.4")


def test_lun_mask():
    mask = LunMask({1: NamePatterns(("iqn.2026-11.test:a",))})
    assert mask.visible([0, 1, 2], "iqn.2026-11.test:a") == {0, 1, 2}
    assert mask.visible([0, 1, 2], "iqn.2026-11.test:b") == {0, 2}
    assert LunMask().visible([0, 1], "x") is None
    assert initiator_from_port("iqn.2026-11.test:a,i,0x400001370000") == "iqn.2026-11.test:a"


# -- at login --------------------------------------------------------------------------

def acl_ctx(initiators=(), networks=()):
    ctx = make_ctx()
    ctx.targets[TARGET].acl = AccessList.build(initiators, networks)
    ctx.targets[OTHER] = TargetEntry(OTHER, RecordingDevice())
    return ctx


def test_allowed_initiator_logs_in():
    w = Wire(acl_ctx(["iqn.2026-11.test:*"], ["127.0.0.0/8"]))
    w.login()
    assert w.conn.phase is Phase.FULL_FEATURE


@pytest.mark.parametrize("inits,nets,why", [
    (["iqn.2026-11.test:someone-else"], (), "initiator name"),
    ((), ["10.0.0.0/8"], "source address"),
])
def test_refused_initiator_gets_authorization_failure(inits, nets, why, caplog):
    w = Wire(acl_ctx(inits, nets))
    r = w.login()
    assert status(r[0][0]) == 0x0202
    line = [m for m in caplog.messages if "login refused" in m]
    assert len(line) == 1 and why in line[0] and "iqn.2026-11.test:init from 127.0.0.1:40000" in line[0]


def test_acl_is_checked_before_chap():
    """An outsider never gets a CHAP challenge to work on."""
    from pyiscsi_target.iscsi.chap import ChapCredentials
    ctx = acl_ctx(["iqn.2026-11.test:friend"])
    ctx.targets[TARGET].chap = ChapCredentials("u", b"0123456789ab")
    w = Wire(ctx)
    r = w.login(sec=[("AuthMethod", "CHAP")])
    assert status(r[0][0]) == 0x0202


def _discover(w, value="All"):
    w.login(target=None, session_type="Discovery")
    r = w.send(TextRequest(itt=5, cmdsn=1, expstatsn=2), keys.encode_text([("SendTargets", value)]))
    return [v for k, v in keys.decode_text(r[0][1]) if k == "TargetName"]


def test_discovery_lists_only_reachable_targets():
    ctx = acl_ctx(["iqn.2026-11.test:friend"])
    assert _discover(Wire(ctx)) == [OTHER]
    assert _discover(Wire(ctx), TARGET) == []
    ctx2 = acl_ctx(["iqn.2026-11.test:init"])
    assert _discover(Wire(ctx2)) == sorted([TARGET, OTHER])


# -- LUN masking in the SCSI core -------------------------------------------------------

def test_lun_masking_in_scsi_core(tmp_path):
    from pyiscsi_target.assemble import lun_view
    from pyiscsi_target.config import LunConfig, TargetConfig
    from pyiscsi_target.scsi.command import Nexus, ScsiTask, TaskAttribute
    from pyiscsi_target.scsi.lun import LogicalUnit, LuIdentity
    from pyiscsi_target.scsi.target import ScsiTargetDevice
    from pyiscsi_target.storage.memory import MemoryBackend

    t = TargetConfig(TARGET, luns=(LunConfig(0, tmp_path / "a"), LunConfig(1, tmp_path / "b",
                                                                          initiators=("iqn.2026-11.test:a",))))
    luns = {i: LogicalUnit(i, MemoryBackend(1 << 20), LuIdentity(serial=f"S{i}", naa=bytes([0x60]) + bytes(15))) for i in (0, 1)}
    dev = ScsiTargetDevice(TARGET, luns, lun_view=lun_view(t))
    a = Nexus("iqn.2026-11.test:a,i,0x01", "t")
    b = Nexus("iqn.2026-11.test:b,i,0x01", "t")

    async def run():
        out = {}
        for n in (a, b):
            dev.add_nexus(n)
            for lu in (0, 1):
                while True:      # clear the power-on UA
                    r = await dev.execute(ScsiTask(n, lu, bytes(6), 1, TaskAttribute.SIMPLE, b"", 0))
                    if not (r.status == 2 and r.sense[2] & 0xF == 6):
                        break
                out[(n.initiator_port[:18], lu)] = r
            rl = await dev.execute(ScsiTask(n, 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 2,
                                            TaskAttribute.SIMPLE, b"", 256))
            out[(n.initiator_port[:18], "luns")] = int.from_bytes(rl.data_in[:4], "big") // 8
        return out

    out = asyncio.run(run())
    assert out[("iqn.2026-11.test:a", 1)].status == 0
    r = out[("iqn.2026-11.test:b", 1)]
    assert r.status == 2 and r.sense[12:14] == b"\x25\x00"     # LOGICAL UNIT NOT SUPPORTED
    assert out[("iqn.2026-11.test:a", "luns")] == 2 and out[("iqn.2026-11.test:b", "luns")] == 1


# -- connection limits and slow-down ------------------------------------------------------

def test_connection_limits():
    lim = ConnectionLimiter(max_total=3, max_per_source=2)
    assert lim.admit("10.0.0.1") is None and lim.admit("::ffff:10.0.0.1") is None
    assert "per_address" in lim.admit("10.0.0.1")
    assert lim.admit("10.0.0.2") is None
    assert "total" in lim.admit("10.0.0.3")
    lim.release("10.0.0.1")
    assert lim.admit("10.0.0.1") is None
    # IPv6 sources are grouped by /64
    assert source_key("fd00::1") == source_key("fd00::ffff:1") != source_key("fd00:0:0:1::1")


def test_failed_logins_slow_down_a_source():
    lim = ConnectionLimiter(failure_delay=1.0, window=60)
    assert lim.delay("10.0.0.1", 0) == 0
    for i in range(1, 8):
        lim.login_failed("10.0.0.1", 0x0201, now=i)
    assert lim.delay("10.0.0.1", 8) == min(MAX_DELAY, 2 ** 6)
    assert lim.delay("10.0.0.2", 8) == 0                # other sources unaffected
    lim.login_failed("10.0.0.2", 0x0207, now=8)          # a protocol error is not a guess
    assert lim.delay("10.0.0.2", 8) == 0
    assert lim.delay("10.0.0.1", 100) == 0               # forgotten after the window
    lim.login_failed("10.0.0.3", 0x0202, now=0)
    lim.login_succeeded("10.0.0.3")
    assert lim.delay("10.0.0.3", 1) == 0


def test_failure_table_is_bounded():
    lim = ConnectionLimiter(max_tracked=100)
    for i in range(10000):
        lim.login_failed(f"2001:db8:{i:x}::1", 0x0201, now=0)
        lim.should_log(f"2001:db8:{i:x}::1", 0)
    assert len(lim._failures) == 100 and len(lim._logged) == 100
