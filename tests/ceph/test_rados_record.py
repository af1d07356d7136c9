"""storage/rados_record.py and scsi/pr_shared.py against a real RADOS cluster.

Each "gateway" here has its own librados client (its own rados.Rados), as
separate gateway processes would; the iSCSI-level scenarios with two real
gateway processes are in tests/ceph/test_gateways.py."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pyiscsi_target.scsi.command import Status
from pyiscsi_target.scsi.pr_shared import decode_record
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.storage.memory import MemoryBackend
from pyiscsi_target.storage.rados_record import RadosRecord
from tests.scsi.conftest import BLOCKS, BS, Harness, assert_check, assert_good, tur
from tests.scsi.test_pr_dispatch import KA, KB, WRITE10, out
from tests.scsi.test_pr_shared import NODE1_A, NODE2_B, OUTSIDER_B, gateway_on

_names = itertools.count()


def client(ceph_cluster):
    rados, _ = ceph_cluster.bindings()
    r = rados.Rados(conffile=str(ceph_cluster.conf), rados_id=ceph_cluster.client,
                    conf={"keyring": str(ceph_cluster.keyring)})
    r.connect(timeout=30)
    return r


@pytest.fixture
def clients(ceph_cluster):
    made = [client(ceph_cluster), client(ceph_cluster)]
    yield made
    for r in made:
        r.shutdown()


@pytest.fixture
def object_name():
    return f"test.record.{next(_names)}"


async def test_compare_and_swap_on_the_object_version(ceph_cluster, clients, object_name):
    rec = RadosRecord(clients[0], ceph_cluster.pool, object_name)
    other = RadosRecord(clients[1], ceph_cluster.pool, object_name)
    try:
        assert await rec.load() == (None, 0)
        v1 = await rec.store(b"one", 0)
        assert v1
        assert await other.store(b"two", 0) is None  # "must not exist yet" lost
        data, v = await other.load()
        assert (data, v) == (b"one", v1)
        v2 = await other.store(b"two", v)
        assert v2 and v2 != v1
        assert await rec.store(b"stale", v1) is None  # v1 is gone: refused
        assert (await rec.load()) == (b"two", v2)
    finally:
        await rec.close()
        await other.close()


async def test_announce_returns_after_every_listener_handled_it(ceph_cluster, clients, object_name):
    a = RadosRecord(clients[0], ceph_cluster.pool, object_name)
    b = RadosRecord(clients[1], ceph_cluster.pool, object_name)
    seen: list[bytes] = []

    async def slow_handler(message: bytes) -> None:
        await asyncio.sleep(0.3)  # the ack must wait for this
        seen.append(message)

    async def ignore(message: bytes) -> None:
        pass

    async def lost() -> None:
        pass

    try:
        await b.listen(slow_handler, lost)
        await a.listen(ignore, lost)
        await a.announce(b'{"hello": 1}')
        assert seen == [b'{"hello": 1}']
    finally:
        await a.close()
        await b.close()


async def gateway(r, pool, name, backend, nexuses) -> Harness:
    return await gateway_on(RadosRecord(r, pool, name), backend, nexuses)


async def test_two_gateways_on_rados_stay_coherent(ceph_cluster, clients, object_name):
    backend = MemoryBackend(BLOCKS * BS)
    a = await gateway(clients[0], ceph_cluster.pool, object_name, backend, [NODE1_A])
    b = await gateway(clients[1], ceph_cluster.pool, object_name, backend, [NODE2_B, OUTSIDER_B])
    try:
        assert_good(await out(a, NODE1_A, 0, sark=KA))
        assert_good(await out(b, NODE2_B, 0, sark=KB))
        assert_good(await out(a, NODE1_A, 1, rk=KA, type_=5))
        # Enforced on B the moment A's RESERVE returned.
        assert (await b.run(WRITE10, bytes(BS), nexus=OUTSIDER_B)).status == Status.RESERVATION_CONFLICT
        assert_good(await out(b, NODE2_B, 4, rk=KB, sark=KA, type_=5))  # PREEMPT
        assert_check(await a.run(tur(), nexus=NODE1_A), Reason.REGISTRATIONS_PREEMPTED)
        data, _ = await a.device.luns[0].shared.obj.load()
        state, _ = decode_record(data)
        assert [r.key for r in state.registrations] == [KB]
        # Racing RESERVEs after a RELEASE: exactly one wins, both agree.
        assert_good(await out(b, NODE2_B, 2, rk=KB, type_=5))  # RELEASE
        assert_good(await out(a, NODE1_A, 0, sark=KA))
        for _ in range(5):
            ra, rb = await asyncio.gather(out(a, NODE1_A, 1, rk=KA, type_=1),
                                          out(b, NODE2_B, 1, rk=KB, type_=1))
            winners = [r.status for r in (ra, rb)].count(Status.GOOD)
            assert winners == 1
            holder = a.device.luns[0].pr.state.res_holder
            assert holder == b.device.luns[0].pr.state.res_holder
            winner = (NODE1_A, KA) if ra.status == Status.GOOD else (NODE2_B, KB)
            h = a if winner[0] is NODE1_A else b
            assert_good(await out(h, winner[0], 2, rk=winner[1], type_=1))
    finally:
        await a.device.luns[0].shared.close()
        await b.device.luns[0].shared.close()



async def test_preempt_and_abort_through_b_aborts_tasks_on_a_over_rados(ceph_cluster, clients, object_name):
    from tests.scsi.test_tasks import GatedBackend, _settle

    backend = GatedBackend(BLOCKS * BS)
    a = await gateway(clients[0], ceph_cluster.pool, object_name, backend, [NODE1_A])
    b = await gateway(clients[1], ceph_cluster.pool, object_name, backend, [NODE2_B])
    try:
        assert_good(await out(a, NODE1_A, 0, sark=KA))
        assert_good(await out(b, NODE2_B, 0, sark=KB))
        assert_good(await out(a, NODE1_A, 1, rk=KA, type_=5))
        slow = asyncio.ensure_future(a.run(bytes((0x28, 0)) + (2000).to_bytes(4, "big") + bytes((0, 0, 1, 0)),
                                           nexus=NODE1_A))
        await _settle()
        assert 2000 in backend.started and not slow.done()
        assert_good(await out(b, NODE2_B, 5, rk=KB, sark=KA, type_=5))  # PREEMPT AND ABORT
        # Its status came back only after gateway A aborted node1's task.
        assert slow.done()
        with pytest.raises(asyncio.CancelledError):
            slow.result()
        assert a.device.luns[0].tasks.select() == []
        assert_check(await a.run(tur(), nexus=NODE1_A), Reason.REGISTRATIONS_PREEMPTED)
    finally:
        backend.gate.set()
        await a.device.luns[0].shared.close()
        await b.device.luns[0].shared.close()
