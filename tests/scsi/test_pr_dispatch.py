"""Persistent reservations through ScsiTargetDevice.execute: CDB bytes in,
status/sense/data out.  The conflict table applied to real opcodes, SPC-2
RESERVE/RELEASE interplay, resets, nexus loss, unit attentions and
PREEMPT AND ABORT aborting tasks via the task set."""

from __future__ import annotations

import asyncio
import struct

import pytest

from pyiscsi_target.scsi.command import Nexus, Status
from pyiscsi_target.scsi.opcodes import COMMANDS, ServiceActions
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice

from .conftest import (BLOCKS, BS, NEXUS_A, NEXUS_B, TARGET_PORT, Harness, assert_check, assert_good, cdb10,
                       cdb16, inquiry, make_lu, sa_in16, sense_tuple, tur)
from .test_tasks import GatedBackend, _settle

NEXUS_C = Nexus("iqn.1994-05.com.example:host-c,i,0x400001370000", TARGET_PORT, 1)
KA, KB = 0xA1A1A1A1_00000001, 0xB2B2B2B2_00000002
RC = Status.RESERVATION_CONFLICT


def prout(sa: int, rk: int = 0, sark: int = 0, type_: int = 0, *, flags: int = 0, extra: bytes = b"",
          length: int | None = None) -> tuple[bytes, bytes]:
    data = struct.pack(">QQIBBH", rk, sark, 0, flags, 0, 0) + extra
    n = len(data) if length is None else length
    return struct.pack(">BBBHIB", 0x5F, sa, type_, 0, n, 0), data


def prin(sa: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BB5sHB", 0x5E, sa, bytes(5), alloc, 0)


async def out(h: Harness, nexus, sa, rk=0, sark=0, type_=0, **kw):
    cdb, data = prout(sa, rk, sark, type_, **kw)
    return await h.run(cdb, data, nexus=nexus)


async def keys(h: Harness, nexus=NEXUS_A) -> list[int]:
    r = await h.run(prin(0), nexus=nexus)
    assert_good(r)
    n = int.from_bytes(r.data_in[4:8], "big")
    return [int.from_bytes(r.data_in[8 + i:16 + i], "big") for i in range(0, n, 8)]


async def setup_reservation(h: Harness, type_: int) -> None:
    assert_good(await out(h, NEXUS_A, 6, sark=KA))
    assert_good(await out(h, NEXUS_B, 6, sark=KB))
    assert_good(await out(h, NEXUS_A, 1, rk=KA, type_=type_))


READ10 = cdb10(0x28, 0, 1)
WRITE10 = cdb10(0x2A, 0, 1)


@pytest.mark.parametrize("type_,reg_r,reg_w,unreg_r,unreg_w", [
    (1, True, False, True, False), (3, False, False, False, False), (5, True, True, True, False),
    (6, True, True, False, False), (7, True, True, True, False), (8, True, True, False, False),
])
async def test_read_write_access_by_type(h, type_, reg_r, reg_w, unreg_r, unreg_w):
    await setup_reservation(h, type_)
    block = bytes(BS)
    h.device.add_nexus(NEXUS_C)
    await h.drain_ua(NEXUS_C)

    async def ok(cdb, nexus, data=b""):
        r = await h.run(cdb, data, nexus=nexus)
        assert r.status in (Status.GOOD, RC), r
        return r.status == Status.GOOD

    assert await ok(READ10, NEXUS_A) and await ok(WRITE10, NEXUS_A, block)  # the holder
    assert await ok(READ10, NEXUS_B) == reg_r
    assert await ok(WRITE10, NEXUS_B, block) == reg_w
    assert await ok(READ10, NEXUS_C) == unreg_r
    assert await ok(WRITE10, NEXUS_C, block) == unreg_w
    # Every write-class opcode follows WRITE(10), every read-class one READ(10).
    assert await ok(cdb16(0x8A, 0, 1), NEXUS_C, block) == unreg_w
    assert await ok(bytes((0x35,)) + bytes(9), NEXUS_C) == unreg_w  # SYNCHRONIZE CACHE
    assert await ok(cdb16(0x88, 0, 1), NEXUS_C) == unreg_r


async def test_commands_that_never_conflict(h):
    await setup_reservation(h, 3)  # Exclusive Access blocks the most
    h.device.add_nexus(NEXUS_C)
    await h.drain_ua(NEXUS_C)
    for cdb in (inquiry(), bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)), bytes((0x25,)) + bytes(9),
                sa_in16(0x10), prin(0), prin(1), prin(2), prin(3), tur(), bytes((0x03, 0, 0, 0, 18, 0)),
                bytes((0x1B, 0, 0, 0, 1, 0))):
        for n in (NEXUS_B, NEXUS_C):
            r = await h.run(cdb, nexus=n)
            assert r.status == Status.GOOD, (cdb.hex(), n)
    # START STOP UNIT with START=0 changes state: it conflicts.
    assert (await h.run(bytes((0x1B, 0, 0, 0, 0, 0)), nexus=NEXUS_C)).status == RC


