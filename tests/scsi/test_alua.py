"""ALUA (SPC-4 §5.16): TPGS, VPD 83h target port group, REPORT TARGET PORT
GROUPS in both formats, the standby state."""

from __future__ import annotations

import struct

import pytest

from pyiscsi_target.scsi.alua import SINGLE, AccessState, PortGroup, TargetPortGroups
from pyiscsi_target.scsi.command import Nexus, Status
from pyiscsi_target.scsi.opcodes import COMMANDS, ServiceActions
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice

from .conftest import NEXUS_A, TARGET_PORT, Harness, assert_check, assert_good, cdb10, inquiry, make_lu, sa_in16

AO, AN, SB = AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED, AccessState.STANDBY
GROUPS = TargetPortGroups((PortGroup(1, AO, (1,)), PortGroup(2, AN, (2,)), PortGroup(3, SB, (3,))))
NEXUS_2 = Nexus(NEXUS_A.initiator_port, "iqn.2026-11.org.example:disk,t,0x0002", 2)
NEXUS_3 = Nexus(NEXUS_A.initiator_port, "iqn.2026-11.org.example:disk,t,0x0003", 3)


def rtpg(fmt: int = 0, alloc: int = 4096, sa: int = 0x0A, control: int = 0) -> bytes:
    return bytes((0xA3, (fmt << 5) | sa)) + bytes(4) + alloc.to_bytes(4, "big") + bytes((0, control))


async def _h(groups: TargetPortGroups = GROUPS) -> Harness:
    dev = ScsiTargetDevice("t", {0: make_lu()}, port_groups=groups)
    h = Harness(dev)
    for nx in (NEXUS_A, NEXUS_2, NEXUS_3):
        dev.add_nexus(nx)
        # Clear the power-on UA; REQUEST SENSE is allowed in standby too.
        assert_good(await h.run(bytes((0x03, 0, 0, 0, 252, 0)), nexus=nx))
    return h


def _descriptors(data: bytes, start: int) -> list[tuple[int, int, int, int, int, tuple[int, ...]]]:
    """(pref|state byte, supported byte, group, status, count, relative ports) of each descriptor."""
    out, pos = [], start
    end = 4 + struct.unpack_from(">I", data)[0]
    while pos < end:
        state, sup, gid, _r, status, _v, count = struct.unpack_from(">BBHBBBB", data, pos)
        ports = tuple(struct.unpack_from(">H", data, pos + 8 + 4 * i + 2)[0] for i in range(count))
        out.append((state, sup, gid, status, count, ports))
        pos += 8 + 4 * count
    assert pos == end
    return out


# --- the model ----------------------------------------------------------------------


def test_port_groups_validate():
    with pytest.raises(ValueError):
        TargetPortGroups((PortGroup(1, AO, (1,)), PortGroup(1, AN, (2,))))  # duplicate id
    with pytest.raises(ValueError):
        TargetPortGroups((PortGroup(1, AO, (1,)), PortGroup(2, AN, (1,))))  # port in two groups
    with pytest.raises(ValueError):
        PortGroup(0, AO, (1,))
    with pytest.raises(ValueError):
        PortGroup(1, AO, (0,))  # relative port 0 is reserved
    with pytest.raises(ValueError):
        PortGroup(1, AccessState.TRANSITIONING, (1,))
    assert GROUPS.standby_ports == {3} and SINGLE.standby_ports == frozenset()
    assert GROUPS.group_of(2).id == 2 and GROUPS.group_of(9) is None
    assert AccessState.from_label("active/non-optimized") is AN and SB.label == "standby"


def test_rtpg_row_in_the_dispatch_table():
    entry = COMMANDS[0xA3]
    assert isinstance(entry, ServiceActions)
    spec = entry.actions[0x0A]
    assert spec.name == "REPORT TARGET PORT GROUPS" and spec.cdb_length == 12
    assert spec.usage == bytes.fromhex("A3FF00000000FFFFFFFF0000") and spec.standby_ok


# --- INQUIRY ------------------------------------------------------------------------


async def test_tpgs_implicit_in_standard_inquiry():
    h = await _h()
    d = bytes((await h.run(inquiry(alloc=96))).data_in)
    assert (d[5] >> 4) & 0x03 == 0b01  # TPGS 01b: implicit only
    # A missing LUN (PQ 3) answers from the same builder.
    d = bytes((await h.run(inquiry(alloc=96), lun=5)).data_in)
    assert d[0] == 0x7F


