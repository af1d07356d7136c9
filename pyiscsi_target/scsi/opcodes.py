"""The one dispatch table: every command the core implements, keyed by opcode.

Each :class:`OpSpec` row is the only description of a command: its handler,
data direction, whether it may run with a unit attention pending or for an
unconfigured LUN, its place under reservations, and its CDB USAGE DATA
(SPC-4 §6.35.3).  The usage bitmap does double duty: REPORT SUPPORTED
OPERATION CODES returns it, and the pre-dispatch check rejects any CDB bit
outside it with INVALID FIELD IN CDB and an exact field pointer (reserved
bits, RDPROTECT/WRPROTECT without protection information, ANCHOR, NACA...).

Opcodes with service actions (9Eh SERVICE ACTION IN(16), A3h MAINTENANCE
IN) map to a :class:`ServiceActions` sub-table keyed by byte 1 bits 4-0.

Pre-dispatch checks run in :data:`PRE_DISPATCH` order, as in tgt's
``scsi_cmd_perform``: LUN exists, unit attention, opcode known, opcode
supported by this LU, CDB length and bits, SCSI-2 reservation, persistent
reservation (hook).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import mode, sbc, spc, spc_pr
from .command import ScsiResult, Status
from .context import Command, Reply
from .lun import LogicalUnit
from .pr import PrConflict
from .sense import Reason, ScsiError

__all__ = ["DataDirection", "OpSpec", "ServiceActions", "COMMANDS", "PRE_DISPATCH", "resolve"]

Handler = Callable[[Command], Awaitable[Reply]]


class DataDirection(enum.IntEnum):
    NONE = 0
    IN = 1  # Data-In: target to initiator
    OUT = 2  # Data-Out: initiator to target


@dataclass(frozen=True, slots=True)
class OpSpec:
    opcode: int
    name: str
    handler: Handler
    usage: bytes  # CDB USAGE DATA; its length is the CDB length
    direction: DataDirection = DataDirection.NONE
    service_action: int | None = None
    # SAM-5 §5.14 / SPC-4 §5.14: not blocked (and UA not cleared) by a pending UA.
    allowed_with_ua: bool = False
    # Served for a LUN that is not configured (SPC-4 §6.6.1, §6.33, §6.39).
    no_lun_ok: bool = False
    # Allowed from other nexuses while an SPC-2 RESERVE is held (SPC-2 §5.5.1).
    scsi2_allowed: bool = False
    # Served through a target port group in the ALUA standby state: the list
    # of SPC-4 §5.16.2.4.4 (others get NOT READY, 04/0Bh).
    standby_ok: bool = False
    # Persistent reservation conflict class: its row in SPC-4 §5.12.1 table 63
    # (see pr.PrConflict), or a function of the CDB for the commands whose row
    # depends on a field (START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL).
    # None = not classified: treated as WRITE (conflicts wherever anything does).
    pr_conflict: PrConflict | Callable[[bytes], PrConflict] | None = None
    # None: always supported; else whether this LU supports it (e.g. UNMAP only when thin).
    supported: Callable[[LogicalUnit], bool] | None = None
    # Command timeouts descriptor (SPC-4 §6.35.4): nominal, recommended, seconds.
    timeout: tuple[int, int] = (0, 30)
    # The handler's answer without waiting, for the quick lane of
    # ScsiTargetDevice.submit: quick(lu, cdb) -> the reply as ``handler``
    # gives it, or None when it would have to wait (then ``handler`` runs).
    # Only for commands with no side effect before that point (READ).
    quick: Callable[[LogicalUnit, bytes], object] | None = None

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


@dataclass(frozen=True, slots=True)
class ServiceActions:
    """Service action sub-table of one opcode; SA in byte 1 bits 4-0."""

    opcode: int
    actions: dict[int, OpSpec] = field(default_factory=dict)


def _u(hexbytes: str) -> bytes:
    return bytes.fromhex(hexbytes)


def _thin(lu: LogicalUnit) -> bool:
    return lu.thin


def _thin_or_read_only(lu: LogicalUnit) -> bool:
    """UNMAP: on a thin LU; on a read-only LU too, where it is a write like
    any other and gets WRITE PROTECTED (libiscsi ReadOnly.ReadOnlySBC)."""
    return lu.thin or lu.read_only


IN, OUT = DataDirection.IN, DataDirection.OUT
_ANY, _RD, _WR, _RSV = PrConflict.NONE, PrConflict.READ, PrConflict.WRITE, PrConflict.ANY_REGISTRATION


def _start_stop_pr(cdb: bytes) -> PrConflict:
    """SBC-3 §4.17 table 13: START=1 with POWER CONDITION 0 is allowed; any
    other START STOP UNIT changes the LU's state for every nexus."""
    return _ANY if cdb[4] & 0x01 and not cdb[4] >> 4 else _WR


