"""ScsiTargetDevice.submit's inline path (no task, no task-set entry for a
command that does not wait) answers exactly as the generic path does.

Every case runs the same command twice on two identical devices, one with the
inline path and one with it switched off (``device._inline = {}``), and
compares status, sense, Data-In and data_out_wanted byte for byte, and the
state left behind (unit attentions still queued).
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from pyiscsi_target.scsi.command import ScsiResult, ScsiTask, Status, TaskAttribute
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import _COMPLETED, ScsiTargetDevice
from pyiscsi_target.storage.memory import MemoryBackend

from .conftest import BS, NEXUS_A, NEXUS_B, Harness, cdb6, cdb10, cdb12, cdb16, make_lu, tur


async def submit(dev: ScsiTargetDevice, task: ScsiTask) -> tuple[ScsiResult | None, bool]:
    """(result, whether it completed inside submit)."""
    got: list = []
    t = dev.submit(task, got.append)
    inline = bool(got)
    while not got:
        await asyncio.sleep(0)
    assert t.done()
    return got[0], inline


def key(r: ScsiResult | None):
    if r is None:
        return None
    return (int(r.status), bytes(r.sense), bytes(r.data_in), r.data_out_wanted)


async def pair(setup=None) -> tuple[Harness, Harness]:
    hs = []
    for inline in (True, False):
        dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: make_lu()})
        if not inline:
            dev._inline = {}
        dev.add_nexus(NEXUS_A)
        dev.add_nexus(NEXUS_B)
        h = Harness(dev)
        await h.drain_ua(NEXUS_A)
        await h.drain_ua(NEXUS_B)
        # Some data to read back.
        await h.run(cdb10(0x2A, 0, 4), bytes(range(256)) * 8)
        if setup is not None:
            await setup(h)
        hs.append(h)
    return hs[0], hs[1]


def pr_out(sa: int, rk: int, sark: int = 0, type_: int = 0) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, type_, 24, 0)
    return cdb, struct.pack(">QQ8x", rk, sark)


async def _register_and_reserve(h: Harness) -> None:
    cdb, data = pr_out(0, 0, sark=0xA)
    await h.run(cdb, data, nexus=NEXUS_A)
    cdb, data = pr_out(1, 0xA, type_=1)          # WRITE EXCLUSIVE
    await h.run(cdb, data, nexus=NEXUS_A)


async def _register_only(h: Harness) -> None:
    cdb, data = pr_out(0, 0, sark=0xB)
    await h.run(cdb, data, nexus=NEXUS_B)


async def _scsi2_reserve(h: Harness) -> None:
    await h.run(bytes([0x16, 0, 0, 0, 0, 0]), nexus=NEXUS_A)


async def _ua_for_b(h: Harness) -> None:
    h.device.luns[0].unit_attentions.establish(NEXUS_B, Reason.MODE_PARAMETERS_CHANGED)


async def _swp(h: Harness) -> None:
    h.device.luns[0].software_write_protect = True


SETUPS = [None, _register_and_reserve, _register_only, _scsi2_reserve, _ua_for_b, _swp]

BLOCK = bytes(range(256)) * 2
COMMANDS = [
    ("read10", cdb10(0x28, 0, 4), b""),
    ("read10 fua dpo", cdb10(0x28, 1, 2, flags=0x18), b""),
    ("read10 reserved bit", cdb10(0x28, 0, 1, flags=0x01), b""),
    ("read10 rdprotect", cdb10(0x28, 0, 1, flags=0x20), b""),
    ("read10 group bits", cdb10(0x28, 0, 1, group=0x20), b""),
    ("read10 control naca", cdb10(0x28, 0, 1)[:9] + b"\x04", b""),
    ("read10 out of range", cdb10(0x28, 8191, 2), b""),
    ("read10 zero length", cdb10(0x28, 0, 0), b""),
    ("read16", cdb16(0x88, 2, 2), b""),
    ("read12", cdb12(0xA8, 0, 1), b""),
    ("read6", cdb6(0x08, 0, 1), b""),
    ("write10", cdb10(0x2A, 5, 1), BLOCK),
    ("write10 fua", cdb10(0x2A, 5, 1, flags=0x08), BLOCK),
    ("write10 short data", cdb10(0x2A, 5, 2), BLOCK),
    ("write10 partial block", cdb10(0x2A, 5, 1), BLOCK[:100]),
    ("write10 reserved bit", cdb10(0x2A, 5, 1, flags=0x04), BLOCK),
    ("write16", cdb16(0x8A, 7, 1), BLOCK),
    ("write16 out of range", cdb16(0x8A, 1 << 40, 1), BLOCK),
    ("tur", tur(), b""),
    ("inquiry", bytes([0x12, 0, 0, 0, 36, 0]), b""),
    ("unknown opcode", bytes([0xC0]) + bytes(9), b""),
    ("read capacity16", struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), b""),
]


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: getattr(s, "__name__", "clean"))
async def test_inline_and_generic_paths_agree(setup):
    fast, slow = await pair(setup)
    for nexus in (NEXUS_A, NEXUS_B):
        for name, cdb, data in COMMANDS:
            for attr in (TaskAttribute.SIMPLE, TaskAttribute.ORDERED, TaskAttribute.HEAD_OF_QUEUE):
                a, _ = await submit(fast.device, fast.task(cdb, data, nexus=nexus, attr=attr))
                b, _ = await submit(slow.device, slow.task(cdb, data, nexus=nexus, attr=attr))
                assert key(a) == key(b), (name, nexus.initiator_port, attr)
    for nexus in (NEXUS_A, NEXUS_B):
        assert fast.device.luns[0].unit_attentions.peek(nexus) == slow.device.luns[0].unit_attentions.peek(nexus)
    size = fast.device.luns[0].backend.size
    assert await fast.device.luns[0].backend.read(0, size) == await slow.device.luns[0].backend.read(0, size)


async def test_plain_read_completes_inline_without_task_set_entry():
    fast, _ = await pair()
    r, inline = await submit(fast.device, fast.task(cdb10(0x28, 0, 1)))
    assert inline and r.status == Status.GOOD and len(r.data_in) == BS
    assert len(fast.device.luns[0].tasks) == 0
    assert fast.device.submit(fast.task(cdb10(0x28, 0, 1)), lambda r: None) is _COMPLETED


class SlowBackend(MemoryBackend):
    """Reads wait on an event: the command must be registered and abortable."""

    read_now = None     # never without waiting (as RBD)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def read(self, offset: int, length: int):
        await self.gate.wait()
        return await super().read(offset, length)


async def test_a_command_that_waits_is_registered_and_can_be_aborted():
    lu = make_lu(backend=SlowBackend(8192 * BS))
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
    dev.add_nexus(NEXUS_A)
    lu.unit_attentions.remove_nexus(NEXUS_A)
    h = Harness(dev)
    got: list = []
    t = dev.submit(h.task(cdb10(0x28, 0, 1), tag=77), got.append)
    assert not t.done() and not got
    assert lu.tasks.find(NEXUS_A, 77) is not None           # registered while it waits
    # The same tag again: overlapped (SAM-5 §5.10), as on the generic path.
    r, _ = await submit(dev, h.task(cdb10(0x28, 0, 1), tag=77))
    assert r.status == Status.CHECK_CONDITION
    assert (r.sense[12], r.sense[13]) == Reason.OVERLAPPED_COMMANDS_ATTEMPTED.value[1:]
    assert await dev.abort_task(NEXUS_A, 0, 77) == 0
    await asyncio.sleep(0)
    assert got == [None]                                     # aborted: no result
    assert len(lu.tasks) == 0
    # A waiting command that finishes normally leaves the set too.
    got.clear()
    t = dev.submit(h.task(cdb10(0x28, 0, 1), tag=78), got.append)
    lu.backend.gate.set()
    while not got:
        await asyncio.sleep(0)
    assert got[0].status == Status.GOOD and len(lu.tasks) == 0


async def test_an_ordered_task_waits_for_an_inline_command_that_waits():
    lu = make_lu(backend=SlowBackend(8192 * BS))
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
    dev.add_nexus(NEXUS_A)
    lu.unit_attentions.remove_nexus(NEXUS_A)
    h = Harness(dev)
    order: list = []
    dev.submit(h.task(cdb10(0x28, 0, 1)), lambda r: order.append("read"))
    dev.submit(h.task(tur(), attr=TaskAttribute.ORDERED), lambda r: order.append("ordered tur"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == []
    lu.backend.gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert order == ["read", "ordered tur"]


@pytest.mark.parametrize("setup, quick", [(None, True), (_register_only, False), (_scsi2_reserve, False),
                                          (_register_and_reserve, False)],
                         ids=["clean", "registered", "scsi2 reserved", "pr reserved"])
async def test_quick_lane_only_while_nothing_can_conflict(setup, quick, monkeypatch):
    """A READ answered by the quick lane (OpSpec.quick: no Command, no
    coroutine) never reaches _submit_inline; with a reservation or a
    registration on the LU it does, so the reservation checks run."""
    fast, _ = await pair(setup)
    seen: list = []
    real = ScsiTargetDevice._submit_inline

    def spy(self, *args):
        seen.append(args[1].name)
        return real(self, *args)

    monkeypatch.setattr(ScsiTargetDevice, "_submit_inline", spy)
    r, inline = await submit(fast.device, fast.task(cdb16(0x88, 0, 4), nexus=NEXUS_B))
    assert inline
    assert seen == ([] if quick else ["READ(16)"])
    if quick:
        assert r.status == Status.GOOD and bytes(r.data_in) == (bytes(range(256)) * 8)[:4 * BS]


async def test_quick_lane_falls_back_when_the_backend_would_wait():
    """read_now answering None (a page-cache miss) sends the READ down the
    generic inline path, which awaits backend.read."""
    lu = make_lu()
    calls: list = []
    real_read = lu.backend.read

    async def read(offset, length):
        calls.append("read")
        return await real_read(offset, length)

    lu.read_now = lambda offset, length: calls.append("read_now")
    lu.backend.read = read
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
    dev.add_nexus(NEXUS_A)
    lu.unit_attentions.remove_nexus(NEXUS_A)
    r, _ = await submit(dev, Harness(dev).task(cdb10(0x28, 0, 1)))
    assert r.status == Status.GOOD and len(r.data_in) == BS
    assert calls == ["read_now", "read_now", "read"]      # quick lane, handler's try, then the wait


@pytest.mark.parametrize("error, reason", [(OSError(5, "EIO"), Reason.UNRECOVERED_READ_ERROR),
                                           (RuntimeError("bug"), Reason.INTERNAL_TARGET_FAILURE)])
async def test_quick_lane_backend_failures(error, reason):
    """A failing read_now: an I/O error is MEDIUM ERROR with the LBA, as on
    the generic path; anything else is left to the generic path, which
    reports INTERNAL TARGET FAILURE (and logs it)."""
    results = []
    for inline in (True, False):
        lu = make_lu()

        def fail(offset, length):
            raise error

        lu.read_now = fail
        dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
        if not inline:
            dev._inline = {}
        dev.add_nexus(NEXUS_A)
        lu.unit_attentions.remove_nexus(NEXUS_A)
        r, done_inline = await submit(dev, Harness(dev).task(cdb16(0x88, 5, 1)))
        assert done_inline
        results.append(key(r))
    assert results[0] == results[1]
    status, sense = results[0][0], results[0][1]
    assert status == Status.CHECK_CONDITION and (sense[2] & 0x0F, sense[12], sense[13]) == reason.value
