"""SPC-4 primary commands: one handler per command, no sense bytes built here.

Handlers take a :class:`~.context.Command`, read their CDB fields, raise
:class:`~.sense.ScsiError` for anything invalid and return Data-In.  The
pre-dispatch checks (LUN, unit attention, opcode, reserved CDB bits,
reservations) already ran; see :mod:`.opcodes`.
"""

from __future__ import annotations

import struct

from .command import ScsiResult, Status
from .context import Command, Reply
from .lun import LogicalUnit, encode_lun
from .pr import Effects, ReservationConflict
from .spc_pr import change_reservations
from .sense import Reason, ScsiError, build_sense

# --- INQUIRY (SPC-4 §6.6) ----------------------------------------------------

#: Version descriptors (SPC-4 §6.6.2 table 146): SAM-5, iSCSI, SPC-4, SBC-3
#: (all "no version claimed").  libiscsi uses SBC-3 here to expect the 3Ch
#: long Block Limits page.
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)
STANDARD_INQUIRY_LENGTH = 96
TPGS_IMPLICIT = 0x10  # byte 5 bits 5-4 = 01b
PQ_PDT_DISK = 0x00  # peripheral qualifier 000b, direct access block device
PQ_PDT_NO_LUN = 0x7F  # qualifier 011b: no LU can be addressed here, PDT 1Fh


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii").ljust(width, b" ")[:width]


def standard_inquiry(lu: LogicalUnit | None, template: LogicalUnit | None) -> bytes:
    ident = (lu or template).identity if (lu or template) else None
    buf = bytearray(STANDARD_INQUIRY_LENGTH)
    buf[0] = PQ_PDT_DISK if lu is not None else PQ_PDT_NO_LUN
    buf[1] = 0x00  # RMB=0: not removable (SBC-3 fixed disk)
    buf[2] = 0x06  # VERSION: SPC-4
    buf[3] = 0x10 | 0x02  # HISUP=1 (hierarchical LUNs), RESPONSE DATA FORMAT=2
    buf[4] = STANDARD_INQUIRY_LENGTH - 5
    # TPGS=01b (SPC-4 §6.6.2 table 142): implicit ALUA only.  REPORT TARGET
    # PORT GROUPS tells which gateway (target port group) is optimized;
    # there is no SET TARGET PORT GROUPS (explicit ALUA would be 10b).
    # Windows MSDSM and Linux scsi_dh_alua pick their paths from it.
    buf[5] = TPGS_IMPLICIT
    buf[7] = 0x02  # CMDQUE=1: tagged queuing (SAM-5 task attributes honoured)
    if ident is not None:
        buf[8:16] = _ascii(ident.vendor, 8)
        buf[16:32] = _ascii(ident.product, 16)
        buf[32:36] = _ascii(ident.revision, 4)
    else:
        buf[8:36] = b" " * 28
    for i, code in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", buf, 58 + 2 * i, code)
    return bytes(buf)


def _vpd(page: int, body: bytes | bytearray) -> bytes:
    return bytes((PQ_PDT_DISK, page)) + len(body).to_bytes(2, "big") + bytes(body)


def _vpd_supported(cmd: Command, lu: LogicalUnit) -> bytes:
    # Ascending, starting with 00h (Windows ignores an unsorted list, §5.3).
    return _vpd(0x00, bytes(sorted(VPD_PAGES)))


def _vpd_serial(cmd: Command, lu: LogicalUnit) -> bytes:
    return _vpd(0x80, lu.identity.serial.encode("ascii"))


def _designator(code_set: int, association: int, kind: int, value: bytes, piv: bool = False) -> bytes:
    """One designation descriptor (SPC-4 §7.8.6.1 table 459)."""
    return bytes((code_set, (0x80 if piv else 0) | (association << 4) | kind, 0, len(value))) + value


