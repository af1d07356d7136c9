"""Persistent reservations against the real server, driven by libiscsi.

* the two-node cluster scenario of issue 5 (Microsoft-style initiator names,
  CSV-style Write Exclusive - Registrants Only, fencing of an unregistered
  third initiator, node loss and PREEMPT, REGISTRATIONS PREEMPTED on return);
* a replay of the Windows cluster-validation reservation sequence
  (wsfc-shared-disk.md §3.1-§3.4) asserting the answers Windows checks;
* APTPL: keys and reservation survive a restart with APTPL, not without it.

Every client here is libiscsi (tests/support/libiscsi_client.py over
Debian's libiscsi7); our own initiator only adds what libiscsi cannot send.
"""

from __future__ import annotations

import signal

import pytest

from tests.support.libiscsi_client import CHECK_CONDITION, GOOD, RESERVATION_CONFLICT, LibIscsi
from tests.support.target import DATA, QUORUM, start_target

NODE1 = "iqn.1991-05.com.microsoft:node1"
NODE2 = "iqn.1991-05.com.microsoft:node2"
OUTSIDER = "iqn.1991-05.com.microsoft:node3"
K1, K2 = 0x4D53_0001_0000_0001, 0x4D53_0002_0000_0002  # opaque 8-byte keys (wsfc §4)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE = 0, 1, 2, 3, 4, 5, 6
WE_RO = 5

UA_POWER_ON = (0x29, 0x00)
UA_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
UA_RESERVATIONS_RELEASED = (0x2A, 0x04)
UA_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)


def connect(target, name: str, qualifier: int = 1, iqn: str = QUORUM) -> LibIscsi:
    return LibIscsi(target.portal, iqn, name, qualifier=qualifier)


def good(reply):
    assert reply.status == GOOD, reply
    return reply


def test_two_node_cluster_scenario(target):
    two_node_cluster_scenario(lambda name, q=1: connect(target, name, q),
                              lambda name, q=1: connect(target, name, q))


def two_node_cluster_scenario(via_1, via_2):
    """node1 connects through ``via_1``, node2 and the outsider through
    ``via_2`` (one target, or two gateways of one LU: tests/ceph)."""
    n1 = via_1(NODE1)
    n2 = via_2(NODE2)
    out = via_2(OUTSIDER)
    try:
        for c in (n1, n2, out):
            assert c.unit_attentions() == [UA_POWER_ON]
        # Both nodes register (REGISTER AND IGNORE EXISTING KEY, as ClusPrep does).
        good(n1.prout(REGISTER_IGNORE, sark=K1))
        good(n2.prout(REGISTER_IGNORE, sark=K2))
        gen, keys = n1.read_keys()
        assert keys == [K1, K2] and gen == 2
        # node1 (the CSV coordinator) reserves Write Exclusive - Registrants Only.
        good(n1.prout(RESERVE, rk=K1, type_=WE_RO))
        assert n2.read_reservation() == (2, K1, WE_RO)  # seen at once from the other node
        # CSV: both registered nodes write directly.
        good(n1.write16(100, b"\x11" * 512))
        good(n2.write16(101, b"\x22" * 512))
        good(n2.read16(100))
        # An unregistered initiator is fenced from writes but may read.
        assert out.write16(102, b"\x33" * 512).status == RESERVATION_CONFLICT
        good(out.read16(100))
        good(out.tur())  # TUR, INQUIRY, READ CAPACITY, PR IN never conflict
        assert out.read_reservation() == (2, K1, WE_RO)

        # node1 vanishes (no logout); its registration belongs to its nexus and stays.
        n1.drop()
        gen, keys = n2.read_keys()
        assert keys == [K1, K2]
        # node2 preempts node1's key and becomes the holder.
        good(n2.prout(PREEMPT, rk=K2, sark=K1, type_=WE_RO))
        assert n2.read_reservation() == (3, K2, WE_RO)
        assert n2.read_keys() == (3, [K2])
        assert n2.unit_attentions() == []  # the preemptor gets no UA

        # node1 returns with the same ISID: the reset UA, then REGISTRATIONS PREEMPTED.
        n1 = via_1(NODE1)
        assert n1.unit_attentions() == [UA_POWER_ON, UA_REGISTRATIONS_PREEMPTED]
        assert n1.write16(100, b"\x44" * 512).status == RESERVATION_CONFLICT  # fenced
        good(n1.read16(100))
        # It re-registers and may write again (CSV rejoin).
        good(n1.prout(REGISTER_IGNORE, sark=K1))
        good(n1.write16(100, b"\x55" * 512))

        # CLEAR: everything goes, the other registrant learns RESERVATIONS PREEMPTED.
        good(n2.prout(CLEAR, rk=K2))
        assert n2.read_keys()[1] == [] and n2.read_reservation() is None
        assert n1.unit_attentions() == [UA_RESERVATIONS_PREEMPTED]
        assert out.unit_attentions() == []  # never registered: nothing to learn
        good(out.write16(102, b"\x66" * 512))
    finally:
        for c in (n1, n2, out):
            c.drop()


