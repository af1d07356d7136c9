"""scsi/pr.py as a pure state machine: every service action, type and unit
attention, without a device (SPC-4 §5.12, §6.16, §6.17)."""

from __future__ import annotations

import struct

import pytest

from pyiscsi_target.scsi import pr
from pyiscsi_target.scsi.command import Nexus
from pyiscsi_target.scsi.pr import InAction, OutAction, PrConflict, PrType, ReservationConflict
from pyiscsi_target.scsi.sense import Reason, ScsiError

TP = "iqn.2026-11.org.example:disk,t,0x0001"
A = Nexus("iqn.1991-05.com.microsoft:node1,i,0x400001370000", TP)
A2 = Nexus("iqn.1991-05.com.microsoft:node1,i,0x400001370001", TP)  # node1's second MPIO path
B = Nexus("iqn.1991-05.com.microsoft:node2,i,0x400001370000", TP)
C = Nexus("iqn.1991-05.com.microsoft:node3,i,0x400001370000", TP)
KA, KB, KC = 0x1111_0000_0000_00AA, 0x2222_0000_0000_00BB, 0x3333_0000_0000_00CC


def params(rk=0, sark=0, *, spec_i_pt=False, all_tg_pt=False, aptpl=False, tids: bytes | None = None) -> bytes:
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    body = struct.pack(">QQIBBH", rk, sark, 0, flags, 0, 0)
    if tids is not None:
        body += len(tids).to_bytes(4, "big") + tids
    return body


class Lu:
    """A PersistentReservations plus the effects that landed, for assertions."""

    def __init__(self, ptpl=False):
        self.pr = pr.PersistentReservations(persist=(lambda b: None) if ptpl else None)
        self.uas: list[tuple[str, Reason]] = []
        self.aborted: list[str] = []

    def out(self, nexus, action, rk=0, sark=0, type_=0, scope=0, **kw):
        new, eff = self.pr.pr_out(nexus, action, scope, type_, params(rk, sark, **kw))
        self.pr.state = new
        self.uas += [(r.initiator_port, reason) for r, reason in eff.unit_attentions if not r.matches(nexus)]
        self.aborted += [r.initiator_port for r in eff.abort]
        return eff

    def register(self, nexus, key):
        return self.out(nexus, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sark=key)

    def keys(self):
        data = self.pr.pr_in(InAction.READ_KEYS)
        gen, n = struct.unpack_from(">II", data)
        return gen, [int.from_bytes(data[8 + i:16 + i], "big") for i in range(0, n, 8)]

    def reservation(self):
        data = self.pr.pr_in(InAction.READ_RESERVATION)
        gen, n = struct.unpack_from(">II", data)
        if n == 0:
            return None
        key, _, _, scope_type = struct.unpack_from(">QIBB", data, 8)
        return key, scope_type & 0x0F

    def conflict(self, nexus, cls):
        return self.pr.conflicts(nexus, cls)


def port(n: Nexus) -> str:
    return n.initiator_port.lower()


# --- REGISTER / REGISTER AND IGNORE EXISTING KEY ---------------------------------

def test_register_unregistered_needs_zero_rk_and_bumps_generation():
    lu = Lu()
    with pytest.raises(ReservationConflict):
        lu.out(A, OutAction.REGISTER, rk=5, sark=KA)
    lu.out(A, OutAction.REGISTER, rk=0, sark=KA)
    assert lu.keys() == (1, [KA])
    # SARK 0 from an unregistered nexus: GOOD, nothing changes (no generation bump).
    lu.out(B, OutAction.REGISTER, rk=0, sark=0)
    assert lu.keys() == (1, [KA])


def test_register_registered_changes_key_only_with_matching_rk():
    lu = Lu()
    lu.register(A, KA)
    with pytest.raises(ReservationConflict):
        lu.out(A, OutAction.REGISTER, rk=KB, sark=KC)
    lu.out(A, OutAction.REGISTER, rk=KA, sark=KC)
    assert lu.keys() == (2, [KC])
    lu.out(A, OutAction.REGISTER, rk=KC, sark=0)  # unregister
    assert lu.keys() == (3, [])


def test_register_and_ignore_replaces_any_key_and_zero_unregisters():
    lu = Lu()
    lu.register(A, KA)
    lu.out(A, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY, rk=0xDEAD, sark=KB)
    assert lu.keys()[1] == [KB]
    lu.out(A, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sark=0)
    assert lu.keys()[1] == []


