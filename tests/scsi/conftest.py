"""Shared helpers: a device over a MemoryBackend, CDB builders, sense asserts."""

from __future__ import annotations

import itertools
import struct

import pytest

from pyiscsi_target.scsi.command import Nexus, ScsiResult, ScsiTask, Status, TaskAttribute
from pyiscsi_target.scsi.lun import LogicalUnit, LuIdentity
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice
from pyiscsi_target.storage.memory import MemoryBackend

TARGET_PORT = "iqn.2026-11.org.example:disk,t,0x0001"
NEXUS_A = Nexus("iqn.1994-05.com.example:host-a,i,0x400001370000", TARGET_PORT, 1)
NEXUS_B = Nexus("iqn.1994-05.com.example:host-b,i,0x400001370000", TARGET_PORT, 1)

BS = 512
BLOCKS = 8192  # 4 MiB


def identity(n: int = 0) -> LuIdentity:
    return LuIdentity(serial=f"PYI{n:013d}", naa=_naa(n))


def _naa(n: int) -> bytes:
    # NAA 6h, IEEE company id 0x001405 (example), vendor-specific part per LU.
    return bytes.fromhex("60014050") + n.to_bytes(12, "big")


def make_lu(lun_id: int = 0, *, blocks: int = BLOCKS, thin: bool = True, backend=None, **kw) -> LogicalUnit:
    backend = backend if backend is not None else MemoryBackend(blocks * BS, thin=thin)
    return LogicalUnit(lun_id, backend, identity(lun_id), **kw)


class Harness:
    """Drives ScsiTargetDevice.execute with real CDB bytes."""

    def __init__(self, device: ScsiTargetDevice) -> None:
        self.device = device
        self._tags = itertools.count(1)

    def task(self, cdb: bytes, data_out: bytes = b"", *, lun: int = 0, nexus: Nexus = NEXUS_A,
             attr: TaskAttribute = TaskAttribute.SIMPLE, tag: int | None = None) -> ScsiTask:
        return ScsiTask(nexus=nexus, lun=lun, cdb=cdb.ljust(16, b"\0"), tag=next(self._tags) if tag is None else tag,
                        attribute=attr, data_out=data_out, expected_length=len(data_out))

    async def run(self, cdb: bytes, data_out: bytes = b"", **kw) -> ScsiResult:
        return await self.device.execute(self.task(cdb, data_out, **kw))

    async def drain_ua(self, nexus: Nexus = NEXUS_A, lun: int = 0) -> None:
        while (await self.run(tur(), nexus=nexus, lun=lun)).status != Status.GOOD:
            pass


@pytest.fixture
def lu() -> LogicalUnit:
    return make_lu()


@pytest.fixture
async def device(lu: LogicalUnit) -> ScsiTargetDevice:
    dev = ScsiTargetDevice("iqn.2026-11.org.example:disk", {0: lu})
    dev.add_nexus(NEXUS_A)
    dev.add_nexus(NEXUS_B)
    return dev


@pytest.fixture
async def h(device: ScsiTargetDevice) -> Harness:
    harness = Harness(device)
    for lun in device.luns:
        await harness.drain_ua(NEXUS_A, lun)
        await harness.drain_ua(NEXUS_B, lun)
    return harness


# --- CDB builders ------------------------------------------------------------------


def tur() -> bytes:
    return bytes(6)


def cdb6(op: int, lba: int, n: int, control: int = 0) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, control))


def cdb10(op: int, lba: int, n: int, flags: int = 0, group: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, group, n, 0)


def cdb12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def cdb16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba & 0xFFFFFFFFFFFFFFFF, n, 0, 0)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def sa_in16(sa: int, lba: int = 0, alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, sa, lba, alloc, 0, 0)


# --- assertions ---------------------------------------------------------------------


def sense_tuple(result: ScsiResult) -> tuple[int, int, int]:
    s = result.sense
    return s[2] & 0x0F, s[12], s[13]


def assert_good(result: ScsiResult) -> None:
    assert result.status == Status.GOOD, (result.status, result.sense.hex())


def assert_check(result: ScsiResult, reason: Reason, *, fp: int | None = None, bit: int | None = None,
                 cd: bool | None = None, info: int | None = None) -> None:
    assert result.status == Status.CHECK_CONDITION, result
    assert result.sense[0] & 0x7F == 0x70
    assert sense_tuple(result) == reason.value, (sense_tuple(result), reason)
    if fp is not None:
        assert result.sense[15] & 0x80, "SKSV not set"
        assert int.from_bytes(result.sense[16:18], "big") == fp
        if bit is not None:
            assert result.sense[15] & 0x08, "BPV not set"
            assert result.sense[15] & 0x07 == bit
        if cd is not None:
            assert bool(result.sense[15] & 0x40) == cd
    if info is not None:
        assert result.sense[0] & 0x80, "VALID not set"
        assert int.from_bytes(result.sense[3:7], "big") == info
