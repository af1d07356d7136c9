"""SBC-3 commands over a MemoryBackend."""

import asyncio
import struct

import pytest

from pyiscsi_target.scsi.command import Status
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice
from pyiscsi_target.storage.base import StorageError
from pyiscsi_target.storage.memory import MemoryBackend

from .conftest import (BLOCKS, BS, NEXUS_A, Harness, assert_check, assert_good, cdb6, cdb10, cdb12, cdb16, make_lu,
                       sa_in16)


def pattern(blocks: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(blocks * BS))


async def _h(**lu_kw) -> Harness:
    dev = ScsiTargetDevice("t", {0: make_lu(**lu_kw)})
    dev.add_nexus(NEXUS_A)
    h = Harness(dev)
    await h.drain_ua()
    return h


# --- READ / WRITE -------------------------------------------------------------------


@pytest.mark.parametrize("rd,wr,build", [(0x08, 0x0A, cdb6), (0x28, 0x2A, cdb10), (0xA8, 0xAA, cdb12), (0x88, 0x8A, cdb16)])
async def test_write_read_roundtrip(h, rd, wr, build):
    data = pattern(3)
    r = await h.run(build(wr, 100, 3), data)
    assert_good(r)
    assert r.data_out_wanted == 3 * BS
    r = await h.run(build(rd, 100, 3))
    assert_good(r)
    assert bytes(r.data_in) == data


async def test_read6_zero_means_256(h):
    r = await h.run(cdb6(0x08, 0, 0))
    assert len(r.data_in) == 256 * BS


async def test_zero_blocks_is_good(h):
    for op, build in ((0x28, cdb10), (0x2A, cdb10), (0x88, cdb16)):
        r = await h.run(build(op, 0, 0))
        assert_good(r)
        assert len(r.data_in) == 0


@pytest.mark.parametrize("op,build", [(0x28, cdb10), (0x2A, cdb10), (0x88, cdb16), (0x8A, cdb16), (0xA8, cdb12)])
async def test_beyond_end_of_lu(h, op, build):
    data = bytes(2 * BS) if op in (0x2A, 0x8A) else b""
    assert_check(await h.run(build(op, BLOCKS - 1, 2), data), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(build(op, BLOCKS + 1, 0)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(build(op, 0xFFFFFFFF, 1), bytes(BS) if data else b""), Reason.LBA_OUT_OF_RANGE)


async def test_read6_beyond_end(h):
    assert_check(await h.run(cdb6(0x08, BLOCKS - 1, 2)), Reason.LBA_OUT_OF_RANGE)


async def test_max_transfer_length(h, lu):
    assert_check(await h.run(cdb16(0x88, 0, lu.max_transfer_blocks + 1)), Reason.INVALID_FIELD_IN_CDB, fp=10)


async def test_write_protected():
    h = await _h(read_only=True)
    for cdb, data in ((cdb10(0x2A, 0, 1), bytes(BS)), (cdb10(0x41, 0, 1), bytes(BS)),
                      (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24)), (cdb16(0x89, 0, 0), b"")):
        assert_check(await h.run(cdb, data), Reason.WRITE_PROTECTED)
    assert_good(await h.run(cdb10(0x28, 0, 1)))


async def test_unmap_on_a_fully_provisioned_lu():
    """UNMAP is unsupported on a fully provisioned LU, except a read-only one,
    where it is write-protected like every write (libiscsi ReadOnly.ReadOnlySBC)."""
    unmap = bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0])
    params = struct.pack(">HH4xQI4x", 22, 16, 0, 1)
    h = await _h(thin=False, read_only=True)
    assert_check(await h.run(unmap, params), Reason.WRITE_PROTECTED)
    h = await _h(thin=False)
    assert_check(await h.run(unmap, params), Reason.INVALID_COMMAND_OPERATION_CODE)


async def test_fua_reaches_backend(h, lu):
    assert_good(await h.run(cdb10(0x2A, 0, 1, flags=0x08), bytes(BS)))
    assert lu.backend.fua_writes == 1
    assert_good(await h.run(cdb10(0x2A, 0, 1, flags=0x10), bytes(BS)))  # DPO only
    assert lu.backend.fua_writes == 1


