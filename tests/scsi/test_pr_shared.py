"""Reservations coherent across gateways (scsi/pr_shared.py), sans-IO.

Two ScsiTargetDevices stand for two gateways exporting one LU (one backend,
one shared record); each has its own target port.  The shared record here
is an in-memory object with the same contract as the RADOS one (versioned
compare-and-swap; an announcement returns after every other listener
handled it); tests/ceph runs the same scenarios against real RADOS."""

from __future__ import annotations

import asyncio

import pytest

from pyiscsi_target.scsi.command import Nexus, Status
from pyiscsi_target.scsi.pr_shared import SharedReservations, decode_record
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice

from .conftest import BLOCKS, BS, Harness, assert_check, assert_good, make_lu, tur
from .test_pr_dispatch import KA, KB, READ10, WRITE10, keys, out, prin
from .test_tasks import GatedBackend, _settle

IQN = "iqn.2026-11.org.example:shared"
PORT_A = f"{IQN},t,0x0001"
PORT_B = f"{IQN},t,0x0002"
NODE1_A = Nexus("iqn.1991-05.com.microsoft:node1,i,0x400001370000", PORT_A, 1)
NODE2_B = Nexus("iqn.1991-05.com.microsoft:node2,i,0x400001370000", PORT_B, 2)
OUTSIDER_B = Nexus("iqn.1994-05.com.example:outsider,i,0x400001370000", PORT_B, 2)
RC = Status.RESERVATION_CONFLICT