def test_windows_validate_scsi3_persistent_reservation_replay(target):
    windows_validation_replay(lambda name, q: connect(target, name, q),
                              lambda name, q: connect(target, name, q))


def windows_validation_replay(path_1, path_2):
    """The ClusPrep primitives in the order MS-CSVP allows (Clear -> Register
    -> Reserve -> IsPRPresent -> Preempt -> Release -> UnRegister), with the
    RSVD test suite's expectations (wsfc §3.3), from two nodes x two MPIO
    paths, asserting what Windows reads back (wsfc §3.2: "Failed to read PR").
    Each node's first path is made by ``path_1``, its second by ``path_2``
    (the same target, or two gateways: one MPIO path through each)."""
    a1, a2 = path_1(NODE1, 1), path_2(NODE1, 2)  # node A, two paths (two ISIDs)
    b1, b2 = path_2(NODE2, 1), path_1(NODE2, 2)
    paths = (a1, a2, b1, b2)
    try:
        for c in paths:
            c.unit_attentions()
        # REPORT CAPABILITIES (MSDSM reads it): TMV=1 and types 1, 3, 5, 6 at least.
        caps = a1.report_capabilities()
        length, crh, sip_c, atp_c, ptpl_c, tmv, allow, ptpl_a, mask = (
            int.from_bytes(caps[0:2], "little"), *caps[2:9], int.from_bytes(caps[10:12], "little"))
        assert length == 8 and tmv == 1 and ptpl_c == 1 and sip_c == 1 and atp_c == 1
        for bit in (1 << 9, 1 << 11, 1 << 13, 1 << 14):  # WR_EX, EX_AC, WR_EX_RO, EX_AC_RO (SPC-4 table 169)
            assert mask & bit

        # CprepDiskPRClear: REGISTER-IGNORE then CLEAR.
        good(a1.prout(REGISTER_IGNORE, sark=K1))
        good(a1.prout(CLEAR, rk=K1))
        assert a1.read_keys()[1] == []
        # CprepDiskPRRegister: MSDSM registers the key down every path.
        for c, k in ((a1, K1), (a2, K1), (b1, K2), (b2, K2)):
            good(c.prout(REGISTER_IGNORE, sark=k))
        assert a1.read_keys()[1] == [K1, K1, K2, K2]  # duplicates are normal
        # CprepDiskPRReserve from A, then CprepDiskIsPRPresent.
        good(a1.prout(RESERVE, rk=K1, type_=WE_RO))
        assert a2.read_reservation()[1:] == (K1, WE_RO)  # "2 = held by this node"
        assert b1.read_reservation()[1:] == (K1, WE_RO)  # "1 = held by another node"
        # The holder repeats RESERVE (the defence loop): GOOD.  B cannot reserve.
        good(a1.prout(RESERVE, rk=K1, type_=WE_RO))
        assert b1.prout(RESERVE, rk=K2, type_=WE_RO).status == RESERVATION_CONFLICT
        # Windows' PR IOCTL path: RELEASE by a registered non-holder is GOOD with no effect.
        good(b2.prout(RELEASE, rk=K2, type_=WE_RO))
        assert a1.read_reservation()[1:] == (K1, WE_RO)
        # The holder is the reserving I_T nexus, not the node (SPC-4 §5.12.10):
        # node A's other path releasing is a GOOD no-op too.
        good(a2.prout(RELEASE, rk=K1, type_=WE_RO))
        assert b1.read_reservation()[1:] == (K1, WE_RO)
        # Wrong type from the holder: INVALID RELEASE OF PERSISTENT RESERVATION.
        r = a1.prout(RELEASE, rk=K1, type_=6)
        assert r.status == CHECK_CONDITION and r.sense == (5, 0x26, 0x04)
        # Validate Disk Arbitration: B preempts A (SARK = A's key) and takes over.
        good(b1.prout(PREEMPT, rk=K2, sark=K1, type_=WE_RO))
        assert b2.read_reservation()[1:] == (K2, WE_RO)
        assert b1.read_keys()[1] == [K2, K2]  # every path of node A is gone
        for c in (a1, a2):
            assert c.unit_attentions() == [UA_REGISTRATIONS_PREEMPTED]
            assert c.write16(0, b"\0" * 512).status == RESERVATION_CONFLICT  # writes fenced at once
        assert b1.unit_attentions() == [] and b2.unit_attentions() == []
        # A re-registers (defence), and the reservation moves back by PREEMPT.
        for c in (a1, a2):
            good(c.prout(REGISTER_IGNORE, sark=K1))
        good(a1.prout(PREEMPT, rk=K1, sark=K2, type_=WE_RO))
        assert a1.read_reservation()[1:] == (K1, WE_RO)
        # CprepDiskPRRelease by the holder: the other registrants get RESERVATIONS RELEASED.
        good(a1.prout(RELEASE, rk=K1, type_=WE_RO))
        assert a1.read_reservation() is None
        assert a2.unit_attentions() == [UA_RESERVATIONS_RELEASED]
        # CprepDiskPRUnRegister: REGISTER-IGNORE with key 0, on each path.
        for c in (a1, a2):
            good(c.prout(REGISTER_IGNORE, sark=0))
        assert a1.read_keys()[1] == []
        # An unregistered nexus cannot RESERVE, RELEASE, CLEAR or PREEMPT.
        for sa in (RESERVE, RELEASE, CLEAR, PREEMPT):
            assert a1.prout(sa, rk=K1, sark=K2, type_=WE_RO).status == RESERVATION_CONFLICT
    finally:
        for c in paths:
            c.drop()


