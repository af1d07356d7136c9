"""Task sets: abort / reset cancel running commands; ORDERED / HEAD OF QUEUE ordering."""

import asyncio

import pytest

from pyiscsi_target.scsi.command import TaskAttribute, TmfResponse
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice
from pyiscsi_target.storage.memory import MemoryBackend

from .conftest import BLOCKS, BS, NEXUS_A, NEXUS_B, Harness, assert_check, assert_good, cdb10, make_lu, tur


class GatedBackend(MemoryBackend):
    """Reads of LBA >= 1000 wait for ``gate``; records the order reads start."""

    read_now = None     # every read goes through read() (and may wait there)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.finished: list[int] = []

    async def read(self, offset, length):
        lba = offset // BS
        self.started.append(lba)
        if lba >= 1000:
            await self.gate.wait()
        data = await super().read(offset, length)
        self.finished.append(lba)
        return data


@pytest.fixture
async def gated():
    backend = GatedBackend(BLOCKS * BS)
    dev = ScsiTargetDevice("t", {0: make_lu(backend=backend), 1: make_lu(1)})
    for n in (NEXUS_A, NEXUS_B):
        dev.add_nexus(n)
    h = Harness(dev)
    for n in (NEXUS_A, NEXUS_B):
        for lun in (0, 1):
            await h.drain_ua(n, lun)
    return h, backend


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_abort_task_cancels_slow_read(gated):
    h, backend = gated
    slow = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), tag=42))
    await _settle()
    assert backend.started == [1000]
    assert await h.device.abort_task(NEXUS_A, 0, 42) == TmfResponse.COMPLETE
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert len(h.device.luns[0].tasks) == 0
    assert await h.device.abort_task(NEXUS_A, 0, 42) == TmfResponse.TASK_DOES_NOT_EXIST
    assert await h.device.abort_task(NEXUS_A, 9, 42) == TmfResponse.LUN_DOES_NOT_EXIST
    assert_good(await h.run(cdb10(0x28, 0, 1)))  # the LU still works


async def test_abort_task_other_nexus_tag_not_found(gated):
    h, backend = gated
    slow = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), tag=7))
    await _settle()
    assert await h.device.abort_task(NEXUS_B, 0, 7) == TmfResponse.TASK_DOES_NOT_EXIST
    backend.gate.set()
    assert_good(await slow)


async def test_abort_task_set_only_own_nexus(gated):
    h, backend = gated
    mine = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), nexus=NEXUS_A))
    theirs = asyncio.create_task(h.run(cdb10(0x28, 1001, 1), nexus=NEXUS_B))
    await _settle()
    assert await h.device.abort_task_set(NEXUS_A, 0) == TmfResponse.COMPLETE
    with pytest.raises(asyncio.CancelledError):
        await mine
    backend.gate.set()
    assert_good(await theirs)