class MemoryBus:
    """The record every gateway shares: content, version, listeners."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.version = 0
        self.listeners: list[MemoryRecord] = []
        self.stores = 0
        self.lost_races = 0


class MemoryRecord:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.on_message = None
        self.before_store = None  # test hook: runs between load and store

    async def load(self):
        await asyncio.sleep(0)
        return self.bus.data, self.bus.version

    async def store(self, data, version):
        if self.before_store is not None:
            hook, self.before_store = self.before_store, None
            await hook()
        await asyncio.sleep(0)
        if version != self.bus.version:
            self.bus.lost_races += 1
            return None
        self.bus.data = data
        self.bus.version += 1
        self.bus.stores += 1
        return self.bus.version

    async def announce(self, message):
        # Like RADOS notify: every listener, this one included, gets it; the
        # call returns once each has handled it.
        for other in list(self.bus.listeners):
            await other.on_message(message)

    async def listen(self, on_message, on_lost):
        self.on_message = on_message
        self.bus.listeners.append(self)

    async def close(self):
        self.bus.listeners.remove(self)

    def status(self):
        return {"record": "memory", "gateways": len(self.bus.listeners) - 1, "fenced": {}}


async def gateway(bus: MemoryBus, backend, nexuses, name) -> Harness:
    return await gateway_on(MemoryRecord(bus), backend, nexuses, name)


async def gateway_on(record, backend, nexuses, name="") -> Harness:
    """One gateway: a device whose LU follows ``record`` (any SharedObject)."""
    lu = make_lu(backend=backend)
    dev = ScsiTargetDevice(IQN, {0: lu})
    lu.pr.durable = True
    lu.shared = SharedReservations(lu, record, name=name)
    await lu.shared.start()
    for n in nexuses:
        dev.add_nexus(n)
    h = Harness(dev)
    for n in nexuses:
        await h.drain_ua(n)
    return h


@pytest.fixture
async def pair():
    bus = MemoryBus()
    backend = GatedBackend(BLOCKS * BS)
    a = await gateway(bus, backend, [NODE1_A], "gw-a")
    b = await gateway(bus, backend, [NODE2_B, OUTSIDER_B], "gw-b")
    return bus, a, b, backend


async def test_reservation_made_through_a_binds_b_before_status(pair):
    bus, a, b, _ = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    assert_good(await out(b, NODE2_B, 0, sark=KB))
    assert_good(await out(a, NODE1_A, 1, rk=KA, type_=5))  # WE-RO
    # B's local copy already has it: its unregistered outsider conflicts on
    # writes and still reads; the registered node2 writes.
    assert (await b.run(WRITE10, bytes(BS), nexus=OUTSIDER_B)).status == RC
    assert_good(await b.run(READ10, nexus=OUTSIDER_B))
    assert_good(await b.run(WRITE10, bytes(BS), nexus=NODE2_B))
    assert sorted(await keys(b, NODE2_B)) == sorted([KA, KB])
    state, holder = decode_record(bus.data)
    assert [r.key for r in state.registrations] == [KA, KB] and holder is None


async def test_concurrent_reserves_exactly_one_wins(pair):
    bus, a, b, _ = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    assert_good(await out(b, NODE2_B, 0, sark=KB))
    ra, rb = await asyncio.gather(out(a, NODE1_A, 1, rk=KA, type_=1), out(b, NODE2_B, 1, rk=KB, type_=1))
    assert sorted([ra.status, rb.status]) == sorted([Status.GOOD, RC])
    winner = NODE1_A if ra.status == Status.GOOD else NODE2_B
    for h in (a, b):
        assert h.device.luns[0].pr.state.res_holder[0] == winner.initiator_port


async def test_lost_compare_and_swap_decides_again(pair):
    bus, a, b, _ = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    record_a = a.device.luns[0].shared.obj

    async def b_registers_meanwhile():
        assert_good(await out(b, NODE2_B, 0, sark=KB))

    # A reads the record, then B registers before A stores: A's RESERVE must
    # be decided again on B's record instead of overwriting node2's key.
    record_a.before_store = b_registers_meanwhile
    assert_good(await out(a, NODE1_A, 1, rk=KA, type_=1))
    assert bus.lost_races == 1
    state, _ = decode_record(bus.data)
    assert [r.key for r in state.registrations] == [KA, KB] and state.res_type == 1


async def test_preempt_through_b_gives_registrations_preempted_on_a(pair):
    _, a, b, _ = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    assert_good(await out(b, NODE2_B, 0, sark=KB))
    assert_good(await out(a, NODE1_A, 1, rk=KA, type_=5))
    assert_good(await out(b, NODE2_B, 4, rk=KB, sark=KA, type_=5))  # node2 preempts node1
    assert_check(await a.run(tur(), nexus=NODE1_A), Reason.REGISTRATIONS_PREEMPTED)
    assert (await a.run(WRITE10, bytes(BS), nexus=NODE1_A)).status == RC
    assert_good(await b.run(WRITE10, bytes(BS), nexus=NODE2_B))


async def test_preempt_and_abort_through_b_aborts_tasks_on_a(pair):
    _, a, b, backend = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    assert_good(await out(b, NODE2_B, 0, sark=KB))
    assert_good(await out(a, NODE1_A, 1, rk=KA, type_=5))
    # A read from node1 on gateway A waits in the backend (LBA >= 1000).
    slow = asyncio.ensure_future(a.run(bytes((0x28, 0)) + (2000).to_bytes(4, "big") + bytes((0, 0, 1, 0)),
                                       nexus=NODE1_A))
    await _settle()
    assert 2000 in backend.started and not slow.done()
    assert_good(await out(b, NODE2_B, 5, rk=KB, sark=KA, type_=5))
    # PREEMPT AND ABORT returned: node1's task on the other gateway is gone.
    assert slow.done()
    with pytest.raises(asyncio.CancelledError):
        slow.result()
    assert a.device.luns[0].tasks.select() == []
    backend.gate.set()


async def test_spc2_reserve_is_shared_and_released_by_nexus_loss(pair):
    bus, a, b, _ = pair
    assert_good(await a.run(bytes((0x16, 0, 0, 0, 0, 0)), nexus=NODE1_A))  # RESERVE(6)
    assert (await b.run(WRITE10, bytes(BS), nexus=NODE2_B)).status == RC
    assert (await b.run(bytes((0x16, 0, 0, 0, 0, 0)), nexus=NODE2_B)).status == RC
    a.device.remove_nexus(NODE1_A)  # session gone: SPC-2 §5.5.3
    for _ in range(20):
        await _settle()
        if decode_record(bus.data)[1] is None:
            break
    assert decode_record(bus.data)[1] is None
    assert b.device.luns[0].reserved_by is None
    assert_good(await b.run(WRITE10, bytes(BS), nexus=NODE2_B))


async def test_restarted_gateway_keeps_registrations_and_drops_its_spc2_holder(pair):
    bus, a, b, backend = pair
    assert_good(await out(b, NODE2_B, 0, sark=KB))
    assert_good(await out(b, NODE2_B, 1, rk=KB, type_=1))
    await a.device.luns[0].shared.close()
    # Gateway A comes back (new process): the record gives it node2's
    # reservation at once, before any initiator logs in again.
    a2 = await gateway(bus, backend, [NODE1_A], "gw-a")
    assert (await a2.run(WRITE10, bytes(BS), nexus=NODE1_A)).status == RC
    r = await a2.run(prin(1), nexus=NODE1_A)
    assert_good(r)
    assert int.from_bytes(r.data_in[8:16], "big") == KB
    # A SPC-2 reservation held through A's own port did not survive A.
    bus2 = MemoryBus()
    g1 = await gateway(bus2, backend, [NODE1_A], "gw-a")
    assert_good(await g1.run(bytes((0x16, 0, 0, 0, 0, 0)), nexus=NODE1_A))
    lu = make_lu(backend=backend)
    lu.shared = SharedReservations(lu, MemoryRecord(bus2))
    await lu.shared.start(own_port=lambda port: port == PORT_A)
    assert lu.reserved_by is None and decode_record(bus2.data)[1] is None


async def test_unreadable_notice_falls_back_to_the_record(pair):
    bus, a, b, _ = pair
    assert_good(await out(a, NODE1_A, 0, sark=KA))
    lu_b = b.device.luns[0]
    lu_b.pr.state = type(lu_b.pr.state)()  # B's copy somehow lost it
    lu_b.shared.version = 0
    await lu_b.shared._on_message(b"{not json")
    assert [r.key for r in lu_b.pr.state.registrations] == [KA]