def _designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 4
    while pos < 4 + int.from_bytes(page[2:4], "big"):
        n = page[pos + 3]
        out.append((page[pos] & 0x0F, (page[pos + 1] >> 4) & 3, page[pos + 1] & 0x0F, page[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


@pytest.mark.parametrize("nexus, group", [(NEXUS_A, 1), (NEXUS_2, 2), (NEXUS_3, 3)])
async def test_vpd83_target_port_group_designator(nexus, group):
    h = await _h()
    ds = _designators(bytes((await h.run(inquiry(1, 0x83), nexus=nexus)).data_in))
    # Binary code set, association 1 (target port), types 4 and 5 (SPC-4 §7.8.6.7, §7.8.6.8).
    assert [(cs, a, v) for cs, a, t, v in ds if t == 4] == [(1, 1, b"\0\0" + nexus.relative_port_id.to_bytes(2, "big"))]
    assert [(cs, a, v) for cs, a, t, v in ds if t == 5] == [(1, 1, b"\0\0" + group.to_bytes(2, "big"))]


async def test_vpd83_without_a_group_for_the_port_has_no_tpg_designator():
    h = await _h(TargetPortGroups((PortGroup(7, AO, (7,)),)))
    ds = _designators(bytes((await h.run(inquiry(1, 0x83))).data_in))
    assert [t for _cs, _a, t, _v in ds].count(5) == 0


# --- REPORT TARGET PORT GROUPS ---------------------------------------------------------


async def test_rtpg_length_only_format():
    h = await _h()
    r = await h.run(rtpg(0))
    assert_good(r)
    d = bytes(r.data_in)
    assert struct.unpack_from(">I", d)[0] == len(d) - 4 == 3 * 12
    assert _descriptors(d, 4) == [
        (0x00, 0x07, 1, 0, 1, (1,)),  # PREF 0, active/optimized; AO_SUP AN_SUP S_SUP
        (0x01, 0x07, 2, 0, 1, (2,)),  # active/non-optimized
        (0x02, 0x07, 3, 0, 1, (3,)),  # standby
    ]


async def test_rtpg_extended_format():
    h = await _h(TargetPortGroups(GROUPS.groups, implicit_transition_time=12))
    d = bytes((await h.run(rtpg(1))).data_in)
    assert struct.unpack_from(">I", d)[0] == len(d) - 4 == 4 + 3 * 12  # n - 3: the header's 4 bytes count
    assert d[4] == 0x10 and d[5] == 12 and d[6:8] == b"\0\0"  # FORMAT TYPE 001b, IMPLICIT TRANSITION TIME
    assert [x[2] for x in _descriptors(d, 8)] == [1, 2, 3]


async def test_rtpg_single_box_default():
    h = await _h(SINGLE)
    d = bytes((await h.run(rtpg(0))).data_in)
    assert d == bytes.fromhex("0000000c" "00070001" "00000001" "00000001")


@pytest.mark.parametrize("alloc", [0, 1, 4, 13])
async def test_rtpg_allocation_length_truncates(alloc):
    h = await _h()
    full = bytes((await h.run(rtpg(0))).data_in)
    d = bytes((await h.run(rtpg(0, alloc=alloc))).data_in)
    assert d == full[:alloc]
    if alloc == 4:  # just the RETURN DATA LENGTH: the client learns how much to ask for
        assert struct.unpack(">I", d)[0] == len(full) - 4


@pytest.mark.parametrize("fmt", [2, 3, 7])
async def test_rtpg_reserved_parameter_data_format(fmt):
    h = await _h()
    assert_check(await h.run(rtpg(fmt)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=7)


async def test_rtpg_reserved_cdb_bytes_and_control():
    h = await _h()
    cdb = bytearray(rtpg(0))
    cdb[3] = 0x01
    assert_check(await h.run(bytes(cdb)), Reason.INVALID_FIELD_IN_CDB, fp=3, bit=0)
    assert_check(await h.run(rtpg(0, control=0x04)), Reason.INVALID_FIELD_IN_CDB, fp=11, bit=2)


async def test_maintenance_in_unknown_service_action():
    h = await _h()
    assert_check(await h.run(rtpg(0, sa=0x0B)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=4)
    # SET TARGET PORT GROUPS (MAINTENANCE OUT A4h/0Ah): explicit ALUA is not offered.
    assert_check(await h.run(bytes((0xA4, 0x0A)) + bytes(10)), Reason.INVALID_COMMAND_OPERATION_CODE, fp=0)


async def test_rsoc_lists_rtpg_with_its_usage():
    h = await _h()
    # REPORTING OPTIONS 010b: opcode A3h, service action 0Ah.
    r = await h.run(bytes((0xA3, 0x0C, 0x02, 0xA3, 0x00, 0x0A, 0, 0, 1, 0, 0, 0)))
    assert_good(r)
    d = bytes(r.data_in)
    assert d[1] & 0x07 == 0x03 and d[2:4] == b"\0\x0c"
    assert d[4:16] == bytes.fromhex("A3FF00000000FFFFFFFF0000")
    # ... and in the list of all commands.
    d = bytes((await h.run(bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0)))).data_in)
    rows = [d[i : i + 8] for i in range(4, len(d), 8)]
    assert bytes.fromhex("A300000A0001000C") in rows


# --- the standby state (SPC-4 §5.16.2.4.4) -------------------------------------------


STANDBY_SENSE = Reason.LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE


def test_standby_sense_code():
    assert STANDBY_SENSE.value == (0x02, 0x04, 0x0B)


@pytest.mark.parametrize("name, cdb", [
    ("TEST UNIT READY", bytes(6)),
    ("READ(10)", cdb10(0x28, 0, 1)),
    ("WRITE(10)", cdb10(0x2A, 0, 1)),
    ("READ CAPACITY(16)", sa_in16(0x10)),
    ("SYNCHRONIZE CACHE(10)", cdb10(0x35, 0, 0)),
    ("REPORT SUPPORTED OPERATION CODES", bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0))),
    ("RESERVE(6)", bytes((0x16, 0, 0, 0, 0, 0))),
])
async def test_standby_refuses_media_commands(name, cdb):
    h = await _h()
    data = bytes(512) if cdb[0] == 0x2A else b""
    assert_check(await h.run(cdb, data, nexus=NEXUS_3), STANDBY_SENSE)
    # The same command through the active/non-optimized group works.
    assert (await h.run(cdb, data, nexus=NEXUS_2)).status == Status.GOOD, name


@pytest.mark.parametrize("name, cdb", [
    ("INQUIRY", inquiry()),
    ("INQUIRY VPD 83h", inquiry(1, 0x83)),
    ("REPORT LUNS", bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0))),
    ("REQUEST SENSE", bytes((0x03, 0, 0, 0, 18, 0))),
    ("MODE SENSE(6)", bytes((0x1A, 0, 0x3F, 0, 255, 0))),
    ("MODE SENSE(10)", bytes((0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0))),
    ("PERSISTENT RESERVE IN", bytes((0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0))),
    ("REPORT TARGET PORT GROUPS", rtpg(1)),
])
async def test_standby_serves_what_spc4_allows(name, cdb):
    h = await _h()
    assert_good(await h.run(cdb, nexus=NEXUS_3))