def _vpd_device_identification(cmd: Command, lu: LogicalUnit) -> bytes:
    """VPD 83h (SPC-4 §7.8.6): LU designators, then the target port's."""
    ident = lu.identity
    body = bytearray()
    # NAA IEEE Registered Extended, association LU: the disk's identity for
    # Windows/MSDSM and Linux multipath (SPC-4 §7.8.6.6.5).
    body += _designator(1, 0, 3, ident.naa)
    # T10 vendor ID based (SPC-4 §7.8.6.4): vendor + unit serial.
    body += _designator(2, 0, 1, _ascii(ident.vendor, 8) + ident.serial.encode("ascii"))
    nexus = cmd.nexus
    # SCSI name string of the target port (type 8, association 1): UTF-8,
    # null-terminated and null-padded to a multiple of 4 (SPC-4 §7.8.6.11).
    name = nexus.target_port.encode("utf-8") + b"\0"
    name += b"\0" * (-len(name) % 4)
    if nexus.target_port:
        body += _designator(3, 1, 8, name)
    # Relative target port identifier (type 4, association 1, SPC-4 §7.8.6.7).
    body += _designator(1, 1, 4, b"\0\0" + (nexus.relative_port_id & 0xFFFF).to_bytes(2, "big"))
    # Target port group (type 5, association 1, SPC-4 §7.8.6.8): the group
    # this port is in, so a multipath driver can match the path to its
    # descriptor in REPORT TARGET PORT GROUPS (TPGS != 0 requires it).
    group = cmd.device.port_groups.group_of(nexus.relative_port_id)
    if group is not None:
        body += _designator(1, 1, 5, b"\0\0" + group.id.to_bytes(2, "big"))
    return _vpd(0x83, body)


def _vpd_block_limits(cmd: Command, lu: LogicalUnit) -> bytes:
    """VPD B0h (SBC-3 §6.5.3), page length 3Ch."""
    body = bytearray(0x3C)
    body[1] = min(lu.max_compare_write_blocks, 255)  # MAXIMUM COMPARE AND WRITE LENGTH
    struct.pack_into(">H", body, 2, 1 << lu.physical_block_exponent)  # OPTIMAL TRANSFER LENGTH GRANULARITY
    struct.pack_into(">I", body, 4, lu.max_transfer_blocks)
    struct.pack_into(">I", body, 8, lu.optimal_transfer_blocks)
    struct.pack_into(">I", body, 12, lu.max_transfer_blocks)  # MAXIMUM PREFETCH LENGTH
    if lu.thin:
        # UNMAP limits are non-zero only when UNMAP works (LBPU=1).
        struct.pack_into(">I", body, 16, lu.max_unmap_blocks)
        struct.pack_into(">I", body, 20, lu.max_unmap_descriptors)
        struct.pack_into(">I", body, 24, lu.unmap_granularity)
        struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID=1, alignment 0
    struct.pack_into(">Q", body, 32, lu.max_write_same_blocks)
    return _vpd(0xB0, body)


def _vpd_block_characteristics(cmd: Command, lu: LogicalUnit) -> bytes:
    """VPD B1h (SBC-3 §6.5.2): MEDIUM ROTATION RATE (1 = non-rotating)."""
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, lu.rotation_rate & 0xFFFF)
    return _vpd(0xB1, body)


def _vpd_logical_block_provisioning(cmd: Command, lu: LogicalUnit) -> bytes:
    """VPD B2h (SBC-3 §6.5.4).  A thin LU advertises UNMAP and WRITE SAME
    with UNMAP (LBPU, LBPWS, LBPWS10) and that unmapped blocks read as zeros
    (LBPRZ); a fully provisioned one advertises nothing, since UNMAP is then
    not supported (libiscsi Unmap.VPD and Windows both require consistency)."""
    body = bytearray(4)
    if lu.thin:
        body[1] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU LBPWS LBPWS10 LBPRZ
        body[2] = 0x02  # PROVISIONING TYPE: thin
    return _vpd(0xB2, body)


VPD_PAGES = {
    0x00: _vpd_supported,
    0x80: _vpd_serial,
    0x83: _vpd_device_identification,
    0xB0: _vpd_block_limits,
    0xB1: _vpd_block_characteristics,
    0xB2: _vpd_logical_block_provisioning,
}


async def inquiry(cmd: Command) -> Reply:
    cdb = cmd.cdb
    evpd = cdb[1] & 0x01
    page = cdb[2]
    alloc = int.from_bytes(cdb[3:5], "big")
    lu = cmd.lu
    if not evpd:
        if page:  # SPC-4 §6.6.1: PAGE CODE must be zero when EVPD is zero
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=7)
        template = next(iter(cmd.device.luns.values()), None)
        return Command.allocation(standard_inquiry(lu, template), alloc)
    if lu is None:
        raise ScsiError(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
    build = VPD_PAGES.get(page)
    if build is None:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=7)
    return Command.allocation(build(cmd, lu), alloc)


