"""SCSI-3 persistent reservations (SPC-4 §5.12, §6.16, §6.17): a pure state machine.

Nothing here does I/O or knows iSCSI.  A logical unit owns one
:class:`PersistentReservations`; the rest of the core uses three entry points
and one callback (the split LIO draws with ``target_scsi3_emulate_pr_in``,
``target_scsi3_emulate_pr_out`` and ``target_check_reservation``):

* :meth:`PersistentReservations.conflicts` -- the pre-dispatch check: does the
  command's conflict class (its row in the opcode table) conflict with the
  current reservation for this I_T nexus (SPC-4 §5.12.1 table 63)?
* :func:`pr_in` -- PERSISTENT RESERVE IN parameter data from a state.
* :func:`pr_out` -- PERSISTENT RESERVE OUT: a *new* state plus the effects
  (unit attentions, nexuses whose tasks PREEMPT AND ABORT aborts).  The old
  state is never modified, so the caller can persist the new one first and
  commit it only once it is on stable storage (APTPL, SPC-4 §5.12.5).
* ``persist`` -- the callback the LU calls with :func:`encode`'d bytes of every
  new state while APTPL is (or just was) set; it must write them atomically.

Registrations belong to an I_T nexus, identified by its initiator port name
and target port name (SPC-4 §5.12.6), not to a connection or a session:
losing the nexus keeps them.  Port names are compared case-insensitively
(iSCSI names are normalized to lower case, RFC 3722; the ISID is hex).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .command import Nexus
from .sense import Reason, ScsiError

__all__ = [
    "PrType", "OutAction", "InAction", "PrConflict", "Registration", "PrState", "Effects",
    "ReservationConflict", "PersistentReservations", "pr_in", "pr_out", "encode", "decode",
    "parse_transport_id", "MAX_REGISTRATIONS",
]

LU_SCOPE = 0  # SPC-4 §6.16.3.3: the only scope SPC-4 still defines
#: Registration table size; beyond it INSUFFICIENT REGISTRATION RESOURCES
#: (SPC-4 §5.12.7).  Windows needs nodes x paths (wsfc-shared-disk.md §0.6).
MAX_REGISTRATIONS = 512
ISCSI_PROTOCOL_ID = 0x5  # SPC-4 §7.6.1 table 444


class PrType(enum.IntEnum):
    """SPC-4 §6.16.3.4 table 167."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8

    @property
    def all_registrants(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)

    @property
    def registrants_only(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)

    @property
    def exclusive_access(self) -> bool:
        """Reads are blocked too (the EA family)."""
        return self in (PrType.EXCLUSIVE_ACCESS, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)


class OutAction(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 §6.17.2 table 174)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


class InAction(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 §6.16.2 table 162)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrConflict(enum.Flag):
    """A command's row in SPC-4 §5.12.1 table 63 ("SPC commands that are
    allowed in the presence of various reservations") and the SBC-3 §4.17
    equivalent, reduced to the four columns that ever differ for the
    commands we implement, plus the SPC-2 RESERVE/RELEASE rule.  A set bit
    means *conflict*."""

    NONE = 0
    #: Write Exclusive (1) and the I_T nexus is not the holder.
    WE_NON_HOLDER = enum.auto()
    #: Exclusive Access (3) and the I_T nexus is not the holder.
    EA_NON_HOLDER = enum.auto()
    #: Write Exclusive - Registrants Only / All Registrants (5, 7), I_T nexus not registered.
    WE_UNREGISTERED = enum.auto()
    #: Exclusive Access - Registrants Only / All Registrants (6, 8), I_T nexus not registered.
    EA_UNREGISTERED = enum.auto()
    #: SPC-2 RESERVE/RELEASE: conflict whenever any I_T nexus is registered
    #: (SPC-4 §5.12.3 with CRH=0; SPC-3 §5.6.3).
    ANY_REGISTRATION = enum.auto()

    #: Reads: blocked only by the Exclusive Access family.
    READ = EA_NON_HOLDER | EA_UNREGISTERED
    #: Writes and other medium/state-changing commands: every column but "registered".
    WRITE = WE_NON_HOLDER | EA_NON_HOLDER | WE_UNREGISTERED | EA_UNREGISTERED


class ReservationConflict(Exception):
    """The command ends with RESERVATION CONFLICT status (not CHECK CONDITION)."""