async def test_clear_task_set_sets_ua_for_other_nexus(gated):
    h, backend = gated
    mine = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), nexus=NEXUS_A))
    theirs = asyncio.create_task(h.run(cdb10(0x28, 1001, 1), nexus=NEXUS_B))
    await _settle()
    assert await h.device.clear_task_set(NEXUS_A, 0) == TmfResponse.COMPLETE
    for t in (mine, theirs):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert_check(await h.run(tur(), nexus=NEXUS_B), Reason.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    assert_good(await h.run(tur(), nexus=NEXUS_A))


async def test_lun_reset(gated):
    h, backend = gated
    a = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), nexus=NEXUS_A))
    b = asyncio.create_task(h.run(cdb10(0x28, 1001, 1), nexus=NEXUS_B))
    await _settle()
    assert await h.device.lun_reset(NEXUS_A, 0) == TmfResponse.COMPLETE
    for t in (a, b):
        with pytest.raises(asyncio.CancelledError):
            await t
    # SAM-5 §6.3.3: every I_T nexus gets 29/03, the issuer's too (libiscsi MultipathIO.Reset).
    for n in (NEXUS_A, NEXUS_B):
        assert_check(await h.run(tur(), nexus=n), Reason.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        assert_good(await h.run(tur(), nexus=n))  # reported once
        assert_good(await h.run(tur(), nexus=n, lun=1))  # other LU untouched
    assert await h.device.lun_reset(NEXUS_A, 9) == TmfResponse.LUN_DOES_NOT_EXIST


@pytest.mark.parametrize("cold,reason", [(False, Reason.SCSI_BUS_RESET_OCCURRED), (True, Reason.POWER_ON_OCCURRED)])
async def test_target_reset(gated, cold, reason):
    h, backend = gated
    a = asyncio.create_task(h.run(cdb10(0x28, 1000, 1), nexus=NEXUS_B))
    await _settle()
    assert await h.device.target_reset(NEXUS_A, cold) == TmfResponse.COMPLETE
    with pytest.raises(asyncio.CancelledError):
        await a
    for lun in (0, 1):  # every nexus, the issuer's included (SAM-5 §6.3.2)
        for n in (NEXUS_A, NEXUS_B):
            assert_check(await h.run(tur(), nexus=n, lun=lun), reason)
            assert_good(await h.run(tur(), nexus=n, lun=lun))


async def test_ordered_waits_for_earlier_and_blocks_later_simple(gated):
    h, backend = gated
    first = asyncio.create_task(h.run(cdb10(0x28, 1000, 1)))  # SIMPLE, blocked on gate
    await _settle()
    ordered = asyncio.create_task(h.run(cdb10(0x28, 5, 1), attr=TaskAttribute.ORDERED))
    await _settle()
    later = asyncio.create_task(h.run(cdb10(0x28, 6, 1)))
    await _settle()
    assert backend.started == [1000]  # neither the ORDERED nor the later SIMPLE started
    backend.gate.set()
    for t in (first, ordered, later):
        assert_good(await t)
    assert backend.started == [1000, 5, 6]


async def test_simple_tasks_run_concurrently(gated):
    h, backend = gated
    first = asyncio.create_task(h.run(cdb10(0x28, 1000, 1)))
    await _settle()
    assert_good(await h.run(cdb10(0x28, 7, 1)))  # not blocked by the slow SIMPLE one
    backend.gate.set()
    assert_good(await first)


async def test_head_of_queue_bypasses_ordered(gated):
    h, backend = gated
    first = asyncio.create_task(h.run(cdb10(0x28, 1000, 1)))
    await _settle()
    ordered = asyncio.create_task(h.run(cdb10(0x28, 5, 1), attr=TaskAttribute.ORDERED))
    await _settle()
    assert_good(await h.run(cdb10(0x28, 8, 1), attr=TaskAttribute.HEAD_OF_QUEUE))
    assert backend.started == [1000, 8]
    backend.gate.set()
    assert_good(await first)
    assert_good(await ordered)


async def test_abort_of_waiting_ordered_task_releases_followers(gated):
    h, backend = gated
    first = asyncio.create_task(h.run(cdb10(0x28, 1000, 1)))
    await _settle()
    ordered = asyncio.create_task(h.run(cdb10(0x28, 5, 1), attr=TaskAttribute.ORDERED, tag=500))
    await _settle()
    later = asyncio.create_task(h.run(cdb10(0x28, 6, 1)))
    await _settle()
    assert await h.device.abort_task(NEXUS_A, 0, 500) == TmfResponse.COMPLETE
    with pytest.raises(asyncio.CancelledError):
        await ordered
    assert_good(await later)  # no longer held behind the aborted ORDERED task
    backend.gate.set()
    assert_good(await first)


async def test_close_flushes_and_closes(device, lu):
    await device.close()
    assert lu.backend.flush_calls and lu.backend.closed


async def test_caller_cancellation_cleans_task_set(gated):
    h, backend = gated
    t = asyncio.create_task(h.run(cdb10(0x28, 1000, 1)))
    await _settle()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert len(h.device.luns[0].tasks) == 0


async def test_target_reset_spares_luns_masked_from_the_issuer():
    """An initiator that LUN masking hides LUN 1 from cannot reset it: its
    commands from others keep running and no reset UA is raised there."""
    backend = GatedBackend(BLOCKS * BS)
    views = {NEXUS_A: {0}}  # A sees LUN 0 only; B sees both
    dev = ScsiTargetDevice("t", {0: make_lu(), 1: make_lu(1, backend=backend)},
                           lun_view=lambda n: views.get(n))
    for n in (NEXUS_A, NEXUS_B):
        dev.add_nexus(n)
    h = Harness(dev)
    await h.drain_ua(NEXUS_A, 0)
    for lun in (0, 1):
        await h.drain_ua(NEXUS_B, lun)
    slow = asyncio.ensure_future(h.run(cdb10(0x28, 2000, 1), nexus=NEXUS_B, lun=1))
    await _settle()
    assert 2000 in backend.started
    assert await dev.target_reset(NEXUS_A, cold=False) == TmfResponse.COMPLETE
    await _settle()
    assert not slow.done()  # B's command on the masked LUN still runs
    backend.gate.set()
    assert_good(await slow)
    assert_good(await h.run(tur(), nexus=NEXUS_B, lun=1))  # no reset UA on LUN 1
    assert_check(await h.run(tur(), nexus=NEXUS_B, lun=0), Reason.SCSI_BUS_RESET_OCCURRED)