def test_same_key_on_several_nexuses_is_one_entry_each():
    # MSDSM registers one key on every path (windows-initiator.md §5.8).
    lu = Lu()
    lu.register(A, KA)
    lu.register(A2, KA)
    lu.register(B, KB)
    assert lu.keys()[1] == [KA, KA, KB]


def test_registration_belongs_to_the_isid_not_the_name():
    lu = Lu()
    lu.register(A, KA)
    assert lu.pr.state.find(A) is not None
    assert lu.pr.state.find(A2) is None  # same InitiatorName, other ISID (SPDK's bug, wsfc §6)


def test_register_table_full_is_insufficient_resources():
    lu = Lu()
    lu.pr.max_registrations = 2
    lu.register(A, KA)
    lu.register(A2, KA)
    with pytest.raises(ScsiError) as e:
        lu.register(B, KB)
    assert e.value.reason == Reason.INSUFFICIENT_REGISTRATION_RESOURCES


def test_aptpl_needs_somewhere_to_persist():
    lu = Lu(ptpl=False)
    with pytest.raises(ScsiError) as e:
        lu.out(A, OutAction.REGISTER, sark=KA, aptpl=True)
    assert e.value.reason == Reason.INVALID_FIELD_IN_PARAMETER_LIST
    lu = Lu(ptpl=True)
    lu.out(A, OutAction.REGISTER, sark=KA, aptpl=True)
    assert lu.pr.state.aptpl
    caps = lu.pr.pr_in(InAction.REPORT_CAPABILITIES)
    assert caps[2] & 0x01 and caps[3] & 0x01  # PTPL_C, PTPL_A
    lu.out(A, OutAction.REGISTER, rk=KA, sark=KB, aptpl=False)  # the last REGISTER decides
    assert not lu.pr.state.aptpl


def test_all_tg_pt_registers_every_target_port():
    lu = Lu()
    lu.out(A, OutAction.REGISTER, sark=KA, all_tg_pt=True)
    other_port = Nexus(A.initiator_port, "iqn.2026-11.org.example:disk,t,0x0002", 2)
    assert lu.pr.state.find(other_port) is not None
    full = lu.pr.pr_in(InAction.READ_FULL_STATUS)
    assert full[8 + 12] & 0x02  # ALL_TG_PT


def tid(port: str, fmt: int = 1) -> bytes:
    name = port.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes(((fmt << 6) | 5, 0)) + len(name).to_bytes(2, "big") + name


def test_spec_i_pt_registers_transport_ids():
    lu = Lu()
    lu.out(A, OutAction.REGISTER, sark=KA, spec_i_pt=True,
           tids=tid(B.initiator_port.upper()) + tid("iqn.1991-05.com.microsoft:node3", fmt=0))
    st = lu.pr.state
    assert [r.key for r in st.registrations] == [KA, KA, KA]
    assert st.find(B) is not None  # case-insensitive
    assert st.find(C) is not None  # format 00b: every port of node3
    full = lu.pr.pr_in(InAction.READ_FULL_STATUS)
    gen, length = struct.unpack_from(">II", full)
    assert length == len(full) - 8
    # READ FULL STATUS carries the TransportIDs (second descriptor: node2's, format 01b).
    off = 8
    descs = []
    while off < len(full):
        n = int.from_bytes(full[off + 20:off + 24], "big")
        descs.append(full[off + 24:off + 24 + n])
        off += 24 + n
    assert descs[1][0] == 0x45 and b"node2,i,0x400001370000" in descs[1].lower()
    assert descs[2][0] == 0x05


@pytest.mark.parametrize("bad", [
    bytes((0x41, 0, 0, 8)) + b"abc\0\0\0\0\0",  # format 01b without ",i,0x"
    bytes((0x06, 0, 0, 8)) + b"abcdefg\0",  # not iSCSI (protocol 6 = SAS)
    bytes((0x05, 0, 0, 6)) + b"abcde\0",  # length not a multiple of 4
])
def test_spec_i_pt_bad_transport_id_registers_nothing(bad):
    lu = Lu()
    with pytest.raises(ScsiError) as e:
        lu.out(A, OutAction.REGISTER, sark=KA, spec_i_pt=True, tids=tid(B.initiator_port) + bad)
    assert e.value.reason == Reason.INVALID_FIELD_IN_PARAMETER_LIST
    assert lu.pr.state.registrations == ()