def test_every_opcode_has_a_conflict_class():
    """The table is the one description of an opcode: a new row must say
    where it stands under reservations (SPC-4 §5.12.1 table 63)."""
    for entry in COMMANDS.values():
        specs = entry.actions.values() if isinstance(entry, ServiceActions) else [entry]
        for spec in specs:
            assert spec.pr_conflict is not None, spec.name


def test_pr_in_out_listed_by_report_supported_operation_codes():
    assert set(COMMANDS[0x5E].actions) == {0, 1, 2, 3}
    assert set(COMMANDS[0x5F].actions) == set(range(8))


async def test_rsoc_reports_pr_out_register(h):
    r = await h.run(bytes((0xA3, 0x0C, 0x02, 0x5F, 0, 0, 0, 0, 1, 0, 0, 0)))
    assert_good(r)
    assert r.data_in[1] & 0x07 == 3 and r.data_in[4] == 0x5F


async def test_reservation_conflict_status_has_no_sense(h):
    await setup_reservation(h, 1)
    r = await h.run(WRITE10, bytes(BS), nexus=NEXUS_B)
    assert r.status == RC and r.sense == b""


# --- PR OUT / IN CDB handling -------------------------------------------------------------

async def test_register_read_keys_and_generation(h):
    assert_good(await out(h, NEXUS_A, 0, sark=KA))
    assert_good(await out(h, NEXUS_B, 0, sark=KB))
    r = await h.run(prin(0))
    assert r.data_in[:8] == struct.pack(">II", 2, 16)
    assert await keys(h) == [KA, KB]
    # Truncated to ALLOCATION LENGTH, ADDITIONAL LENGTH unchanged (SPC-4 §6.16.1).
    r = await h.run(prin(0, alloc=12))
    assert len(r.data_in) == 12 and r.data_in[4:8] == (16).to_bytes(4, "big")
    # REGISTER with a wrong key: RESERVATION CONFLICT.
    assert (await out(h, NEXUS_A, 0, rk=KB, sark=1)).status == RC


