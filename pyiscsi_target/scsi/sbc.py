"""SBC-3 block commands: READ/WRITE, VERIFY, capacity, cache, provisioning.

The handlers convert LBAs to byte offsets and call the :class:`Backend`; the
backend knows no SCSI.  Backend failures become MEDIUM ERROR (SBC-3 §4.11):
UNRECOVERED READ ERROR for reads, WRITE ERROR for writes and flushes.
"""

from __future__ import annotations

import errno

import struct

from .context import Command, Reply
from .lun import LogicalUnit
from .sense import Reason, ScsiError

# --- CDB decoding by opcode group (SPC-4 §4.2.5.1) ------------------------------
# The LBA and transfer length sit at fixed places for each CDB group, so one
# decoder per group replaces per-opcode parsing: (format, offset of LBA,
# offset of the length field, for field pointers).
_GROUP_LAYOUT = {
    1: (struct.Struct(">IxH"), 2, 7),  # 10-byte: LBA 2-5, length 7-8
    2: (struct.Struct(">IxH"), 2, 7),
    4: (struct.Struct(">QI"), 2, 10),  # 16-byte: LBA 2-9, length 10-13
    5: (struct.Struct(">II"), 2, 6),  # 12-byte: LBA 2-5, length 6-9
}

FUA = 0x08
CHUNK_BYTES = 1024 * 1024  # bound on buffers for VERIFY and WRITE SAME loops


def lba_and_length(cdb: bytes) -> tuple[int, int, int]:
    """(LBA, length in blocks, byte offset of the length field) from a CDB."""
    group = cdb[0] >> 5
    if group == 0:  # READ(6)/WRITE(6): 21-bit LBA, 0 means 256 (SBC-3 §5.14)
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return lba, cdb[4] or 256, 4
    fmt, lba_at, len_at = _GROUP_LAYOUT[group]
    lba, length = fmt.unpack_from(cdb, lba_at)
    return lba, length, len_at


def check_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    """SBC-3 §4.5: any block past the capacity is LBA OUT OF RANGE."""
    n = lu.num_blocks
    if lba > n or lba + blocks > n:
        raise ScsiError(Reason.LBA_OUT_OF_RANGE)


def check_transfer(lu: LogicalUnit, blocks: int, len_at: int) -> None:
    """SBC-3 §6.5.3: TRANSFER LENGTH above MAXIMUM TRANSFER LENGTH is an invalid field."""
    if blocks > lu.max_transfer_blocks:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=len_at, bit=7)


def write_data(cmd: Command, lu: LogicalUnit, blocks: int) -> memoryview:
    """Data-Out for a write of ``blocks``: all of it, or when the initiator's
    expected length is short, the whole blocks that arrived (FCP-4 §9.4.2 a;
    the fabric reports the overflow residual from ``data_out_wanted``).  A
    partial block cannot be written as such: INVALID FIELD IN COMMAND
    INFORMATION UNIT, nothing written (FCP-4 §9.4.2 b)."""
    data = cmd.data_out(blocks * lu.block_size, partial=True)
    if len(data) % lu.block_size:
        raise ScsiError(Reason.INVALID_FIELD_IN_COMMAND_IU)
    return data


def check_writable(lu: LogicalUnit) -> None:
    """A read-only LU, or SWP=1 in the Control mode page (SPC-4 §7.5.8):
    DATA PROTECT, WRITE PROTECTED."""
    if lu.read_only or lu.software_write_protect:
        raise ScsiError(Reason.WRITE_PROTECTED)


def medium_failure(e: OSError, reason: Reason, lba: int) -> ScsiError:
    """The sense for a failed backend operation.  A timeout means the storage
    behind this port did not answer (an RBD LUN whose OSDs are unreachable
    from this gateway), not that the medium is bad: NOT READY, ASYMMETRIC
    ACCESS STATE TRANSITION (SPC-4 §5.16.2.6) makes multipath initiators
    retry, on another path if they have one, where MEDIUM ERROR would fail
    the I/O."""
    if e.errno == errno.ETIMEDOUT:
        return ScsiError(Reason.LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION)
    return ScsiError(reason, information=lba)


