"""DeviceObserver: the per-command counters behind status, /metrics and the
dashboard, fed by the real SCSI core (quick lane, inline path and commands
that wait)."""

from __future__ import annotations

import asyncio

from pyiscsi_target.metrics import LATENCY_BOUNDS, DeviceObserver, LunStats
from pyiscsi_target.scsi.target import ScsiTargetDevice
from tests.scsi.conftest import BS, NEXUS_A, Harness, cdb10, cdb16, make_lu
from tests.scsi.test_inline_submit import SlowBackend


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def device(backend=None) -> tuple[ScsiTargetDevice, DeviceObserver, Clock]:
    lu = make_lu(backend=backend) if backend is not None else make_lu()
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
    dev.add_nexus(NEXUS_A)
    lu.unit_attentions.remove_nexus(NEXUS_A)
    clock = Clock()
    obs = DeviceObserver(clock)
    obs.luns[0] = LunStats()
    dev.observer = obs
    return dev, obs, clock


async def submit(dev: ScsiTargetDevice, cdb: bytes, data: bytes = b"", loop=None) -> list:
    got: list = []
    dev.submit(Harness(dev).task(cdb, data), got.append, loop)
    return got


async def test_commands_answered_at_once_count_in_the_first_bucket():
    dev, obs, clock = device()
    assert (await submit(dev, cdb16(0x88, 0, 2)))[0].status == 0             # quick lane
    assert (await submit(dev, cdb10(0x2A, 0, 1), bytes(BS)))[0].status == 0  # inline path
    assert (await submit(dev, cdb10(0x28, 9000, 1)))[0].status == 2           # out of range: CHECK CONDITION
    st = obs.luns[0]
    assert (st.read_ops, st.read_bytes, st.write_ops, st.write_bytes) == (2, 2 * BS, 1, BS)
    assert st.read_lat[0] == 2 and sum(st.read_lat) == 2 and st.read_lat_sum == 0.0
    assert st.write_lat[0] == 1 and sum(st.write_lat) == 1
    assert st.check_conditions == 1


async def test_a_command_that_waits_counts_its_latency():
    dev, obs, clock = device(SlowBackend(8192 * BS))
    loop = asyncio.get_running_loop()
    clock.t = loop.time()
    obs.now = lambda: loop.time() + 0.003          # the read ends 3 ms after it started
    got = await submit(dev, cdb10(0x28, 0, 1), loop=loop)
    assert not got
    dev.luns[0].backend.gate.set()
    while not got:
        await asyncio.sleep(0)
    st = obs.luns[0]
    bucket = next(i for i, b in enumerate(LATENCY_BOUNDS) if b >= 0.003)
    assert st.read_ops == 1 and st.read_lat[bucket] == 1 and st.read_lat[0] == 0
    assert 0.003 <= st.read_lat_sum < 0.01