@pytest.mark.parametrize("aptpl", [True, False])
def test_restart_keeps_state_only_with_aptpl(target, aptpl):
    c = connect(target, NODE1, iqn=DATA)
    d = connect(target, NODE2, iqn=DATA)
    try:
        c.unit_attentions()
        d.unit_attentions()
        good(c.prout(REGISTER_IGNORE, sark=K1, aptpl=aptpl))
        good(d.prout(REGISTER_IGNORE, sark=K2, aptpl=aptpl))
        good(c.prout(RESERVE, rk=K1, type_=WE_RO))
    finally:
        c.drop()
        d.drop()
    assert target.stop(signal.SIGTERM) == 0
    t2 = start_target(target.config, target.host, target.port, log_name="server2.log")
    try:
        c = connect(t2, NODE1, iqn=DATA)
        try:
            c.unit_attentions()
            if aptpl:
                assert c.read_keys() == (2, [K1, K2])
                assert c.read_reservation() == (2, K1, WE_RO)
                # The restored holder still holds: an unregistered write is fenced.
                with connect(t2, OUTSIDER, iqn=DATA) as o:
                    o.unit_attentions()
                    assert o.write16(0, b"\0" * 512).status == RESERVATION_CONFLICT
            else:
                assert c.read_keys() == (0, [])
                assert c.read_reservation() is None
        finally:
            c.drop()
    finally:
        assert t2.stop() == 0
        target.proc = t2.proc  # the fixture's final stop sees the exited process