async def test_write_short_data_out(h, lu):
    """EDTL < SPDTL (libiscsi iSCSIResiduals): never read past the buffer;
    write the whole blocks that arrived, GOOD; a partial block is refused
    and nothing is written.  data_out_wanted lets the fabric set the
    overflow residual."""
    for sent in (200, BS + 100):
        r = await h.run(cdb10(0x2A, 10, 2), b"\xAA" * sent)
        assert_check(r, Reason.INVALID_FIELD_IN_COMMAND_IU)
        assert r.data_out_wanted == 2 * BS
    assert bytes((await h.run(cdb10(0x28, 10, 2))).data_in) == bytes(2 * BS)
    r = await h.run(cdb10(0x2A, 10, 2), b"")
    assert_good(r)
    assert r.data_out_wanted == 2 * BS
    r = await h.run(cdb10(0x2A, 10, 2), b"\xAA" * BS)
    assert_good(r)
    assert bytes((await h.run(cdb10(0x28, 10, 2))).data_in) == b"\xAA" * BS + bytes(BS)
    r = await h.run(cdb10(0x2E, 20, 2, 0x02), b"\xBB" * BS)  # WRITE AND VERIFY too
    assert_good(r)
    assert r.data_out_wanted == 2 * BS
    assert bytes((await h.run(cdb10(0x28, 20, 2))).data_in) == b"\xBB" * BS + bytes(BS)


async def test_write_long_data_out_uses_prefix(h):
    r = await h.run(cdb10(0x2A, 10, 1), b"\xBB" * BS + b"\xCC" * 1000)
    assert_good(r)
    assert r.data_out_wanted == BS
    d = bytes((await h.run(cdb10(0x28, 10, 2))).data_in)
    assert d == b"\xBB" * BS + bytes(BS)


async def test_medium_errors():
    class Failing(MemoryBackend):
        def read_now(self, offset, length):
            raise StorageError(5, "EIO")

        async def read(self, offset, length):
            raise StorageError(5, "EIO")

        async def write(self, offset, data, *, fua=False):
            raise OSError(5, "EIO")

    h = await _h(backend=Failing(BLOCKS * BS))
    assert_check(await h.run(cdb10(0x28, 7, 1)), Reason.UNRECOVERED_READ_ERROR, info=7)
    assert_check(await h.run(cdb10(0x2A, 9, 1), bytes(BS)), Reason.WRITE_ERROR, info=9)
    h.device.luns[0].read_now = None     # a backend whose reads always wait: the awaited read fails
    assert_check(await h.run(cdb16(0x88, 11, 1)), Reason.UNRECOVERED_READ_ERROR, info=11)


# --- READ CAPACITY -------------------------------------------------------------------


async def test_read_capacity10(h):
    d = bytes((await h.run(bytes([0x25]) + bytes(9))).data_in)
    assert struct.unpack(">II", d) == (BLOCKS - 1, BS)


async def test_read_capacity_large_lu():
    big = MemoryBackend((1 << 33) * BS)  # 2^33 blocks: needs READ CAPACITY(16)
    h = await _h(backend=big)
    d = bytes((await h.run(bytes([0x25]) + bytes(9))).data_in)
    assert struct.unpack(">II", d) == (0xFFFFFFFF, BS)
    d = bytes((await h.run(sa_in16(0x10, alloc=32))).data_in)
    assert struct.unpack_from(">QI", d) == ((1 << 33) - 1, BS)


async def test_read_capacity16_fields(h):
    d = bytes((await h.run(sa_in16(0x10, alloc=32))).data_in)
    assert len(d) == 32 and d[14] & 0xC0 == 0xC0  # LBPME, LBPRZ on thin
    h2 = await _h(thin=False, physical_block_exponent=3)
    d = bytes((await h2.run(sa_in16(0x10, alloc=32))).data_in)
    assert d[13] == 3 and d[14] == 0 and d[15] == 0
    r = await h.run(sa_in16(0x10, alloc=8))
    assert len(r.data_in) == 8


# --- VERIFY / WRITE AND VERIFY --------------------------------------------------------