async def test_standby_pr_out_register_allowed():
    h = await _h()
    param = (0).to_bytes(8, "big") + (0xABC).to_bytes(8, "big") + bytes(8)
    assert_good(await h.run(bytes((0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0)), param, nexus=NEXUS_3))


async def test_standby_reports_a_pending_unit_attention_first():
    """SAM-5 §5.14: the UA check precedes the access-state check."""
    dev = ScsiTargetDevice("t", {0: make_lu()}, port_groups=GROUPS)
    dev.add_nexus(NEXUS_3)
    h = Harness(dev)
    assert_check(await h.run(bytes(6), nexus=NEXUS_3), Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
    assert_check(await h.run(bytes(6), nexus=NEXUS_3), STANDBY_SENSE)


async def test_unknown_opcode_in_standby_is_still_invalid_opcode():
    h = await _h()
    assert_check(await h.run(bytes((0xFF,)) + bytes(5), nexus=NEXUS_3), Reason.INVALID_COMMAND_OPERATION_CODE)


async def test_single_box_default_has_no_standby():
    dev = ScsiTargetDevice("t", {0: make_lu()})
    assert dev.port_groups is SINGLE
    assert TARGET_PORT.endswith(",t,0x0001") and SINGLE.group_of(NEXUS_A.relative_port_id).id == 1