def _norm(port: str) -> str:
    return port.lower()


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered I_T nexus (or, from SPEC_I_PT/ALL_TG_PT, a set of them).

    ``initiator_port`` is ``"<name>,i,0x<isid>"``, or just ``"<name>"`` for a
    TransportID of format 00b (every initiator port with that name, SPC-4
    §7.6.4.6).  ``target_port`` is None for ALL_TG_PT=1 (every target port).
    """

    key: int
    initiator_port: str
    target_port: str | None
    relative_port_id: int = 1
    transport_id: bytes = b""

    @property
    def ident(self) -> tuple[str, str | None]:
        return (self.initiator_port, self.target_port)

    def matches(self, nexus: Nexus) -> bool:
        if self.target_port is not None and self.target_port != _norm(nexus.target_port):
            return False
        ip = _norm(nexus.initiator_port)
        if self.initiator_port == ip:
            return True
        return ",i,0x" not in self.initiator_port and ip.split(",i,0x", 1)[0] == self.initiator_port

    def nexus(self) -> Nexus:
        """A nexus to address a unit attention to while no live one matches."""
        return Nexus(self.initiator_port, self.target_port or "", self.relative_port_id, self.transport_id)


@dataclass(frozen=True, slots=True)
class PrState:
    """Registrations (in registration order), the reservation, PRgeneration, APTPL."""

    generation: int = 0
    registrations: tuple[Registration, ...] = ()
    res_type: PrType | None = None
    #: ident of the holder's registration; None with an all-registrants type
    #: (every registrant is a holder, SPC-4 §5.12.10).
    res_holder: tuple[str, str | None] | None = None
    aptpl: bool = False

    def find(self, nexus: Nexus) -> Registration | None:
        for reg in self.registrations:
            if reg.matches(nexus):
                return reg
        return None

    @property
    def reserved(self) -> bool:
        return self.res_type is not None

    def is_holder(self, reg: Registration | None) -> bool:
        """SPC-4 §5.12.10: the holder is the reserving nexus, or every
        registrant for an all-registrants reservation."""
        if reg is None or self.res_type is None:
            return False
        return self.res_type.all_registrants or self.res_holder == reg.ident


@dataclass(slots=True)
class Effects:
    """What the caller must do after committing the new state."""

    #: (registration, condition): establish for the nexuses it stands for,
    #: except the nexus that sent the command.
    unit_attentions: list[tuple[Registration, Reason]] = field(default_factory=list)
    #: PREEMPT AND ABORT: abort every task from the nexuses of these registrations.
    abort: list[Registration] = field(default_factory=list)
    changed: bool = False


# --- conflict check (entry point 1) ---------------------------------------------


def conflicts(state: PrState, nexus: Nexus, conflict: PrConflict) -> bool:
    """SPC-4 §5.12.1: whether a command of class ``conflict`` from ``nexus``
    ends in RESERVATION CONFLICT under the current state."""
    if not conflict:
        return False
    if conflict & PrConflict.ANY_REGISTRATION and state.registrations:
        return True
    t = state.res_type
    if t is None:
        return False
    reg = state.find(nexus)
    if state.is_holder(reg):
        return False
    if t == PrType.WRITE_EXCLUSIVE:
        return bool(conflict & PrConflict.WE_NON_HOLDER)
    if t == PrType.EXCLUSIVE_ACCESS:
        return bool(conflict & PrConflict.EA_NON_HOLDER)
    if reg is not None:  # registered: every command is allowed (table 63, columns "registered")
        return False
    return bool(conflict & (PrConflict.EA_UNREGISTERED if t.exclusive_access else PrConflict.WE_UNREGISTERED))


# --- PERSISTENT RESERVE IN (entry point 2) ----------------------------------------


def pr_in(state: PrState, action: int, *, ptpl_capable: bool) -> bytes:
    """The parameter data of a PERSISTENT RESERVE IN service action, untruncated
    (the caller applies the ALLOCATION LENGTH: SPC-4 §6.16.1)."""
    gen = state.generation & 0xFFFFFFFF
    if action == InAction.READ_KEYS:
        # SPC-4 §6.16.2: one key per registered I_T nexus, duplicates included.
        keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations)
        return struct.pack(">II", gen, len(keys)) + keys
    if action == InAction.READ_RESERVATION:
        # SPC-4 §6.16.3: ADDITIONAL LENGTH 0 without a reservation, else 16;
        # the key is 0 for an all-registrants reservation (§6.16.3.2).
        if state.res_type is None:
            return struct.pack(">II", gen, 0)
        key = 0
        if not state.res_type.all_registrants:
            holder = next(r for r in state.registrations if r.ident == state.res_holder)
            key = holder.key
        return struct.pack(">IIQIBBH", gen, 16, key, 0, 0, (LU_SCOPE << 4) | state.res_type, 0)
    if action == InAction.REPORT_CAPABILITIES:
        return report_capabilities(state, ptpl_capable)
    if action == InAction.READ_FULL_STATUS:
        out = bytearray(struct.pack(">II", gen, 0))
        for r in state.registrations:
            holder = state.is_holder(r)
            tid = r.transport_id
            out += struct.pack(">QIBBIHI", r.key, 0, (0x02 if r.target_port is None else 0) | (0x01 if holder else 0),
                               ((LU_SCOPE << 4) | state.res_type) if holder and state.res_type else 0,
                               0, 0 if r.target_port is None else r.relative_port_id, len(tid))
            out += tid
        struct.pack_into(">I", out, 4, len(out) - 8)
        return bytes(out)
    raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=4)


def report_capabilities(state: PrState, ptpl_capable: bool) -> bytes:
    """SPC-4 §6.16.4 table 169.  Every bit is what this implementation does:
    CRH=0 (RESERVE/RELEASE conflict whenever a key is registered), SIP_C=1
    and ATP_C=1 (SPEC_I_PT and ALL_TG_PT are implemented), PTPL_C when the
    LU has somewhere to persist (a state_dir), TMV=1 with all six types, and
    ALLOW COMMANDS 011b: TEST UNIT READY passes every reservation, MODE SENSE
    and REPORT SUPPORTED OPERATION CODES pass Write Exclusive."""
    b2 = 0x08 | 0x04 | (0x01 if ptpl_capable else 0)
    b3 = 0x80 | (0b011 << 4) | (0x01 if state.aptpl else 0)
    mask = 0
    for t in PrType:
        mask |= {1: 0x0200, 3: 0x0800, 5: 0x2000, 6: 0x4000, 7: 0x8000, 8: 0x0001}[t]
    return struct.pack(">HBBHH", 8, b2, b3, mask, 0)


# --- PERSISTENT RESERVE OUT (entry point 3) ---------------------------------------


def _bad_param(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=byte, bit=bit, in_cdb=False)


def parse_transport_id(data: bytes | memoryview, offset: int) -> tuple[str, bytes, int]:
    """One iSCSI TransportID (SPC-4 §7.6.4.6) at ``offset`` of a parameter list:
    (normalized initiator port name, the TransportID bytes, its length).
    Format 00b names every port of an initiator (``"<name>"``), format 01b
    one port (``"<name>,i,0x<isid>"``).  Any other protocol or format is an
    INVALID FIELD IN PARAMETER LIST; a TransportID running past the data a
    PARAMETER LIST LENGTH ERROR."""
    if len(data) - offset < 4:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    fmt, proto = data[offset] >> 6, data[offset] & 0x0F
    if proto != ISCSI_PROTOCOL_ID or fmt not in (0, 1):
        raise _bad_param(offset, 7 if proto == ISCSI_PROTOCOL_ID else 3)
    length = int.from_bytes(data[offset + 2:offset + 4], "big")
    if length < 4 or length % 4:  # SPC-4 §7.6.4.6: a multiple of four
        raise _bad_param(offset + 2)
    end = offset + 4 + length
    if end > len(data):
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    raw = bytes(data[offset + 4:end])
    nul = raw.find(b"\0")
    if nul <= 0:  # null-terminated, non-empty
        raise _bad_param(offset + 4)
    try:
        text = raw[:nul].decode("utf-8").lower()
    except UnicodeDecodeError:
        raise _bad_param(offset + 4) from None
    if fmt == 0:
        if "," in text:
            raise _bad_param(offset + 4)
        port = text
    else:
        name, sep, isid = text.partition(",i,0x")
        if not sep or not name or len(isid) != 12 or any(c not in "0123456789abcdef" for c in isid):
            raise _bad_param(offset + 4)
        port = text
    return port, bytes(data[offset:end]), 4 + length


def encode_transport_id(initiator_port: str) -> bytes:
    """The iSCSI TransportID naming a registration's initiator port(s):
    format 01b for one port, 00b for every port of a name (SPC-4 §7.6.4.6)."""
    fmt = 1 if ",i,0x" in initiator_port else 0
    name = initiator_port.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes(((fmt << 6) | ISCSI_PROTOCOL_ID, 0)) + len(name).to_bytes(2, "big") + name


def _check_type_scope(scope: int, type_: int) -> PrType:
    if scope != LU_SCOPE:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=7)
    try:
        return PrType(type_)
    except ValueError:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=3) from None


def _next_gen(state: PrState) -> int:
    return (state.generation + 1) & 0xFFFFFFFF


def _without(state: PrState, gone: list[Registration], effects: Effects) -> PrState:
    """Drop registrations; a reservation whose holder is gone is released
    (for all-registrants: when the last registrant is gone, SPC-4 §5.12.11.2)."""
    idents = {r.ident for r in gone}
    regs = tuple(r for r in state.registrations if r.ident not in idents)
    res_type, res_holder = state.res_type, state.res_holder
    if res_type is not None:
        if res_type.all_registrants:
            if not regs:
                res_type = None
        elif res_holder in idents:
            res_type, res_holder = None, None
    return dataclasses.replace(state, registrations=regs, res_type=res_type,
                               res_holder=res_holder if res_type is not None else None)


def pr_out(
    state: PrState,
    nexus: Nexus,
    action: int,
    scope: int,
    type_: int,
    params: bytes | memoryview,
    *,
    ptpl_capable: bool,
    max_registrations: int = MAX_REGISTRATIONS,
) -> tuple[PrState, Effects]:
    """Execute one PERSISTENT RESERVE OUT.  Raises :class:`ScsiError` (CHECK
    CONDITION) or :class:`ReservationConflict`; else returns the new state
    and the effects to apply.  ``params`` is the whole parameter list."""
    action = OutAction(action)  # the dispatch table only routes known actions
    if action == OutAction.REGISTER_AND_MOVE:
        return _register_and_move(state, nexus, params, ptpl_capable=ptpl_capable,
                                  max_registrations=max_registrations)
    # SPC-4 §6.17.3: the basic parameter list is exactly 24 bytes, longer
    # only for REGISTER with SPEC_I_PT=1 (TransportIDs follow).
    if len(params) < 24:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    rk, sark = struct.unpack_from(">QQ", params, 0)
    flags = params[20]
    spec_i_pt, all_tg_pt, aptpl = bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01)
    if spec_i_pt and action == OutAction.REGISTER:
        if len(params) < 28:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    elif len(params) != 24:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    elif spec_i_pt:  # SPC-4 §6.17.3: SPEC_I_PT only means something for REGISTER
        raise _bad_param(20, 3)

    reg = state.find(nexus)
    effects = Effects()

    if action in (OutAction.REGISTER, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
        if aptpl and not ptpl_capable:
            raise _bad_param(20, 0)
        ignore = action == OutAction.REGISTER_AND_IGNORE_EXISTING_KEY
        if reg is None:
            # SPC-4 §5.12.7 table 64: an unregistered nexus must send RK 0
            # with REGISTER (REGISTER AND IGNORE ignores it).
            if not ignore and rk != 0:
                raise ReservationConflict()
            if sark == 0:
                # Nothing to register: GOOD, no change (not even APTPL or
                # PRgeneration: nothing was registered, §6.16.2).
                if spec_i_pt:
                    raise _bad_param(20, 3)
                return state, effects
            tport = None if all_tg_pt else _norm(nexus.target_port)
            new_regs = [Registration(sark, _norm(nexus.initiator_port), tport, nexus.relative_port_id,
                                     nexus.transport_id or encode_transport_id(_norm(nexus.initiator_port)))]
            if spec_i_pt:
                new_regs += _spec_i_pt_registrations(state, nexus, params, sark, tport)
            if len(state.registrations) + len(new_regs) > max_registrations:
                raise ScsiError(Reason.INSUFFICIENT_REGISTRATION_RESOURCES)
            new = dataclasses.replace(state, registrations=state.registrations + tuple(new_regs),
                                      generation=_next_gen(state), aptpl=aptpl)
            effects.changed = True
            return new, effects
        # A registered nexus.
        if not ignore and rk != reg.key:
            raise ReservationConflict()
        if spec_i_pt:  # SPC-4 §5.12.7: SPEC_I_PT on a registered nexus is invalid
            raise _bad_param(20, 3)
        if sark == 0:
            # Unregister (SPC-4 §5.12.11.2.? "releasing by unregistering"):
            # a registrants-only holder's reservation goes with it, and the
            # other registrants learn it as RESERVATIONS RELEASED.
            was_holder = state.is_holder(reg)
            new = _without(state, [reg], effects)
            if was_holder and state.res_type is not None and state.res_type.registrants_only:
                effects.unit_attentions += [(r, Reason.RESERVATIONS_RELEASED) for r in new.registrations]
        else:
            changed = dataclasses.replace(reg, key=sark)
            new = dataclasses.replace(
                state, registrations=tuple(changed if r.ident == reg.ident else r for r in state.registrations))
        new = dataclasses.replace(new, generation=_next_gen(state), aptpl=aptpl)
        effects.changed = True
        return new, effects

    # Every other action needs a registered nexus with the matching key
    # (SPC-4 §5.12.9, §5.12.11, §5.12.12: else RESERVATION CONFLICT).  Type
    # and scope are checked first: they are CDB errors.
    if action in (OutAction.RESERVE, OutAction.RELEASE, OutAction.PREEMPT, OutAction.PREEMPT_AND_ABORT):
        ptype = _check_type_scope(scope, type_)
    if reg is None or rk != reg.key:
        raise ReservationConflict()

    if action == OutAction.RESERVE:
        # SPC-4 §5.12.9: a new reservation, or GOOD for the holder repeating
        # the same type; anything else conflicts.
        if state.res_type is None:
            holder = None if ptype.all_registrants else reg.ident
            return dataclasses.replace(state, res_type=ptype, res_holder=holder), Effects(changed=True)
        if state.is_holder(reg) and state.res_type == ptype:
            return state, effects
        raise ReservationConflict()

    if action == OutAction.RELEASE:
        # SPC-4 §5.12.11.2.2: a non-holder's RELEASE is GOOD and does nothing.
        if state.res_type is None or not state.is_holder(reg):
            return state, effects
        if state.res_type != ptype:
            raise ScsiError(Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        new = dataclasses.replace(state, res_type=None, res_holder=None)
        if ptype.registrants_only or ptype.all_registrants:
            effects.unit_attentions += [(r, Reason.RESERVATIONS_RELEASED) for r in state.registrations
                                        if r.ident != reg.ident]
        effects.changed = True
        return new, effects

    if action == OutAction.CLEAR:
        # SPC-4 §5.12.11.6: every registration and the reservation go; every
        # other registered nexus gets RESERVATIONS PREEMPTED.
        effects.unit_attentions += [(r, Reason.RESERVATIONS_PREEMPTED) for r in state.registrations
                                    if r.ident != reg.ident]
        effects.changed = True
        return dataclasses.replace(state, registrations=(), res_type=None, res_holder=None,
                                   generation=_next_gen(state)), effects

    # PREEMPT / PREEMPT AND ABORT (SPC-4 §5.12.11.4, §5.12.11.5).
    abort = action == OutAction.PREEMPT_AND_ABORT
    res = state.res_type
    victims: list[Registration]
    if res is not None and res.all_registrants and sark == 0:
        # §5.12.11.4.3: SARK 0 with an all-registrants reservation preempts
        # every other registrant and takes the reservation.
        victims = [r for r in state.registrations if r.ident != reg.ident]
        take = True
    else:
        if sark == 0:
            raise _bad_param(8)
        victims = [r for r in state.registrations if r.key == sark and r.ident != reg.ident]
        holder_key = None
        if res is not None and not res.all_registrants:
            holder_key = next(r for r in state.registrations if r.ident == state.res_holder).key
        take = holder_key is not None and sark == holder_key
        # §5.12.11.4.4: SARK naming nobody is a conflict (the preempting
        # nexus's own key counts as "somebody" only when it is the holder's).
        if not victims and not take:
            raise ReservationConflict()
    new = _without(state, victims, effects)
    if take:
        # The reservation is (re)created for the preempting nexus with the
        # new type; registrants that keep their registration learn about a
        # changed type as RESERVATIONS RELEASED (§5.12.11.4.3).
        new = dataclasses.replace(new, res_type=ptype, res_holder=None if ptype.all_registrants else reg.ident)
        if res is not None and res != ptype:
            effects.unit_attentions += [(r, Reason.RESERVATIONS_RELEASED) for r in new.registrations
                                        if r.ident != reg.ident]
    effects.unit_attentions += [(r, Reason.REGISTRATIONS_PREEMPTED) for r in victims]
    if abort:
        effects.abort = victims
    effects.changed = True
    return dataclasses.replace(new, generation=_next_gen(state)), effects


def _spec_i_pt_registrations(state: PrState, nexus: Nexus, params, sark: int,
                             tport: str | None) -> list[Registration]:
    """SPC-4 §6.17.3 / §5.12.7: REGISTER with SPEC_I_PT=1 also registers each
    initiator port named by a TransportID (with the receiving target port, or
    every one with ALL_TG_PT).  All or nothing: one bad TransportID fails
    the whole command."""
    tid_len = int.from_bytes(params[24:28], "big")
    if 28 + tid_len > len(params):
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    out: list[Registration] = []
    seen = {_norm(nexus.initiator_port)}
    off, end = 28, 28 + tid_len
    while off < end:
        port, tid, n = parse_transport_id(params[:end], off)
        probe = Nexus(port, nexus.target_port)
        if port in seen or any(r.matches(probe) for r in state.registrations):
            # Already registered (or named twice): SPC-4 §6.17.3 says the
            # command is invalid rather than silently changing a key.
            raise _bad_param(off)
        seen.add(port)
        out.append(Registration(sark, port, tport, nexus.relative_port_id, tid))
        off += n
    return out


def _register_and_move(state: PrState, nexus: Nexus, params, *, ptpl_capable: bool,
                       max_registrations: int) -> tuple[PrState, Effects]:
    """SPC-4 §5.12.8 / §6.17.4 table 183: register another I_T nexus and move
    this nexus's reservation to it; UNREG=1 also unregisters this nexus."""
    if len(params) < 24:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    rk, sark = struct.unpack_from(">QQ", params, 0)
    unreg, aptpl = bool(params[17] & 0x02), bool(params[17] & 0x01)
    rel_port = int.from_bytes(params[18:20], "big")
    tid_len = int.from_bytes(params[20:24], "big")
    if 24 + tid_len > len(params):
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    reg = state.find(nexus)
    if reg is None or rk != reg.key:
        raise ReservationConflict()
    # Only the holder of a non-all-registrants reservation can move it.
    res = state.res_type
    if res is None or res.all_registrants or state.res_holder != reg.ident:
        raise ReservationConflict()
    if sark == 0:
        raise _bad_param(8)
    if aptpl and not ptpl_capable:
        raise _bad_param(17, 0)
    port, tid, _ = parse_transport_id(params[:24 + tid_len], 24)
    if rel_port != nexus.relative_port_id:  # we know only the receiving target port
        raise _bad_param(18)
    dest_nexus = Nexus(port, nexus.target_port, rel_port)
    if reg.matches(dest_nexus):  # moving to oneself is invalid (§6.17.4)
        raise _bad_param(24)
    effects = Effects(changed=True)
    dest = next((r for r in state.registrations if r.matches(dest_nexus)), None)
    regs = list(state.registrations)
    if dest is None:
        if len(regs) >= max_registrations:
            raise ScsiError(Reason.INSUFFICIENT_REGISTRATION_RESOURCES)
        dest = Registration(sark, port, _norm(nexus.target_port), rel_port, tid)
        regs.append(dest)
    else:
        moved = dataclasses.replace(dest, key=sark)
        regs = [moved if r.ident == dest.ident else r for r in regs]
        dest = moved
    if unreg:
        regs = [r for r in regs if r.ident != reg.ident]
    new = dataclasses.replace(state, registrations=tuple(regs), res_holder=dest.ident,
                              generation=_next_gen(state), aptpl=aptpl)
    return new, effects