@pytest.mark.parametrize("op,build", [(0x2F, cdb10), (0xAF, cdb12), (0x8F, cdb16)])
async def test_verify(h, op, build):
    data = pattern(4)
    assert_good(await h.run(cdb10(0x2A, 20, 4), data))
    assert_good(await h.run(build(op, 20, 4, 0x00)))  # BYTCHK 0: readable
    assert_good(await h.run(build(op, 20, 4, 0x02), data))  # BYTCHK 1: compare
    bad = bytearray(data)
    bad[3 * BS + 17] ^= 0xFF
    assert_check(await h.run(build(op, 20, 4, 0x02), bytes(bad)), Reason.MISCOMPARE_DURING_VERIFY, info=3 * BS + 17)
    assert_check(await h.run(build(op, 20, 4, 0x04), data), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=2)
    assert_check(await h.run(build(op, BLOCKS, 1, 0x02), bytes(BS)), Reason.LBA_OUT_OF_RANGE)


async def test_verify_bytchk3_one_block(h):
    assert_good(await h.run(cdb10(0x2A, 0, 3), b"\x11" * 3 * BS))
    r = await h.run(cdb10(0x2F, 0, 3, 0x06), b"\x11" * BS)
    assert_good(r)
    assert r.data_out_wanted == BS
    assert_check(await h.run(cdb10(0x2F, 0, 4, 0x06), b"\x11" * BS), Reason.MISCOMPARE_DURING_VERIFY, info=0)


@pytest.mark.parametrize("op,build", [(0x2E, cdb10), (0xAE, cdb12), (0x8E, cdb16)])
async def test_write_and_verify(h, lu, op, build):
    data = pattern(2, 5)
    assert_good(await h.run(build(op, 30, 2, 0x02), data))
    assert bytes((await h.run(cdb10(0x28, 30, 2))).data_in) == data
    assert lu.backend.fua_writes >= 1
    assert_good(await h.run(build(op, 30, 2, 0x00), data))


# --- SYNCHRONIZE CACHE / PRE-FETCH -------------------------------------------------------


async def test_synchronize_cache(h, lu):
    assert_good(await h.run(cdb10(0x35, 8, 16)))
    assert lu.backend.flush_calls[-1] == (8 * BS, 16 * BS)
    assert_good(await h.run(cdb16(0x91, 10, 0)))  # 0 = to the end
    assert lu.backend.flush_calls[-1] == (10 * BS, (BLOCKS - 10) * BS)
    assert_check(await h.run(cdb10(0x35, BLOCKS - 1, 2)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb16(0x91, BLOCKS + 1, 0)), Reason.LBA_OUT_OF_RANGE)


async def test_pre_fetch(h):
    for cdb in (cdb10(0x34, 0, 1), cdb10(0x34, 0, 1, flags=0x02), cdb10(0x34, 0, 0, group=3), cdb16(0x90, BLOCKS - 1, 1)):
        r = await h.run(cdb)
        assert r.status == Status.GOOD
    assert_check(await h.run(cdb10(0x34, BLOCKS + 1, 0)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb16(0x90, BLOCKS, 2)), Reason.LBA_OUT_OF_RANGE)


# --- WRITE SAME --------------------------------------------------------------------------