def test_spec_i_pt_only_with_register_and_list_lengths():
    lu = Lu()
    with pytest.raises(ScsiError) as e:
        lu.out(A, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sark=KA, spec_i_pt=True)
    assert e.value.reason == Reason.INVALID_FIELD_IN_PARAMETER_LIST
    with pytest.raises(ScsiError) as e:
        lu.pr.pr_out(A, OutAction.REGISTER, 0, 0, params(0, KA)[:20])
    assert e.value.reason == Reason.PARAMETER_LIST_LENGTH_ERROR
    with pytest.raises(ScsiError) as e:
        lu.pr.pr_out(A, OutAction.REGISTER, 0, 0, params(0, KA) + bytes(4))
    assert e.value.reason == Reason.PARAMETER_LIST_LENGTH_ERROR


# --- RESERVE / RELEASE ----------------------------------------------------------

def test_reserve_rules():
    lu = Lu()
    with pytest.raises(ReservationConflict):  # unregistered
        lu.out(A, OutAction.RESERVE, rk=KA, type_=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    lu.register(A, KA)
    lu.register(B, KB)
    with pytest.raises(ReservationConflict):  # wrong key
        lu.out(A, OutAction.RESERVE, rk=KB, type_=5)
    with pytest.raises(ScsiError) as e:  # scope
        lu.out(A, OutAction.RESERVE, rk=KA, type_=5, scope=1)
    assert e.value.reason == Reason.INVALID_FIELD_IN_CDB
    with pytest.raises(ScsiError):  # type 2 does not exist
        lu.out(A, OutAction.RESERVE, rk=KA, type_=2)
    gen = lu.keys()[0]
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    assert lu.reservation() == (KA, 5)
    assert lu.keys()[0] == gen  # RESERVE does not bump PRgeneration
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)  # holder repeats: GOOD
    with pytest.raises(ReservationConflict):  # holder, other type
        lu.out(A, OutAction.RESERVE, rk=KA, type_=6)
    with pytest.raises(ReservationConflict):  # other registrant
        lu.out(B, OutAction.RESERVE, rk=KB, type_=5)


@pytest.mark.parametrize("t", list(PrType))
def test_release_each_type(t):
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=t)
    assert lu.reservation() == (0 if t.all_registrants else KA, t)
    lu.out(C, OutAction.RELEASE, rk=KC, type_=t) if not t.all_registrants else None
    assert lu.reservation() is not None and lu.uas == []  # non-holder RELEASE: no effect
    wrong = PrType.EXCLUSIVE_ACCESS if t != PrType.EXCLUSIVE_ACCESS else PrType.WRITE_EXCLUSIVE
    with pytest.raises(ScsiError) as e:
        lu.out(A, OutAction.RELEASE, rk=KA, type_=wrong)
    assert e.value.reason == Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION
    lu.out(A, OutAction.RELEASE, rk=KA, type_=t)
    assert lu.reservation() is None
    if t in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
        assert lu.uas == []
    else:  # SPC-4 §5.12.11.2.2: RESERVATIONS RELEASED to the other registrants
        assert sorted(lu.uas) == sorted([(port(B), Reason.RESERVATIONS_RELEASED),
                                         (port(C), Reason.RESERVATIONS_RELEASED)])


def test_all_registrants_any_registrant_is_holder_and_can_release():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    lu.out(B, OutAction.RESERVE, rk=KB, type_=PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)  # B is a holder too
    full = lu.pr.pr_in(InAction.READ_FULL_STATUS)
    assert full[8 + 12] & 1 and full[8 + 24 + len(A.transport_id or pr.encode_transport_id(port(A))) + 12] & 1
    lu.out(A, OutAction.REGISTER, rk=KA, sark=0)  # a holder leaves; the reservation stays
    assert lu.reservation() == (0, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    lu.out(B, OutAction.REGISTER, rk=KB, sark=0)  # the last one leaves: released
    assert lu.reservation() is None


def test_unregistering_holder_releases_and_notifies_for_registrants_only():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    lu.out(A, OutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sark=0)
    assert lu.reservation() is None
    assert lu.uas == [(port(B), Reason.RESERVATIONS_RELEASED)]


def test_key_change_keeps_the_reservation():
    lu = Lu()
    lu.register(A, KA)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=1)
    lu.out(A, OutAction.REGISTER, rk=KA, sark=KC)
    assert lu.reservation() == (KC, 1)


# --- CLEAR ----------------------------------------------------------------------

def test_clear():
    lu = Lu()
    with pytest.raises(ReservationConflict):
        lu.out(A, OutAction.CLEAR, rk=KA)
    lu.register(A, KA)
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(B, OutAction.RESERVE, rk=KB, type_=3)
    with pytest.raises(ReservationConflict):
        lu.out(A, OutAction.CLEAR, rk=KB)
    gen = lu.keys()[0]
    lu.out(A, OutAction.CLEAR, rk=KA)
    assert lu.keys() == (gen + 1, []) and lu.reservation() is None
    assert sorted(lu.uas) == sorted([(port(B), Reason.RESERVATIONS_PREEMPTED),
                                     (port(C), Reason.RESERVATIONS_PREEMPTED)])