# --- TEST UNIT READY, REQUEST SENSE, REPORT LUNS --------------------------------


async def test_unit_ready(cmd: Command) -> Reply:
    return None


async def request_sense(cmd: Command) -> Reply:
    """SPC-4 §6.39: report (and clear) a pending unit attention as sense data
    with GOOD status; an unconfigured LUN gets LOGICAL UNIT NOT SUPPORTED;
    otherwise NO SENSE.  DESC=1 is rejected by the CDB mask (fixed only)."""
    alloc = cmd.cdb[4]
    lu = cmd.lu
    if lu is None:
        sense = build_sense(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
    else:
        reason = lu.unit_attentions.pop(cmd.nexus)
        sense = build_sense(reason or Reason.NO_ADDITIONAL_SENSE)
    return Command.allocation(sense, alloc)


async def report_luns(cmd: Command) -> Reply:
    """SPC-4 §6.33.  SELECT REPORT 0 and 2 list every LU; 1 (well known
    LUs only) lists none, as we have none."""
    cdb = cmd.cdb
    select = cdb[2]
    alloc = int.from_bytes(cdb[6:10], "big")
    if select not in (0x00, 0x01, 0x02):
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=7)
    if alloc < 16:  # SPC-4 §6.33: ALLOCATION LENGTH < 16 is invalid
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=6, bit=7)
    ids = [] if select == 0x01 else cmd.device.visible_luns(cmd.nexus)
    data = bytearray(8 + 8 * len(ids))
    struct.pack_into(">I", data, 0, 8 * len(ids))
    for i, lun_id in enumerate(ids):
        data[8 + 8 * i : 16 + 8 * i] = encode_lun(lun_id)
    if cmd.lu is not None:  # the nexus has now seen the new LUN inventory
        cmd.lu.unit_attentions.clear(cmd.nexus, Reason.REPORTED_LUNS_DATA_HAS_CHANGED)
    return Command.allocation(data, alloc)


# --- REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) ----------------------------


def _timeouts(spec) -> bytes:
    nominal, recommended = spec.timeout
    return struct.pack(">HBBII", 0x0A, 0, 0, nominal, recommended)


async def report_supported_operation_codes(cmd: Command) -> Reply:
    from .opcodes import ServiceActions  # table types; the table itself is cmd.device.commands

    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = int.from_bytes(cdb[4:6], "big")
    alloc = int.from_bytes(cdb[6:10], "big")
    lu = cmd.unit
    table = cmd.device.commands

    def usable(spec) -> bool:
        return spec.supported is None or spec.supported(lu)

    if options == 0:
        out = bytearray(4)
        for opcode in sorted(table):
            entry = table[opcode]
            specs = sorted(entry.actions.values(), key=lambda s: s.service_action) if isinstance(entry, ServiceActions) else [entry]
            for spec in specs:
                if not usable(spec):
                    continue
                flags = (0x02 if rctd else 0) | (0x01 if spec.service_action is not None else 0)
                out += struct.pack(">BBHBBH", opcode, 0, spec.service_action or 0, 0, flags, spec.cdb_length)
                if rctd:
                    out += _timeouts(spec)
        struct.pack_into(">I", out, 0, len(out) - 4)
        return Command.allocation(out, alloc)

    if options not in (1, 2, 3):
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=2)
    entry = table.get(req_op)
    spec = None
    if isinstance(entry, ServiceActions):
        if options == 1:  # opcode has service actions: format 001b is invalid
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=2)
        spec = entry.actions.get(req_sa)
    elif entry is not None:
        if options == 2:  # no service actions: format 010b is invalid
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=2)
        spec = entry
    if spec is None or not usable(spec):
        out = bytearray(4)
        out[1] = 0x01  # SUPPORT 001b: not supported
        return Command.allocation(out, alloc)
    out = bytearray(4)
    out[1] = (0x80 if rctd else 0) | 0x03  # CTDP, SUPPORT 011b: supported as the standard says
    struct.pack_into(">H", out, 2, spec.cdb_length)
    out += spec.usage
    if rctd:
        out += _timeouts(spec)
    return Command.allocation(out, alloc)


# --- REPORT TARGET PORT GROUPS (SPC-4 §6.36) -------------------------------------