async def test_write_same_pattern(h):
    blk = bytes(range(256)) * (BS // 256)
    assert_good(await h.run(cdb10(0x41, 40, 5), blk))
    assert bytes((await h.run(cdb10(0x28, 40, 5))).data_in) == blk * 5
    assert_good(await h.run(cdb16(0x93, 40, 2), b"\x00" * BS))
    assert bytes((await h.run(cdb10(0x28, 40, 3))).data_in) == bytes(2 * BS) + blk


async def test_write_same_unmap_deallocates(h, lu):
    assert_good(await h.run(cdb10(0x2A, 0, 256), b"\x55" * 256 * BS))
    assert_good(await h.run(cdb16(0x93, 0, 256, flags=0x08), bytes(BS)))
    ext = await lu.backend.allocation(0, 256 * BS)
    assert ext == [(0, 256 * BS, False)]
    # UNMAP bit with non-zero data still unmaps (LIO/tgt; libiscsi UnmapUntilEnd)
    assert_good(await h.run(cdb10(0x2A, 0, 2), b"\x55" * 2 * BS))
    assert_good(await h.run(cdb10(0x41, 0, 2, flags=0x08), b"\x66" * BS))
    assert bytes((await h.run(cdb10(0x28, 0, 2))).data_in) == bytes(2 * BS)


async def test_write_same_unmap_bit_on_full_lu_writes():
    h = await _h(thin=False)
    assert_good(await h.run(cdb10(0x41, 0, 2, flags=0x08), b"\x66" * BS))
    assert bytes((await h.run(cdb10(0x28, 0, 2))).data_in) == b"\x66" * 2 * BS


async def test_write_same_ndob(h):
    assert_good(await h.run(cdb10(0x2A, 3, 1), b"\x77" * BS))
    r = await h.run(cdb16(0x93, 3, 1, flags=0x01))
    assert_good(r)
    assert r.data_out_wanted == 0
    assert bytes((await h.run(cdb10(0x28, 3, 1))).data_in) == bytes(BS)


async def test_write_same_zero_blocks_to_end(h, lu):
    assert_good(await h.run(cdb10(0x2A, BLOCKS - 2, 2), b"\x12" * 2 * BS))
    assert_good(await h.run(cdb10(0x41, BLOCKS - 2, 0), b"\x34" * BS))
    assert bytes((await h.run(cdb10(0x28, BLOCKS - 2, 2))).data_in) == b"\x34" * 2 * BS
    lu.max_write_same_blocks = 16
    assert_check(await h.run(cdb10(0x41, 0, 0), bytes(BS)), Reason.INVALID_FIELD_IN_CDB, fp=7)
    assert_check(await h.run(cdb10(0x41, 0, 17), bytes(BS)), Reason.INVALID_FIELD_IN_CDB, fp=7)
    assert_good(await h.run(cdb10(0x41, BLOCKS - 16, 0), bytes(BS)))


async def test_write_same_errors(h):
    assert_check(await h.run(cdb10(0x41, BLOCKS - 1, 2), bytes(BS)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb10(0x41, BLOCKS + 1, 0), bytes(BS)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb10(0x41, 0, 1, flags=0x10), bytes(BS)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=4)  # ANCHOR
    assert_check(await h.run(cdb10(0x41, 0, 1, flags=0x01), bytes(BS)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=0)  # no NDOB in (10)
    for size in (BS // 2, 2 * BS):
        r = await h.run(cdb10(0x41, 0, 1), bytes(size))
        assert_check(r, Reason.INVALID_FIELD_IN_CDB)
        assert r.data_out_wanted == BS


# --- UNMAP -----------------------------------------------------------------------------


def unmap_cdb(length: int) -> bytes:
    return struct.pack(">BBxxxxBHB", 0x42, 0, 0, length, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


async def test_unmap(h, lu):
    assert_good(await h.run(cdb10(0x2A, 0, 256), b"\x55" * 256 * BS))
    p = unmap_params((0, 128), (128, 0), (200, 56))
    assert_good(await h.run(unmap_cdb(len(p)), p))
    assert bytes((await h.run(cdb10(0x28, 0, 256))).data_in) == bytes(128 * BS) + b"\x55" * 72 * BS + bytes(56 * BS)
    assert (await lu.backend.allocation(0, 128 * BS)) == [(0, 128 * BS, False)]


async def test_unmap_edge_cases_good(h):
    for p in (b"", unmap_params(), unmap_params((BLOCKS, 0)), unmap_params((0, 1)) + b"\x99" * 7):
        assert_good(await h.run(unmap_cdb(len(p)), p))


async def test_unmap_errors(h, lu):
    assert_check(await h.run(unmap_cdb(7), bytes(7)), Reason.PARAMETER_LIST_LENGTH_ERROR)
    p = unmap_params((BLOCKS - 1, 2))
    assert_check(await h.run(unmap_cdb(len(p)), p), Reason.LBA_OUT_OF_RANGE)
    lu.max_unmap_descriptors = 2
    p = unmap_params((0, 1), (1, 1), (2, 1))
    assert_check(await h.run(unmap_cdb(len(p)), p), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=2, cd=False)
    lu.max_unmap_blocks = 10
    p = unmap_params((0, 6), (100, 5))
    assert_check(await h.run(unmap_cdb(len(p)), p), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=24 + 8, cd=False)
    p = unmap_params((0, 1))
    assert_check(await h.run(bytes([0x42, 1, 0, 0, 0, 0, 0, 0, len(p), 0]), p), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=0)


async def test_unmap_validates_before_unmapping(h):
    assert_good(await h.run(cdb10(0x2A, 0, 1), b"\x55" * BS))
    p = unmap_params((0, 1), (BLOCKS, 1))
    assert_check(await h.run(unmap_cdb(len(p)), p), Reason.LBA_OUT_OF_RANGE)
    assert bytes((await h.run(cdb10(0x28, 0, 1))).data_in) == b"\x55" * BS


# --- GET LBA STATUS -------------------------------------------------------------------------


def _lba_status(d: bytes) -> list[tuple[int, int, int]]:
    n = int.from_bytes(d[:4], "big")
    return [struct.unpack_from(">QIB", d, 8 + i) for i in range(0, n - 4, 16)]


async def test_get_lba_status(h, lu):
    chunk = lu.backend.chunk_size // BS  # allocation granule of the memory backend
    assert_good(await h.run(cdb10(0x2A, chunk, 1), b"\x01" * BS))
    d = bytes((await h.run(sa_in16(0x12, 0, 4096))).data_in)
    assert _lba_status(d) == [(0, chunk, 1), (chunk, chunk, 0), (2 * chunk, BLOCKS - 2 * chunk, 1)]
    d = bytes((await h.run(sa_in16(0x12, chunk + 1, 24))).data_in)
    assert len(d) == 24 and _lba_status(d) == [(chunk + 1, chunk - 1, 0)]


async def test_get_lba_status_beyond_end(h):
    for lba in (BLOCKS, BLOCKS + 1, 1 << 63, (1 << 64) - 1):
        assert_check(await h.run(sa_in16(0x12, lba, 24)), Reason.LBA_OUT_OF_RANGE)


# --- COMPARE AND WRITE -------------------------------------------------------------------------


def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, flags, lba, n, 0, 0)


async def test_compare_and_write(h):
    old, new = b"A" * 2 * BS, b"B" * 2 * BS
    assert_good(await h.run(cdb10(0x2A, 50, 2), old))
    assert_good(await h.run(caw(50, 2), old + new))
    assert bytes((await h.run(cdb10(0x28, 50, 2))).data_in) == new


async def test_compare_and_write_miscompare(h):
    old = b"A" * BS
    assert_good(await h.run(cdb10(0x2A, 60, 1), old))
    for i in (0, 27, BS - 1):
        verify = bytearray(old)
        verify[i] = ord("Z")
        assert_check(await h.run(caw(60, 1), bytes(verify) + b"C" * BS), Reason.MISCOMPARE_DURING_VERIFY, info=i)
    assert bytes((await h.run(cdb10(0x28, 60, 1))).data_in) == old


async def test_compare_and_write_errors(h, lu):
    assert_good(await h.run(caw(0, 0)))
    assert_check(await h.run(caw(BLOCKS - 1, 2), bytes(4 * BS)), Reason.LBA_OUT_OF_RANGE)
    lu.max_compare_write_blocks = 1
    assert_check(await h.run(caw(0, 2), bytes(4 * BS)), Reason.INVALID_FIELD_IN_CDB, fp=13)
    for size in (4 * BS, BS):  # libiscsi CompareAndWrite.InvalidDataOutSize
        assert_check(await h.run(caw(0, 1), bytes(size)), Reason.INVALID_FIELD_IN_CDB)
    # 256 blocks wraps to 0 in the CDB byte: the data sent does not fit the CDB
    assert_check(await h.run(caw(0, 0), bytes(512 * BS)), Reason.INVALID_FIELD_IN_CDB)


async def test_compare_and_write_atomic_against_writes(h, lu):
    """A write issued while COMPARE AND WRITE holds the gate lands after it."""
    gate = asyncio.Event()
    orig_read = lu.backend.read

    async def slow_read(offset, length):
        await gate.wait()
        return await orig_read(offset, length)

    assert_good(await h.run(cdb10(0x2A, 70, 1), b"A" * BS))
    lu.backend.read = slow_read
    t_caw = asyncio.create_task(h.run(caw(70, 1), b"A" * BS + b"B" * BS))
    await asyncio.sleep(0.01)
    t_write = asyncio.create_task(h.run(cdb10(0x2A, 70, 1), b"C" * BS))
    await asyncio.sleep(0.01)
    assert not t_write.done()  # held back by the exclusive gate
    gate.set()
    assert_good(await t_caw)
    assert_good(await t_write)
    lu.backend.read = orig_read
    assert bytes((await h.run(cdb10(0x28, 70, 1))).data_in) == b"C" * BS


# --- ORWRITE(16), READ DEFECT DATA (libiscsi OrWrite.*, ReadDefectData*) ------------


async def test_orwrite_ors_data_into_the_medium(h):
    assert_good(await h.run(cdb10(0x2A, 10, 2), bytes([0x0F]) * BS + bytes([0x30]) * BS))
    r = await h.run(cdb16(0x8B, 10, 2), bytes([0xA0]) * (2 * BS))
    assert_good(r)
    assert r.data_out_wanted == 2 * BS
    got = bytes((await h.run(cdb10(0x28, 10, 2))).data_in)
    assert got == bytes([0xAF]) * BS + bytes([0xB0]) * BS
    assert bytes((await h.run(cdb10(0x28, 12, 1))).data_in) == bytes(BS)  # the next block untouched


async def test_orwrite_errors(h, lu):
    assert_good(await h.run(cdb16(0x8B, 0, 0)))  # zero blocks: GOOD, nothing written
    assert_check(await h.run(cdb16(0x8B, BLOCKS - 1, 2), bytes(2 * BS)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb16(0x8B, BLOCKS + 1, 0)), Reason.LBA_OUT_OF_RANGE)
    assert_check(await h.run(cdb16(0x8B, 2**64 - 1, 1), bytes(BS)), Reason.LBA_OUT_OF_RANGE)
    for orprotect in range(1, 8):  # no protection information: ORPROTECT is an invalid field
        cdb = bytearray(cdb16(0x8B, 0, 1))
        cdb[1] = orprotect << 5
        assert_check(await h.run(bytes(cdb), bytes(BS)), Reason.INVALID_FIELD_IN_CDB, fp=1,
                     bit=(orprotect << 5).bit_length() - 1)
    cdb = bytearray(cdb16(0x8B, 0, 1))
    cdb[1] = 0x18  # DPO, FUA accepted (DPOFUA=1 in MODE SENSE)
    assert_good(await h.run(bytes(cdb), bytes(BS)))


async def test_orwrite_write_protected():
    h = await _h(read_only=True)
    assert_check(await h.run(cdb16(0x8B, 0, 1), bytes(BS)), Reason.WRITE_PROTECTED)


async def test_read_defect_data_is_an_empty_list(h):
    r = await h.run(bytes([0x37, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 32, 0]))  # REQ_PLIST, REQ_GLIST, format 101b
    assert_good(r)
    assert bytes(r.data_in) == bytes([0, 0x1D, 0, 0])  # PLISTV GLISTV format, DEFECT LIST LENGTH 0
    r = await h.run(bytes([0xB7, 0x08 | 0x03, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]))
    assert_good(r)
    assert bytes(r.data_in) == bytes([0, 0x0B]) + bytes(6)
    r = await h.run(bytes([0x37, 0, 0, 0, 0, 0, 0, 0, 2, 0]))  # allocation length truncates
    assert bytes(r.data_in) == bytes(2)
    assert_check(await h.run(bytes([0x37, 1, 0, 0, 0, 0, 0, 0, 32, 0])), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=0)


async def test_new_commands_are_reported_supported(h):
    for op in (0x8B, 0x37, 0xB7):
        r = await h.run(bytes([0xA3, 0x0C, 0x01, op, 0, 0, 0, 0, 0x10, 0, 0, 0]))  # one command, no SA
        assert_good(r)
        assert r.data_in[1] & 0x07 == 0x03, hex(op)  # SUPPORT = 011b
        assert r.data_in[4] == op