async def test_read_reservation_and_release_wrong_type(h):
    await setup_reservation(h, 5)
    r = await h.run(prin(1), nexus=NEXUS_B)
    assert_good(r)
    assert r.data_in[4:8] == (16).to_bytes(4, "big")
    assert int.from_bytes(r.data_in[8:16], "big") == KA and r.data_in[21] == 0x05
    assert_check(await out(h, NEXUS_A, 2, rk=KA, type_=6), Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert_good(await out(h, NEXUS_A, 2, rk=KA, type_=5))
    r = await h.run(prin(1))
    assert r.data_in[4:8] == bytes(4)


async def test_pr_cdb_errors(h):
    assert_check(await h.run(prin(4)), Reason.INVALID_FIELD_IN_CDB, fp=1)
    assert_check(await h.run(bytes((0x5F, 0x08)) + bytes(8)), Reason.INVALID_FIELD_IN_CDB, fp=1)
    cdb, data = prout(0, sark=KA, length=20)
    assert_check(await h.run(cdb, data[:20]), Reason.PARAMETER_LIST_LENGTH_ERROR)
    # Scope other than LU_SCOPE.
    assert_good(await out(h, NEXUS_A, 6, sark=KA))
    assert_check(await out(h, NEXUS_A, 1, rk=KA, type_=0x15), Reason.INVALID_FIELD_IN_CDB)
    # APTPL without a place to persist it.
    assert_check(await out(h, NEXUS_B, 0, sark=KB, flags=0x01), Reason.INVALID_FIELD_IN_PARAMETER_LIST)


# --- unit attentions to exactly the named nexuses ----------------------------------------------

async def ua_of(h: Harness, nexus) -> list[tuple[int, int, int]]:
    seen = []
    for _ in range(8):
        r = await h.run(tur(), nexus=nexus)
        if r.status == Status.GOOD:
            return seen
        seen.append(sense_tuple(r))
    raise AssertionError(seen)


async def test_preempt_ua_only_to_preempted(h):
    h.device.add_nexus(NEXUS_C)
    await h.drain_ua(NEXUS_C)
    await setup_reservation(h, 5)
    assert_good(await out(h, NEXUS_C, 6, sark=0x77))
    assert_good(await out(h, NEXUS_B, 4, rk=KB, sark=KA, type_=5))
    assert await ua_of(h, NEXUS_A) == [Reason.REGISTRATIONS_PREEMPTED.value]
    assert await ua_of(h, NEXUS_B) == []
    assert await ua_of(h, NEXUS_C) == []
    assert (await h.run(WRITE10, bytes(BS), nexus=NEXUS_A)).status == RC  # fenced


async def test_clear_ua_to_all_other_registrants(h):
    h.device.add_nexus(NEXUS_C)
    await h.drain_ua(NEXUS_C)
    await setup_reservation(h, 6)
    assert_good(await out(h, NEXUS_B, 3, rk=KB))
    assert await ua_of(h, NEXUS_A) == [Reason.RESERVATIONS_PREEMPTED.value]
    assert await ua_of(h, NEXUS_B) == [] and await ua_of(h, NEXUS_C) == []
    assert await keys(h) == []


async def test_release_ua_for_registrants_only(h):
    h.device.add_nexus(NEXUS_C)
    await h.drain_ua(NEXUS_C)
    await setup_reservation(h, 5)
    assert_good(await out(h, NEXUS_A, 2, rk=KA, type_=5))
    assert await ua_of(h, NEXUS_B) == [Reason.RESERVATIONS_RELEASED.value]
    assert await ua_of(h, NEXUS_C) == [] and await ua_of(h, NEXUS_A) == []


# --- nexus loss, resets, SPC-2 -----------------------------------------------------------------

async def test_registrations_survive_nexus_loss_and_preempted_learns_on_return(h):
    await setup_reservation(h, 5)
    h.device.remove_nexus(NEXUS_A)  # node1's session drops
    assert await keys(h, NEXUS_B) == [KA, KB]
    assert_good(await out(h, NEXUS_B, 4, rk=KB, sark=KA, type_=5))
    h.device.add_nexus(NEXUS_A)  # node1 logs in again with the same ISID
    assert await ua_of(h, NEXUS_A) == [Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET.value,
                                       Reason.REGISTRATIONS_PREEMPTED.value]
    assert (await h.run(WRITE10, bytes(BS), nexus=NEXUS_A)).status == RC


async def test_lun_and_target_reset_keep_persistent_release_scsi2(h):
    await setup_reservation(h, 1)
    await h.device.lun_reset(NEXUS_B, 0)
    await h.device.target_reset(NEXUS_B, cold=False)
    await h.drain_ua(NEXUS_A)
    await h.drain_ua(NEXUS_B)
    await h.drain_ua(NEXUS_B)  # resets raise a UA on the issuer's nexus too (SAM-5 §6.3)
    assert await keys(h) == [KA, KB]
    assert (await h.run(WRITE10, bytes(BS), nexus=NEXUS_B)).status == RC
    # SPC-2 reservation: released by a LUN reset.
    dev = ScsiTargetDevice("t2", {0: make_lu()})
    h2 = Harness(dev)
    for n in (NEXUS_A, NEXUS_B):
        dev.add_nexus(n)
        await h2.drain_ua(n)
    assert_good(await h2.run(bytes((0x16,)) + bytes(5), nexus=NEXUS_A))
    assert (await h2.run(WRITE10, bytes(BS), nexus=NEXUS_B)).status == RC
    await dev.lun_reset(NEXUS_B, 0)
    await h2.drain_ua(NEXUS_A)
    await h2.drain_ua(NEXUS_B)
    await h2.drain_ua(NEXUS_B)
    assert_good(await h2.run(WRITE10, bytes(BS), nexus=NEXUS_B))


async def test_scsi2_reserve_release_conflict_with_registrations(h):
    reserve6, release6 = bytes((0x16,)) + bytes(5), bytes((0x17,)) + bytes(5)
    assert_good(await out(h, NEXUS_B, 6, sark=KB))
    # SPC-4 §5.12.3 (CRH=0): any registration makes RESERVE and RELEASE conflict, for everybody.
    for n in (NEXUS_A, NEXUS_B):
        assert (await h.run(reserve6, nexus=n)).status == RC
        assert (await h.run(release6, nexus=n)).status == RC
        assert (await h.run(bytes((0x56,)) + bytes(9), nexus=n)).status == RC
    assert_good(await out(h, NEXUS_B, 6, sark=0))
    assert_good(await h.run(reserve6, nexus=NEXUS_A))
    # While A holds an SPC-2 reservation, B's PR OUT conflicts; PR IN does not.
    assert (await out(h, NEXUS_B, 6, sark=KB)).status == RC
    assert_good(await h.run(prin(0), nexus=NEXUS_B))
    assert_good(await h.run(release6, nexus=NEXUS_A))


# --- PREEMPT AND ABORT ---------------------------------------------------------------------------

@pytest.fixture
async def gated():
    backend = GatedBackend(BLOCKS * BS)
    dev = ScsiTargetDevice("t", {0: make_lu(backend=backend)})
    for n in (NEXUS_A, NEXUS_B):
        dev.add_nexus(n)
    h = Harness(dev)
    for n in (NEXUS_A, NEXUS_B):
        await h.drain_ua(n)
    return h, backend


@pytest.mark.parametrize("action,aborted", [(5, True), (4, False)])
async def test_preempt_and_abort_aborts_victims_tasks_only(gated, action, aborted):
    h, backend = gated
    await setup_reservation(h, 5)
    victim = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), nexus=NEXUS_A, tag=900))
    own = asyncio.create_task(h.run(cdb10(0x28, 1001, 1), nexus=NEXUS_B, tag=901))
    await _settle()
    assert backend.started == [1000, 1001]
    preempt = asyncio.create_task(out(h, NEXUS_B, action, rk=KB, sark=KA, type_=5))
    await _settle()
    if aborted:
        assert_good(await preempt)
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert not own.done()
        backend.gate.set()
        assert_good(await own)
    else:
        assert_good(await preempt)
        backend.gate.set()
        assert_good(await victim)
        assert_good(await own)
    assert await keys(h, NEXUS_B) == [KB]


async def test_aborting_pr_out_still_commits_whole(h, monkeypatch):
    """An abort during the persist step cannot leave memory and disk apart."""
    gate = asyncio.Event()
    written = []

    def persist(blob):
        written.append(blob)

    lu = h.device.luns[0]
    lu.pr.persist = persist
    real = asyncio.to_thread

    async def slow_to_thread(fn, *a):
        await gate.wait()
        return await real(fn, *a)

    monkeypatch.setattr(asyncio, "to_thread", slow_to_thread)
    t = asyncio.create_task(h.run(*prout(6, sark=KA, flags=0x01), tag=77))
    await _settle()
    abort = asyncio.create_task(h.device.abort_task(NEXUS_A, 0, 77))
    await _settle()
    assert not abort.done()  # the abort waits for the commit to finish
    gate.set()
    await abort
    with pytest.raises(asyncio.CancelledError):
        await t
    assert written and lu.pr.state.registrations and lu.pr.state.aptpl