# --- PREEMPT / PREEMPT AND ABORT ----------------------------------------------------

@pytest.mark.parametrize("action", [OutAction.PREEMPT, OutAction.PREEMPT_AND_ABORT])
def test_preempt_holder_moves_reservation_and_removes_every_path(action):
    lu = Lu()
    lu.register(A, KA)
    lu.register(A2, KA)  # node1's second path, same key
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    gen = lu.keys()[0]
    lu.out(B, action, rk=KB, sark=KA, type_=5)
    assert lu.reservation() == (KB, 5)
    assert lu.keys() == (gen + 1, [KB, KC])
    assert sorted(lu.uas) == sorted([(port(A), Reason.REGISTRATIONS_PREEMPTED),
                                     (port(A2), Reason.REGISTRATIONS_PREEMPTED)])
    assert sorted(lu.aborted) == (sorted([port(A), port(A2)]) if action == OutAction.PREEMPT_AND_ABORT else [])


def test_preempt_with_new_type_tells_remaining_registrants():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    lu.out(B, OutAction.PREEMPT, rk=KB, sark=KA, type_=6)
    assert lu.reservation() == (KB, 6)
    assert sorted(lu.uas) == sorted([(port(A), Reason.REGISTRATIONS_PREEMPTED),
                                     (port(C), Reason.RESERVATIONS_RELEASED)])


def test_preempt_non_holder_removes_registrations_only():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    lu.out(B, OutAction.PREEMPT, rk=KB, sark=KC, type_=5)
    assert lu.reservation() == (KA, 5)
    assert lu.keys()[1] == [KA, KB]
    assert lu.uas == [(port(C), Reason.REGISTRATIONS_PREEMPTED)]


def test_preempt_without_reservation_and_errors():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    with pytest.raises(ReservationConflict):  # SARK names nobody
        lu.out(A, OutAction.PREEMPT, rk=KA, sark=KC, type_=5)
    with pytest.raises(ScsiError) as e:  # SARK 0 without an all-registrants reservation
        lu.out(A, OutAction.PREEMPT, rk=KA, sark=0, type_=5)
    assert e.value.reason == Reason.INVALID_FIELD_IN_PARAMETER_LIST
    with pytest.raises(ReservationConflict):  # unregistered preemptor
        lu.out(C, OutAction.PREEMPT, rk=KC, sark=KA, type_=5)
    lu.out(A, OutAction.PREEMPT, rk=KA, sark=KB, type_=5)
    assert lu.keys()[1] == [KA] and lu.reservation() is None


def test_preempt_all_registrants_with_zero_key_takes_everything():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    lu.register(C, KC)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    lu.out(B, OutAction.PREEMPT, rk=KB, sark=0, type_=PrType.WRITE_EXCLUSIVE)
    assert lu.keys()[1] == [KB] and lu.reservation() == (KB, 1)
    assert sorted(lu.uas) == sorted([(port(A), Reason.REGISTRATIONS_PREEMPTED),
                                     (port(C), Reason.REGISTRATIONS_PREEMPTED)])


# --- REGISTER AND MOVE ------------------------------------------------------------

def move_params(rk, sark, dest: str, *, unreg=False, rel=1) -> bytes:
    t = tid(dest)
    return struct.pack(">QQBBHI", rk, sark, 0, 0x02 if unreg else 0, rel, len(t)) + t


@pytest.mark.parametrize("unreg", [False, True])
def test_register_and_move(unreg):
    lu = Lu()
    lu.register(A, KA)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    new, _ = lu.pr.pr_out(A, OutAction.REGISTER_AND_MOVE, 0, 0, move_params(KA, KB, B.initiator_port, unreg=unreg))
    lu.pr.state = new
    assert lu.reservation() == (KB, 5)
    assert lu.pr.state.find(B).key == KB
    assert (lu.pr.state.find(A) is None) == unreg