def _prevent_allow_pr(cdb: bytes) -> PrConflict:
    """SPC-4 §5.12.1 table 63: PREVENT=00b (allow removal) is allowed, else conflicts."""
    return _WR if cdb[4] & 0x03 else _ANY

# Control byte usage is 00h: NACA and LINK are not supported (INQUIRY NORMACA=0).
_SPECS: tuple[OpSpec, ...] = (
    # --- SPC-4 --------------------------------------------------------------
    OpSpec(0x00, "TEST UNIT READY", spc.test_unit_ready, _u("00 00 00 00 00 00"), pr_conflict=_ANY),
    OpSpec(0x03, "REQUEST SENSE", spc.request_sense, _u("03 00 00 00 FF 00"), IN,
           allowed_with_ua=True, no_lun_ok=True, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x12, "INQUIRY", spc.inquiry, _u("12 01 FF FF FF 00"), IN,
           allowed_with_ua=True, no_lun_ok=True, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x15, "MODE SELECT(6)", mode.mode_select6, _u("15 11 00 00 FF 00"), OUT, pr_conflict=_WR, standby_ok=True),
    OpSpec(0x16, "RESERVE(6)", spc.reserve, _u("16 00 00 00 00 00"), pr_conflict=_RSV),
    OpSpec(0x17, "RELEASE(6)", spc.release, _u("17 00 00 00 00 00"), scsi2_allowed=True, pr_conflict=_RSV),
    OpSpec(0x1A, "MODE SENSE(6)", mode.mode_sense6, _u("1A 08 FF FF FF 00"), IN, pr_conflict=_RD, standby_ok=True),
    OpSpec(0x1B, "START STOP UNIT", spc.start_stop_unit, _u("1B 01 00 0F F7 00"), pr_conflict=_start_stop_pr),
    OpSpec(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", spc.prevent_allow_medium_removal, _u("1E 00 00 00 03 00"), pr_conflict=_prevent_allow_pr),
    OpSpec(0x55, "MODE SELECT(10)", mode.mode_select10, _u("55 11 00 00 00 00 00 FF FF 00"), OUT, pr_conflict=_WR, standby_ok=True),
    OpSpec(0x56, "RESERVE(10)", spc.reserve, _u("56 00 00 00 00 00 00 00 00 00"), pr_conflict=_RSV),
    OpSpec(0x57, "RELEASE(10)", spc.release, _u("57 00 00 00 00 00 00 00 00 00"), scsi2_allowed=True, pr_conflict=_RSV),
    OpSpec(0x5A, "MODE SENSE(10)", mode.mode_sense10, _u("5A 18 FF FF 00 00 00 FF FF 00"), IN, pr_conflict=_RD, standby_ok=True),
    # SPC-4 §6.16/§6.17.  PR IN/OUT are allowed under every persistent
    # reservation (table 63); the service action itself decides.  PR IN also
    # passes an SPC-2 reservation: Windows must always be able to read
    # reservations (windows-initiator.md §5.8), PR OUT does not (SPC-2 §5.5.1).
    # SCOPE/TYPE are evaluated by RESERVE, RELEASE and PREEMPT(-AND-ABORT) and
    # ignored by the others (SPC-4 §6.17.2), never rejected.
    OpSpec(0x5E, "PERSISTENT RESERVE IN (READ KEYS)", spc_pr.persistent_reserve_in,
           _u("5E 1F 00 00 00 00 00 FF FF 00"), IN, service_action=0x00, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5E, "PERSISTENT RESERVE IN (READ RESERVATION)", spc_pr.persistent_reserve_in,
           _u("5E 1F 00 00 00 00 00 FF FF 00"), IN, service_action=0x01, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5E, "PERSISTENT RESERVE IN (REPORT CAPABILITIES)", spc_pr.persistent_reserve_in,
           _u("5E 1F 00 00 00 00 00 FF FF 00"), IN, service_action=0x02, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5E, "PERSISTENT RESERVE IN (READ FULL STATUS)", spc_pr.persistent_reserve_in,
           _u("5E 1F 00 00 00 00 00 FF FF 00"), IN, service_action=0x03, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (REGISTER)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x00, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (RESERVE)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x01, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (RELEASE)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x02, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (CLEAR)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x03, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (PREEMPT)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x04, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (PREEMPT AND ABORT)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x05, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (REGISTER AND IGNORE EXISTING KEY)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x06, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0x5F, "PERSISTENT RESERVE OUT (REGISTER AND MOVE)", spc_pr.persistent_reserve_out,
           _u("5F 1F FF 00 00 FF FF FF FF 00"), OUT, service_action=0x07, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0xA0, "REPORT LUNS", spc.report_luns, _u("A0 00 FF 00 00 00 FF FF FF FF 00 00"), IN,
           allowed_with_ua=True, no_lun_ok=True, scsi2_allowed=True, pr_conflict=_ANY, standby_ok=True),
    OpSpec(0xA3, "REPORT SUPPORTED OPERATION CODES", spc.report_supported_operation_codes,
           _u("A3 1F 87 FF FF FF FF FF FF FF 00 00"), IN, service_action=0x0C, pr_conflict=_ANY),
    # SPC-4 §6.36: PARAMETER DATA FORMAT in byte 1 bits 7-5 (the handler
    # accepts 000b and 001b).  Allowed under every reservation (table 63)
    # and in standby (§5.16.2.4.4): it is how a host finds the active path.
    OpSpec(0xA3, "REPORT TARGET PORT GROUPS", spc.report_target_port_groups,
           _u("A3 FF 00 00 00 00 FF FF FF FF 00 00"), IN, service_action=0x0A, scsi2_allowed=True,
           pr_conflict=_ANY, standby_ok=True),
    # --- SBC-3 --------------------------------------------------------------
    OpSpec(0x08, "READ(6)", sbc.read, _u("08 1F FF FF FF 00"), IN, pr_conflict=_RD, quick=sbc.read_now),
    OpSpec(0x0A, "WRITE(6)", sbc.write, _u("0A 1F FF FF FF 00"), OUT, pr_conflict=_WR),
    OpSpec(0x25, "READ CAPACITY(10)", sbc.read_capacity10, _u("25 00 FF FF FF FF 00 00 01 00"), IN,
           scsi2_allowed=True, pr_conflict=_ANY),
    OpSpec(0x28, "READ(10)", sbc.read, _u("28 1C FF FF FF FF 1F FF FF 00"), IN, pr_conflict=_RD, quick=sbc.read_now),
    OpSpec(0x2A, "WRITE(10)", sbc.write, _u("2A 18 FF FF FF FF 1F FF FF 00"), OUT, pr_conflict=_WR),
    OpSpec(0x2E, "WRITE AND VERIFY(10)", sbc.write_and_verify, _u("2E 16 FF FF FF FF 1F FF FF 00"), OUT, pr_conflict=_WR),
    OpSpec(0x2F, "VERIFY(10)", sbc.verify, _u("2F 16 FF FF FF FF 1F FF FF 00"), OUT, pr_conflict=_RD),
    OpSpec(0x34, "PRE-FETCH(10)", sbc.pre_fetch, _u("34 02 FF FF FF FF 1F FF FF 00"), pr_conflict=_RD),
    OpSpec(0x35, "SYNCHRONIZE CACHE(10)", sbc.synchronize_cache, _u("35 02 FF FF FF FF 1F FF FF 00"), pr_conflict=_WR),
    OpSpec(0x41, "WRITE SAME(10)", sbc.write_same, _u("41 08 FF FF FF FF 1F FF FF 00"), OUT, pr_conflict=_WR),
    OpSpec(0x42, "UNMAP", sbc.unmap, _u("42 00 00 00 00 00 1F FF FF 00"), OUT, supported=_thin_or_read_only,
           pr_conflict=_WR),
    OpSpec(0x88, "READ(16)", sbc.read, _u("88 1C FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), IN, pr_conflict=_RD,
           quick=sbc.read_now),
    OpSpec(0x89, "COMPARE AND WRITE", sbc.compare_and_write,
           _u("89 18 FF FF FF FF FF FF FF FF 00 00 00 FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0x8A, "WRITE(16)", sbc.write, _u("8A 18 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0x8E, "WRITE AND VERIFY(16)", sbc.write_and_verify,
           _u("8E 16 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0x8F, "VERIFY(16)", sbc.verify, _u("8F 16 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_RD),
    OpSpec(0x90, "PRE-FETCH(16)", sbc.pre_fetch, _u("90 02 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), pr_conflict=_RD),
    OpSpec(0x91, "SYNCHRONIZE CACHE(16)", sbc.synchronize_cache,
           _u("91 02 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), pr_conflict=_WR),
    OpSpec(0x93, "WRITE SAME(16)", sbc.write_same, _u("93 09 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0x9E, "READ CAPACITY(16)", sbc.read_capacity16, _u("9E 1F FF FF FF FF FF FF FF FF FF FF FF FF 01 00"),
           IN, service_action=0x10, scsi2_allowed=True, pr_conflict=_ANY),
    OpSpec(0x9E, "GET LBA STATUS", sbc.get_lba_status, _u("9E 1F FF FF FF FF FF FF FF FF FF FF FF FF 00 00"),
           IN, service_action=0x12, supported=_thin, pr_conflict=_RD),
    OpSpec(0xA8, "READ(12)", sbc.read, _u("A8 1C FF FF FF FF FF FF FF FF 1F 00"), IN, pr_conflict=_RD, quick=sbc.read_now),
    OpSpec(0xAA, "WRITE(12)", sbc.write, _u("AA 18 FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0xAE, "WRITE AND VERIFY(12)", sbc.write_and_verify, _u("AE 16 FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_WR),
    OpSpec(0xAF, "VERIFY(12)", sbc.verify, _u("AF 16 FF FF FF FF FF FF FF FF 1F 00"), OUT, pr_conflict=_RD),
    OpSpec(0x8B, "ORWRITE(16)", sbc.orwrite, _u("8B 18 FF FF FF FF FF FF FF FF FF FF FF FF 1F 00"), OUT,
           pr_conflict=_WR),
    # REQ_PLIST, REQ_GLIST, DEFECT LIST FORMAT; (12) also ADDRESS DESCRIPTOR INDEX.
    OpSpec(0x37, "READ DEFECT DATA(10)", sbc.read_defect_data, _u("37 00 1F 00 00 00 00 FF FF 00"), IN,
           pr_conflict=_RD),
    OpSpec(0xB7, "READ DEFECT DATA(12)", sbc.read_defect_data, _u("B7 1F FF FF FF FF FF FF FF FF 00 00"), IN,
           pr_conflict=_RD),
)


def _build(specs: tuple[OpSpec, ...]) -> dict[int, OpSpec | ServiceActions]:
    table: dict[int, OpSpec | ServiceActions] = {}
    for spec in specs:
        assert spec.usage[0] == spec.opcode, spec.name
        if spec.service_action is None:
            assert spec.opcode not in table, spec.name
            table[spec.opcode] = spec
        else:
            sa = table.setdefault(spec.opcode, ServiceActions(spec.opcode))
            assert isinstance(sa, ServiceActions) and spec.service_action not in sa.actions, spec.name
            assert spec.usage[1] & 0x1F == 0x1F, spec.name  # the SA field itself is evaluated
            sa.actions[spec.service_action] = spec
    return table


COMMANDS: dict[int, OpSpec | ServiceActions] = _build(_SPECS)


def resolve(table: dict[int, OpSpec | ServiceActions], cdb: bytes) -> tuple[OpSpec | None, ScsiError | None]:
    """Find the row for a CDB, or the error that an unknown one deserves."""
    if not cdb:
        return None, ScsiError(Reason.INVALID_COMMAND_OPERATION_CODE, field_pointer=0, bit=7)
    entry = table.get(cdb[0])
    if entry is None:
        return None, ScsiError(Reason.INVALID_COMMAND_OPERATION_CODE, field_pointer=0, bit=7)
    if isinstance(entry, ServiceActions):
        spec = entry.actions.get(cdb[1] & 0x1F) if len(cdb) > 1 else None
        if spec is None:
            # SPC-4 §4.2.5.2: an unsupported service action is an invalid
            # field (libiscsi accepts field pointer 1 for these opcodes).
            return None, ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=4)
        return spec, None
    return entry, None


# --- pre-dispatch checks: each returns None to go on, a result to stop, or raises.

Check = Callable[[Command], "ScsiResult | None"]


def check_lun(cmd: Command) -> ScsiResult | None:
    """SPC-4 §4.2.? / SAM-5 §5.8: a LUN that is not configured answers only
    INQUIRY (PQ=3), REPORT LUNS and REQUEST SENSE; everything else gets
    LOGICAL UNIT NOT SUPPORTED."""
    if cmd.lu is None and not (cmd.spec is not None and cmd.spec.no_lun_ok):
        raise ScsiError(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
    return None


def check_unit_attention(cmd: Command) -> ScsiResult | None:
    """SAM-5 §5.14: report one queued UA, clearing it, to any command other
    than INQUIRY, REPORT LUNS or REQUEST SENSE -- unknown opcodes included."""
    lu = cmd.lu
    if lu is None or (cmd.spec is not None and cmd.spec.allowed_with_ua):
        return None
    reason = lu.unit_attentions.pop(cmd.nexus)
    if reason is not None:
        raise ScsiError(reason)
    return None


def check_opcode(cmd: Command) -> ScsiResult | None:
    if cmd.spec is None:
        assert cmd.lookup_error is not None
        raise cmd.lookup_error
    supported = cmd.spec.supported
    if supported is not None and cmd.lu is not None and not supported(cmd.lu):
        # Not offered by this LU (e.g. UNMAP on a fully provisioned one).
        if cmd.spec.service_action is not None:
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=4)
        raise ScsiError(Reason.INVALID_COMMAND_OPERATION_CODE, field_pointer=0, bit=7)
    return None


def check_cdb_bits(cmd: Command) -> ScsiResult | None:
    """Every CDB bit the usage map does not mark must be zero (SPC-4 §4.2.5:
    reserved fields; unsupported options such as RDPROTECT or NACA)."""
    spec = cmd.spec
    assert spec is not None
    cdb = cmd.cdb
    usage = spec.usage
    if len(cdb) < len(usage):
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=len(cdb), bit=7)
    for i in range(1, len(usage)):
        bad = cdb[i] & ~usage[i]
        if bad:
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=i, bit=bad.bit_length() - 1)
    return None


def check_alua_standby(cmd: Command) -> ScsiResult | None:
    """SPC-4 §5.16.2.4.4: through a target port group in standby only the
    commands marked ``standby_ok`` run; the rest end in NOT READY, LOGICAL
    UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE, so the host's
    multipath driver moves the I/O to an active group.  Active/optimized and
    active/non-optimized serve everything.  Without a standby group (the
    usual case) this is one empty-set test."""
    standby = cmd.device.port_groups.standby_ports
    if standby and cmd.nexus.relative_port_id in standby:
        assert cmd.spec is not None
        if not cmd.spec.standby_ok:
            raise ScsiError(Reason.LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE)
    return None


def check_scsi2_reservation(cmd: Command) -> ScsiResult | None:
    """SPC-2 §5.5.1: while another I_T nexus holds RESERVE(6)/(10), only the
    commands marked ``scsi2_allowed`` run; the rest end in RESERVATION CONFLICT."""
    lu = cmd.lu
    if lu is None or lu.reserved_by is None or lu.reserved_by == cmd.nexus:
        return None
    assert cmd.spec is not None
    if cmd.spec.scsi2_allowed:
        return None
    return ScsiResult(status=Status.RESERVATION_CONFLICT)


def check_persistent_reservation(cmd: Command) -> ScsiResult | None:
    """SPC-4 §5.12.1: RESERVATION CONFLICT when the command's row of table 63
    (``cmd.spec.pr_conflict``) conflicts with the LU's persistent reservation
    for this I_T nexus.  Without registrations nothing can conflict, which
    keeps the common path to one attribute test."""
    lu = cmd.lu
    if lu is None or not lu.pr.state.registrations:
        return None
    assert cmd.spec is not None
    conflict = cmd.spec.pr_conflict
    if conflict is None:
        conflict = PrConflict.WRITE
    elif not isinstance(conflict, PrConflict):
        conflict = conflict(cmd.cdb)
    if lu.pr.conflicts(cmd.nexus, conflict):
        return ScsiResult(status=Status.RESERVATION_CONFLICT)
    return None


PRE_DISPATCH: tuple[Check, ...] = (
    check_lun,
    check_unit_attention,
    check_opcode,
    check_cdb_bits,
    check_alua_standby,
    check_scsi2_reservation,
    check_persistent_reservation,
)