# --- persistence: the state as bytes (what the callback writes) ------------------

_FORMAT = 1


def registration_doc(r: Registration) -> dict:
    """A registration as JSON-able data (the state file, and the change
    notices gateways send each other)."""
    return {"key": f"{r.key:016x}", "initiator_port": r.initiator_port, "target_port": r.target_port,
            "relative_port_id": r.relative_port_id, "transport_id": r.transport_id.hex()}


def registration_from_doc(r: dict) -> Registration:
    """Inverse of :func:`registration_doc`; KeyError/TypeError/ValueError when malformed."""
    return Registration(int(r["key"], 16), str(r["initiator_port"]),
                        None if r["target_port"] is None else str(r["target_port"]),
                        int(r["relative_port_id"]), bytes.fromhex(r["transport_id"]))


def encode(state: PrState) -> bytes:
    return json.dumps(state_doc(state), indent=1, sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> PrState:
    """Inverse of :func:`encode`; ValueError for anything malformed."""
    return state_from_doc(json.loads(data))


def state_doc(state: PrState) -> dict:
    """The state as JSON-able data (the APTPL file, the record gateways share)."""
    return {
        "format": _FORMAT,
        "generation": state.generation,
        "aptpl": state.aptpl,
        "registrations": [registration_doc(r) for r in state.registrations],
        "reservation": None if state.res_type is None else {
            "type": int(state.res_type),
            "holder": None if state.res_holder is None else list(state.res_holder),
        },
    }


def state_from_doc(doc) -> PrState:
    """Inverse of :func:`state_doc`; ValueError for anything malformed."""
    try:
        if doc.get("format") != _FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        regs = tuple(registration_from_doc(r) for r in doc["registrations"])
        res = doc["reservation"]
        res_type = None if res is None else PrType(res["type"])
        holder = None
        if res is not None and res["holder"] is not None:
            holder = (str(res["holder"][0]), None if res["holder"][1] is None else str(res["holder"][1]))
        state = PrState(int(doc["generation"]) & 0xFFFFFFFF, regs, res_type, holder, bool(doc["aptpl"]))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"malformed persistent reservation state: {e!r}") from None
    idents = [r.ident for r in regs]
    if len(set(idents)) != len(idents):
        raise ValueError("duplicate registration")
    if res_type is not None and not res_type.all_registrants and holder not in idents:
        raise ValueError("reservation holder is not registered")
    if res_type is not None and not regs:
        raise ValueError("reservation without registrations")
    return state