# Supported states byte of every descriptor (SPC-4 §6.36.2 table 266): the
# states a gateway can be configured in (alua.CONFIGURABLE_STATES): AO_SUP,
# AN_SUP, S_SUP.  T_SUP=0: a state only changes with a restart, so
# transitioning is never reported; O_SUP=0, U_SUP=0, LBD_SUP=0: never used.
_SUPPORTED_STATES = 0x04 | 0x02 | 0x01
RTPG_LENGTH_ONLY, RTPG_EXTENDED = 0b000, 0b001  # PARAMETER DATA FORMAT (CDB byte 1 bits 7-5)


def target_port_groups_data(groups, extended: bool, transition_time: int = 0) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.36.2 tables 262-264)."""
    out = bytearray(8 if extended else 4)
    if extended:
        out[4] = 0x10  # FORMAT TYPE 001b: extended header
        out[5] = transition_time  # IMPLICIT TRANSITION TIME, seconds
    for g in groups:
        # PREF=0: no group is preferred over another beyond its state.
        # STATUS CODE 00h: no status available (no SET TARGET PORT GROUPS,
        # and no implicit transition has happened while the device ran).
        out += struct.pack(">BBHBBBB", int(g.state) & 0x0F, _SUPPORTED_STATES, g.id, 0, 0x00, 0,
                           len(g.relative_port_ids))
        for rel in g.relative_port_ids:
            out += struct.pack(">HH", 0, rel)
    # RETURN DATA LENGTH: the bytes that follow it (n - 3), the extended
    # header's four included (as sg_rtpg and Linux scsi_dh_alua read it).
    struct.pack_into(">I", out, 0, len(out) - 4)
    return bytes(out)


async def report_target_port_groups(cmd: Command) -> Reply:
    """SPC-4 §6.36: every target port group of the LU -- this gateway's and
    its peers' -- in the length-only (000b) or extended (001b) format."""
    cdb = cmd.cdb
    fmt = cdb[1] >> 5
    if fmt not in (RTPG_LENGTH_ONLY, RTPG_EXTENDED):
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=7)
    alloc = int.from_bytes(cdb[6:10], "big")
    tpg = cmd.device.port_groups
    data = target_port_groups_data(tpg.groups, fmt == RTPG_EXTENDED, tpg.implicit_transition_time)
    return Command.allocation(data, alloc)


# --- START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL -------------------------------


async def start_stop_unit(cmd: Command) -> Reply:
    """SBC-3 §5.25.  The medium is always available: START=1 and every power
    condition are accepted as no-ops; START=0 is accepted too without moving
    to the stopped state, since a virtual disk shared by several initiators
    must not become NOT READY for all of them because one shut down."""
    return None


async def prevent_allow_medium_removal(cmd: Command) -> Reply:
    """SPC-4 §6.13 / SBC-3 §5.12.  The LU is not removable (RMB=0), so only
    PREVENT=00b (allow removal) is meaningful; preventing removal of a medium
    that cannot be removed is rejected as INVALID FIELD IN CDB (libiscsi's
    PreventAllow tests only run against removable LUs)."""
    if cmd.cdb[4] & 0x03:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=4, bit=1)
    return None


# --- RESERVE / RELEASE (SPC-2 §7.21, §7.13; obsolete in SPC-4 but used) ----------


async def reserve(cmd: Command) -> Reply:
    """Reserve the whole LU for this I_T nexus.  Another nexus' reservation
    already produced RESERVATION CONFLICT in the pre-dispatch check (against
    the local copy; the decision here sees the shared record when several
    gateways export the LU); the holder may reserve again (SPC-2 §7.21.1)."""
    nexus = cmd.nexus

    def decide(state, holder):
        if holder is not None and holder != nexus:
            raise ReservationConflict
        if state.registrations:  # SPC-4 §5.12.3, CRH=0: as the pre-dispatch check
            raise ReservationConflict
        return state, nexus, Effects()

    try:
        await change_reservations(cmd.unit, nexus, decide)
    except ReservationConflict:
        return reservation_conflict()
    return None


async def release(cmd: Command) -> Reply:
    """Release our reservation; from any other nexus this is a successful
    no-op (SPC-2 §7.13.1)."""
    nexus = cmd.nexus

    def decide(state, holder):
        return state, None if holder == nexus else holder, Effects()

    await change_reservations(cmd.unit, nexus, decide)
    return None


def reservation_conflict() -> ScsiResult:
    return ScsiResult(status=Status.RESERVATION_CONFLICT)