def test_register_and_move_errors():
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    with pytest.raises(ReservationConflict):  # no reservation held
        lu.pr.pr_out(A, OutAction.REGISTER_AND_MOVE, 0, 0, move_params(KA, KC, C.initiator_port))
    lu.out(A, OutAction.RESERVE, rk=KA, type_=1)
    with pytest.raises(ReservationConflict):  # not the holder
        lu.pr.pr_out(B, OutAction.REGISTER_AND_MOVE, 0, 0, move_params(KB, KC, C.initiator_port))
    for bad in (move_params(KA, 0, C.initiator_port), move_params(KA, KC, A.initiator_port),
                move_params(KA, KC, C.initiator_port, rel=7)):
        with pytest.raises(ScsiError) as e:
            lu.pr.pr_out(A, OutAction.REGISTER_AND_MOVE, 0, 0, bad)
        assert e.value.reason == Reason.INVALID_FIELD_IN_PARAMETER_LIST


# --- the conflict table -------------------------------------------------------------

#: (type, reg_read, reg_write, unreg_read, unreg_write) for a nexus that is not
#: the holder: SPC-4 §5.12.1 table 63 / SBC-3 §4.17 (libiscsi ProutReserve.Access*).
ACCESS = [
    (PrType.WRITE_EXCLUSIVE, True, False, True, False),
    (PrType.EXCLUSIVE_ACCESS, False, False, False, False),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
]


@pytest.mark.parametrize("t,reg_r,reg_w,unreg_r,unreg_w", ACCESS)
def test_conflict_table(t, reg_r, reg_w, unreg_r, unreg_w):
    lu = Lu()
    lu.register(A, KA)
    lu.register(B, KB)
    assert not lu.conflict(C, PrConflict.WRITE)  # registrations alone block nothing
    lu.out(A, OutAction.RESERVE, rk=KA, type_=t)
    assert not lu.conflict(A, PrConflict.READ) and not lu.conflict(A, PrConflict.WRITE)
    assert lu.conflict(B, PrConflict.READ) == (not reg_r)
    assert lu.conflict(B, PrConflict.WRITE) == (not reg_w)
    assert lu.conflict(C, PrConflict.READ) == (not unreg_r)
    assert lu.conflict(C, PrConflict.WRITE) == (not unreg_w)
    for n in (A, B, C):
        assert not lu.conflict(n, PrConflict.NONE)


def test_scsi2_reserve_conflicts_while_any_key_is_registered():
    lu = Lu()
    assert not lu.conflict(A, PrConflict.ANY_REGISTRATION)
    lu.register(B, KB)
    assert lu.conflict(A, PrConflict.ANY_REGISTRATION) and lu.conflict(B, PrConflict.ANY_REGISTRATION)


# --- PR IN formats ------------------------------------------------------------------

def test_report_capabilities_is_truthful():
    caps = pr.PersistentReservations().pr_in(InAction.REPORT_CAPABILITIES)
    length, b2, b3, mask = struct.unpack_from(">HBBH", caps)
    assert length == 8 == len(caps)
    assert b2 == 0x0C  # SIP_C, ATP_C; CRH=0; PTPL_C=0 without persistence
    assert b3 & 0x80 and (b3 >> 4) & 7 == 3 and not b3 & 1
    assert mask == 0xEA01  # types 1 3 5 6 7 8


def test_read_reservation_and_invalid_service_action():
    lu = Lu()
    assert lu.pr.pr_in(InAction.READ_RESERVATION) == bytes(8)
    with pytest.raises(ScsiError):
        lu.pr.pr_in(4)


# --- persistence format -----------------------------------------------------------------

def test_encode_decode_round_trip_and_rejects_damage():
    lu = Lu(ptpl=True)
    lu.out(A, OutAction.REGISTER, sark=KA, aptpl=True)
    lu.out(B, OutAction.REGISTER, sark=KB, all_tg_pt=True, aptpl=True)
    lu.out(A, OutAction.RESERVE, rk=KA, type_=5)
    blob = pr.encode(lu.pr.state)
    assert pr.decode(blob) == lu.pr.state
    for bad in (b"", b"{", blob.replace(b'"format": 1', b'"format": 9'), blob[: len(blob) // 2]):
        with pytest.raises(ValueError):
            pr.decode(bad)


def test_needs_persist_only_with_aptpl_now_or_before():
    p = pr.PersistentReservations(persist=lambda b: None)
    s1, _ = p.pr_out(A, OutAction.REGISTER, 0, 0, params(0, KA))
    assert not p.needs_persist(s1)
    s2, _ = p.pr_out(A, OutAction.REGISTER, 0, 0, params(0, KA, aptpl=True))
    assert p.needs_persist(s2)
    p.state = s2
    s3, _ = p.pr_out(A, OutAction.REGISTER, 0, 0, params(KA, KB, aptpl=False))
    assert p.needs_persist(s3)  # turning APTPL off must reach the disk too