async def read_medium(lu: LogicalUnit, lba: int, blocks: int) -> bytes | bytearray | memoryview:
    bs = lu.block_size
    try:
        return await lu.backend.read(lba * bs, blocks * bs)
    except OSError as e:
        raise medium_failure(e, Reason.UNRECOVERED_READ_ERROR, lba) from None


async def write_medium(lu: LogicalUnit, lba: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
    try:
        await lu.backend.write(lba * lu.block_size, data, fua=fua)
    except OSError as e:
        raise medium_failure(e, Reason.WRITE_ERROR, lba) from None


def first_mismatch(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int | None:
    """Offset of the first differing byte, or None (compares 4 KiB at a time)."""
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if ma == mb:
        return None
    step = 4096
    for start in range(0, len(ma), step):
        if ma[start : start + step] != mb[start : start + step]:
            for i in range(start, min(start + step, len(ma))):
                if ma[i] != mb[i]:
                    return i
    return min(len(ma), len(mb))


# --- READ / WRITE (SBC-3 §5.14-5.17, §5.31-5.35) --------------------------------


def read_now(lu: LogicalUnit, cdb: bytes) -> Reply:
    """READ without waiting: the Data-In, or None when the backend would have
    to wait for it (then :func:`read` awaits it).  The quick lane of
    ScsiTargetDevice.submit calls this directly, with no Command object and
    no coroutine; ScsiError and OSError mean what they mean in :func:`read`."""
    lba, blocks, len_at = lba_and_length(cdb)
    check_transfer(lu, blocks, len_at)
    check_range(lu, lba, blocks)
    if not blocks:  # not an error (SBC-3 §5.15)
        return b""
    # DPO and FUA ask for no cache retention / a medium read: a backend read
    # returns the current data either way, so both are satisfied.
    bs = lu.block_size
    try:
        rft = lu.read_for_transfer
        if rft is not None:
            region = rft(lba * bs, blocks * bs)  # zero-copy payload (payload.py), or None
            if region is not None:
                return region
        now = lu.read_now
        return now(lba * bs, blocks * bs) if now is not None else None
    except OSError as e:
        raise medium_failure(e, Reason.UNRECOVERED_READ_ERROR, lba) from None


async def read(cmd: Command) -> Reply:
    lu = cmd.lu               # cmd.unit without the property (the LUN check ran)
    cdb = cmd.task.cdb
    data = read_now(lu, cdb)  # the checks, and the data if it is there
    if data is not None:
        return data
    # The backend has to wait (a disk, RBD).
    lba, blocks, _ = lba_and_length(cdb)
    bs = lu.block_size
    try:
        return await lu.backend.read(lba * bs, blocks * bs)
    except OSError as e:
        raise medium_failure(e, Reason.UNRECOVERED_READ_ERROR, lba) from None


def checked_write_data(cmd: Command, lu, lba: int, blocks: int, len_at: int):
    """The checks every writing command runs, in this order (write protect,
    transfer length, LBA range), then the Data-Out blocks to write."""
    check_writable(lu)
    check_transfer(lu, blocks, len_at)
    check_range(lu, lba, blocks)
    return write_data(cmd, lu, blocks)


async def write(cmd: Command) -> Reply:
    lu = cmd.lu               # cmd.unit without the property (the LUN check ran)
    cdb = cmd.task.cdb
    lba, blocks, len_at = lba_and_length(cdb)
    cmd.data_out_wanted = blocks * lu.block_size
    data = checked_write_data(cmd, lu, lba, blocks, len_at)
    if not data:
        return None
    fua = cdb[0] >> 5 != 0 and bool(cdb[1] & FUA)  # WRITE(6) has no FUA bit
    gate = lu.write_gate
    if gate.try_shared():
        # write_medium, inlined: one coroutine less on the hottest path.
        try:
            await lu.backend.write(lba * lu.block_size, data, fua=fua)
        except OSError as e:
            raise medium_failure(e, Reason.WRITE_ERROR, lba) from None
        finally:
            gate.release_shared()
        return None
    async with gate.shared():
        await write_medium(lu, lba, data, fua)
    return None


async def orwrite(cmd: Command) -> Reply:
    """ORWRITE(16) (SBC-4): the medium becomes medium OR Data-Out, in one
    read-modify-write atomic w.r.t. every other write (exclusive write gate,
    as COMPARE AND WRITE).  ORPROTECT is rejected by the CDB mask (no PI)."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba, blocks, len_at = lba_and_length(cdb)
    cmd.data_out_wanted = blocks * lu.block_size
    data = checked_write_data(cmd, lu, lba, blocks, len_at)
    if not data:
        return None
    blocks = len(data) // lu.block_size
    async with lu.write_gate.exclusive():
        current = await read_medium(lu, lba, blocks)
        n = len(data)
        merged = (int.from_bytes(current, "big") | int.from_bytes(data, "big")).to_bytes(n, "big")
        await write_medium(lu, lba, merged, bool(cdb[1] & FUA))
    return None


# --- VERIFY / WRITE AND VERIFY (SBC-3 §5.34-5.36, §5.38-5.40) --------------------


async def _compare_medium(lu: LogicalUnit, lba: int, blocks: int, expected: memoryview, one_block: bool) -> None:
    """Read [lba, lba+blocks) in chunks and compare with ``expected``; raise
    MISCOMPARE with INFORMATION = offset in the Data-Out buffer of the first
    differing byte (SBC-3 §5.34.1).  ``one_block``: BYTCHK=11b, the same block
    is compared with every block of the range."""
    bs = lu.block_size
    per_chunk = max(1, CHUNK_BYTES // bs)
    done = 0
    while done < blocks:
        n = min(per_chunk, blocks - done)
        medium = await read_medium(lu, lba + done, n)
        if one_block:
            mv = memoryview(medium)
            for i in range(n):
                off = first_mismatch(mv[i * bs : (i + 1) * bs], expected)
                if off is not None:
                    raise ScsiError(Reason.MISCOMPARE_DURING_VERIFY, information=off)
        else:
            off = first_mismatch(medium, expected[done * bs : (done + n) * bs])
            if off is not None:
                raise ScsiError(Reason.MISCOMPARE_DURING_VERIFY, information=done * bs + off)
        done += n


async def _check_readable(lu: LogicalUnit, lba: int, blocks: int) -> None:
    per_chunk = max(1, CHUNK_BYTES // lu.block_size)
    done = 0
    while done < blocks:
        n = min(per_chunk, blocks - done)
        await read_medium(lu, lba + done, n)
        done += n


async def verify(cmd: Command) -> Reply:
    """BYTCHK 00b: check the blocks are readable; 01b: compare with Data-Out;
    11b: compare one Data-Out block with each block; 10b reserved."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba, blocks, len_at = lba_and_length(cdb)
    bytchk = (cdb[1] >> 1) & 0x03
    bs = lu.block_size
    if bytchk == 0b10:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=2)
    wanted = {0b00: 0, 0b01: blocks * bs, 0b11: bs if blocks else 0}[bytchk]
    cmd.data_out_wanted = wanted
    if bytchk == 0b01:
        check_transfer(lu, blocks, len_at)
    check_range(lu, lba, blocks)
    if bytchk == 0b00:
        if blocks:
            await _check_readable(lu, lba, blocks)
        return None
    expected = cmd.data_out(wanted)
    if blocks:
        await _compare_medium(lu, lba, blocks, expected, one_block=bytchk == 0b11)
    return None


async def write_and_verify(cmd: Command) -> Reply:
    """Write with FUA so the verification reads the medium, then compare
    (BYTCHK=1) or just re-read (BYTCHK=0)."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba, blocks, len_at = lba_and_length(cdb)
    bytchk = (cdb[1] >> 1) & 0x03
    cmd.data_out_wanted = blocks * lu.block_size
    if bytchk > 1:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=2)
    data = checked_write_data(cmd, lu, lba, blocks, len_at)
    blocks = len(data) // lu.block_size
    if blocks == 0:
        return None
    async with lu.write_gate.shared():
        await write_medium(lu, lba, data, True)
    if bytchk:
        await _compare_medium(lu, lba, blocks, data, one_block=False)
    else:
        await _check_readable(lu, lba, blocks)
    return None


# --- READ CAPACITY (SBC-3 §5.15-5.16) ----------------------------------------------


async def read_capacity10(cmd: Command) -> Reply:
    lu = cmd.unit
    last = lu.num_blocks - 1
    # 0xFFFFFFFF tells the initiator to use READ CAPACITY(16) (SBC-3 §5.15.2).
    return struct.pack(">II", min(last, 0xFFFFFFFF), lu.block_size)


async def read_capacity16(cmd: Command) -> Reply:
    lu = cmd.unit
    alloc = int.from_bytes(cmd.cdb[10:14], "big")
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, lu.num_blocks - 1, lu.block_size)
    data[13] = lu.physical_block_exponent & 0x0F  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    if lu.thin:
        data[14] = 0x80 | 0x40  # LBPME, LBPRZ (unmapped blocks read as zeros)
    # LOWEST ALIGNED LOGICAL BLOCK ADDRESS stays 0; no protection (P_TYPE, PROT_EN 0).
    return Command.allocation(data, alloc)


async def read_defect_data(cmd: Command) -> Reply:
    """READ DEFECT DATA(10)/(12) (SBC-3): an image has no defects,
    so the list is empty, in whatever format was asked for.  PLISTV/GLISTV
    echo REQ_PLIST/REQ_GLIST: the (empty) lists asked for are returned."""
    cdb = cmd.cdb
    if cdb[0] == 0x37:
        flags, alloc = cdb[2], int.from_bytes(cdb[7:9], "big")
        header = bytes((0, flags & 0x1F, 0, 0))  # DEFECT LIST LENGTH 0
    else:
        flags, alloc = cdb[1], int.from_bytes(cdb[6:10], "big")
        header = bytes((0, flags & 0x1F)) + bytes(6)  # GENERATION CODE 0, DEFECT LIST LENGTH 0
    return Command.allocation(header, alloc)


# --- SYNCHRONIZE CACHE, PRE-FETCH (SBC-3 §5.22-5.23, §5.11-5.12) ---------------------


def _range_to_end(lu: LogicalUnit, lba: int, blocks: int) -> int:
    """For commands where NUMBER OF LOGICAL BLOCKS 0 means 'to the last LBA'."""
    if lba > lu.num_blocks:
        raise ScsiError(Reason.LBA_OUT_OF_RANGE)
    if blocks == 0:
        return lu.num_blocks - lba
    check_range(lu, lba, blocks)
    return blocks


async def synchronize_cache(cmd: Command) -> Reply:
    """Make the range durable.  IMMED=1 allows an early GOOD; we complete the
    flush first anyway, which is always allowed."""
    lu = cmd.unit
    lba, blocks, _ = lba_and_length(cmd.cdb)
    blocks = _range_to_end(lu, lba, blocks)
    if blocks == 0:
        return None
    bs = lu.block_size
    try:
        await lu.backend.flush(lba * bs, blocks * bs)
    except OSError as e:
        raise medium_failure(e, Reason.WRITE_ERROR, lba) from None
    return None


async def pre_fetch(cmd: Command) -> Reply:
    """Range-checked no-op.  GOOD (not CONDITION MET) says the blocks were not
    all placed in a cache (SBC-3 §5.11): we keep no cache of our own."""
    lu = cmd.unit
    lba, blocks, _ = lba_and_length(cmd.cdb)
    _range_to_end(lu, lba, blocks)
    return None


# --- WRITE SAME (SBC-3 §5.41-5.42), UNMAP (§5.28), GET LBA STATUS (§5.6) -------------


async def write_same(cmd: Command) -> Reply:
    lu = cmd.unit
    cdb = cmd.cdb
    lba, blocks, len_at = lba_and_length(cdb)
    unmap = bool(cdb[1] & 0x08)
    ndob = bool(cdb[1] & 0x01)  # NDOB: WRITE SAME(16) only; the CDB mask rejects it in (10)
    bs = lu.block_size
    cmd.data_out_wanted = 0 if ndob else bs
    check_writable(lu)
    if lba > lu.num_blocks:
        raise ScsiError(Reason.LBA_OUT_OF_RANGE)
    if blocks == 0:
        # SBC-3 §5.42: 0 = to the last LBA, when WSNZ=0 and the range fits
        # MAXIMUM WRITE SAME LENGTH (libiscsi WriteSame*.ZeroBlocks).
        blocks = lu.num_blocks - lba
    if lu.max_write_same_blocks and blocks > lu.max_write_same_blocks:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=len_at, bit=7)
    check_range(lu, lba, blocks)
    pattern = memoryview(bytes(bs)) if ndob else cmd.data_out(bs, exact=True)
    if blocks == 0:
        return None
    zero = pattern == bytes(bs)
    offset, length = lba * bs, blocks * bs
    async with lu.write_gate.shared():
        try:
            if unmap and lu.thin:
                # UNMAP=1 on a thin LU (LBPWS=1): unmap the range; with LBPRZ=1
                # it then reads as zeros whatever the Data-Out block held, as
                # LIO and tgt do and libiscsi WriteSame*.UnmapUntilEnd expects
                # (SBC-3 §5.42, §4.7.3.4).
                await lu.backend.discard(offset, length)
            elif zero:
                await lu.backend.write_zeroes(offset, length)
            else:
                per_chunk = max(1, min(blocks, CHUNK_BYTES // bs))
                chunk = memoryview(bytes(pattern) * per_chunk)
                done = 0
                while done < blocks:
                    n = min(per_chunk, blocks - done)
                    await lu.backend.write(offset + done * bs, chunk[: n * bs])
                    done += n
        except OSError as e:
            raise medium_failure(e, Reason.WRITE_ERROR, lba) from None
    return None


UNMAP_HEADER = 8
UNMAP_DESCRIPTOR = 16


async def unmap(cmd: Command) -> Reply:
    """SBC-3 §5.28.  The whole parameter list is validated before any block
    is unmapped, so an error leaves the medium untouched."""
    lu = cmd.unit
    length = int.from_bytes(cmd.cdb[7:9], "big")
    cmd.data_out_wanted = length
    check_writable(lu)
    if length == 0:  # no parameter data: not an error (SBC-3 §5.28.1)
        return None
    data = cmd.data_out(length)
    if length < UNMAP_HEADER:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    data_length, bd_length = struct.unpack_from(">HH", data, 0)
    # Use what was really sent: the lesser of the lengths claimed and the
    # list received; a trailing partial descriptor is ignored (SBC-3 §5.28.2).
    usable = min(bd_length, length - UNMAP_HEADER, max(data_length - 6, 0))
    count = usable // UNMAP_DESCRIPTOR
    if count > lu.max_unmap_descriptors:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=2, in_cdb=False)
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        at = UNMAP_HEADER + i * UNMAP_DESCRIPTOR
        lba, blocks = struct.unpack_from(">QI", data, at)
        total += blocks
        if total > lu.max_unmap_blocks:
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=at + 8, in_cdb=False)
        check_range(lu, lba, blocks)
        if blocks:
            ranges.append((lba, blocks))
    bs = lu.block_size
    async with lu.write_gate.shared():
        for lba, blocks in ranges:
            try:
                await lu.backend.discard(lba * bs, blocks * bs)
            except OSError as e:
                raise medium_failure(e, Reason.WRITE_ERROR, lba) from None
    return None


MAPPED, DEALLOCATED = 0, 1
MAX_LBA_STATUS_DESCRIPTORS = 1024


async def get_lba_status(cmd: Command) -> Reply:
    """SBC-3 §5.6: provisioning status from the starting LBA on, one
    descriptor per run of mapped / deallocated blocks.  A block that is only
    partly allocated counts as mapped."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba = int.from_bytes(cdb[2:10], "big")
    alloc = int.from_bytes(cdb[10:14], "big")
    if lba >= lu.num_blocks:
        raise ScsiError(Reason.LBA_OUT_OF_RANGE)
    bs = lu.block_size
    end = lu.num_blocks
    try:
        extents = await lu.backend.allocation(lba * bs, (end - lba) * bs)
    except OSError as e:
        raise medium_failure(e, Reason.UNRECOVERED_READ_ERROR, lba) from None
    # Mapped block runs (rounded outwards), merged, clipped to [lba, end).
    mapped: list[list[int]] = []
    for offset, length, allocated in extents:
        if not allocated or length <= 0:
            continue
        s = max(offset // bs, lba)
        e = min(-(-(offset + length) // bs), end)
        if s >= e:
            continue
        if mapped and s <= mapped[-1][1]:
            mapped[-1][1] = max(mapped[-1][1], e)
        else:
            mapped.append([s, e])
    runs: list[tuple[int, int, int]] = []
    pos = lba
    for s, e in mapped:
        if s > pos:
            runs.append((pos, s - pos, DEALLOCATED))
        runs.append((max(s, pos), e - max(s, pos), MAPPED))
        pos = e
    if pos < end:
        runs.append((pos, end - pos, DEALLOCATED))
    limit = min(MAX_LBA_STATUS_DESCRIPTORS, max(1, (alloc - 8) // 16))
    out = bytearray(8)
    n = 0
    for start, count, status in runs:
        while count and n < limit:
            piece = min(count, 0xFFFFFFFF)
            out += struct.pack(">QIB3x", start, piece, status)
            start += piece
            count -= piece
            n += 1
        if n >= limit:
            break
    struct.pack_into(">I", out, 0, len(out) - 4)
    return Command.allocation(out, alloc)


# --- COMPARE AND WRITE (SBC-3 §5.2) -------------------------------------------------


async def compare_and_write(cmd: Command) -> Reply:
    """Compare the first half of Data-Out with the medium and, if equal,
    write the second half — atomically w.r.t. every other write on the LU
    (exclusive write gate).  On a miscompare nothing is written and
    INFORMATION holds the offset of the first differing byte."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba = int.from_bytes(cdb[2:10], "big")
    blocks = cdb[13]
    bs = lu.block_size
    cmd.data_out_wanted = 2 * blocks * bs
    check_writable(lu)
    if blocks > lu.max_compare_write_blocks:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=13, bit=7)
    check_range(lu, lba, blocks)
    data = cmd.data_out(2 * blocks * bs, exact=True)
    if blocks == 0:  # not an error (SBC-3 §5.2)
        return None
    expected, new = data[: blocks * bs], data[blocks * bs :]
    fua = bool(cdb[1] & FUA)
    async with lu.write_gate.exclusive():
        current = await read_medium(lu, lba, blocks)
        off = first_mismatch(current, expected)
        if off is not None:
            raise ScsiError(Reason.MISCOMPARE_DURING_VERIFY, information=off)
        await write_medium(lu, lba, new, fua)
    return None