class PersistentReservations:
    """The PR state of one logical unit and where it persists.

    ``persist`` (None: APTPL not supported, PTPL_C=0) receives the encoded
    new state before it is committed, whenever APTPL is set in the new or
    the old state (so turning APTPL off also reaches the disk).  It blocks;
    the command handler runs it off the event loop, one PR OUT at a time.
    """

    __slots__ = ("state", "persist", "max_registrations", "durable")

    def __init__(self, state: PrState | None = None, persist: Callable[[bytes], None] | None = None,
                 max_registrations: int = MAX_REGISTRATIONS, *, durable: bool = False) -> None:
        self.state = state if state is not None else PrState()
        self.persist = persist
        self.max_registrations = max_registrations
        #: Every state is kept by a shared authority that persists it anyway
        #: (several gateways, :mod:`.pr_shared`): PTPL_C=1 with no callback.
        self.durable = durable

    @property
    def ptpl_capable(self) -> bool:
        return self.durable or self.persist is not None

    def conflicts(self, nexus: Nexus, conflict: PrConflict) -> bool:
        return conflicts(self.state, nexus, conflict)

    def pr_in(self, action: int) -> bytes:
        return pr_in(self.state, action, ptpl_capable=self.ptpl_capable)

    def pr_out(self, nexus: Nexus, action: int, scope: int, type_: int,
               params: bytes | memoryview, state: PrState | None = None) -> tuple[PrState, Effects]:
        """``state``: decide from this state (the shared authority's latest)
        instead of the local copy."""
        return pr_out(self.state if state is None else state, nexus, action, scope, type_, params,
                      ptpl_capable=self.ptpl_capable, max_registrations=self.max_registrations)

    def needs_persist(self, new: PrState) -> bool:
        return self.persist is not None and new is not self.state and (new.aptpl or self.state.aptpl)
