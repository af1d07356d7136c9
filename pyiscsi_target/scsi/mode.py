"""Mode pages and MODE SENSE / MODE SELECT (SPC-4 §6.11-6.14, §7.5).

Pages supported: Caching (08h, SBC-3 §6.4.5), Control (0Ah, SPC-4 §7.5.8)
and Informational Exceptions Control (1Ch, SPC-4 §7.5.12).  Each page is one
row: its length and builders for the current, changeable and default values.
Saved values are not implemented (PC=11b -> SAVING PARAMETERS NOT SUPPORTED,
SPC-4 §6.11.1).  MODE SELECT accepts a page only if every bit it changes is
set in the changeable mask (SPC-4 §6.9).
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .context import Command, Reply
from .lun import LogicalUnit
from .sense import Reason, ScsiError

__all__ = ["MODE_PAGES", "ModePage", "mode_sense6", "mode_sense10", "mode_select6", "mode_select10"]

WP = 0x80  # device-specific parameter: write protected (SBC-3 §6.4.1)
DPOFUA = 0x10  # device-specific parameter: DPO and FUA supported
SWP = 0x08  # Control mode page byte 4: software write protect (SPC-4 §7.5.8)


def _caching_current(lu: LogicalUnit) -> bytearray:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    if lu.backend.write_cache:
        page[2] |= 0x04  # WCE; RCD=0 (read cache enabled)
    return page


def _caching_changeable(lu: LogicalUnit) -> bytearray:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    if lu.write_cache_switchable:
        page[2] = 0x04
    return page


async def _caching_apply(lu: LogicalUnit, page: memoryview) -> bool:
    wce = bool(page[2] & 0x04)
    backend = lu.backend
    if wce == bool(backend.write_cache):
        return False
    if not wce:
        await backend.flush()  # data acknowledged while WCE=1 becomes durable first
    outcome = backend.set_write_cache(wce)  # type: ignore[attr-defined]
    if inspect.isawaitable(outcome):
        await outcome
    return True


def _control_current(lu: LogicalUnit) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 0x0A
    # TST=000b (one task set), D_SENSE=0 (fixed format sense), GLTSD=0.
    # QUEUE ALGORITHM MODIFIER=1: SIMPLE commands may be reordered; QERR=00b
    # (Windows rewrites QERR to 0 otherwise, §5.5).  TAS=0: commands aborted
    # for another nexus are reported with UNIT ATTENTION 2F/00.
    page[3] = 0x10
    if lu.software_write_protect:
        page[4] |= SWP
    return page


def _control_changeable(lu: LogicalUnit) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 0x0A
    page[4] = SWP  # software write protect, for every nexus (one Control page per LU)
    return page


async def _control_apply(lu: LogicalUnit, page: memoryview) -> bool:
    swp = bool(page[4] & SWP)
    if swp == lu.software_write_protect:
        return False
    if swp:
        await lu.backend.flush()  # SPC-4 §7.5.8: cached write data is written first
    lu.software_write_protect = swp
    return True


def _iec_current(lu: LogicalUnit) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x1C, 0x0A
    page[2] = 0x08  # DEXCPT=1: no informational exception reporting; MRIE=0
    return page


def _iec_changeable(lu: LogicalUnit) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x1C, 0x0A
    return page


@dataclass(frozen=True, slots=True)
class ModePage:
    code: int
    length: int  # PAGE LENGTH: bytes after byte 1
    current: Callable[[LogicalUnit], bytearray]
    changeable: Callable[[LogicalUnit], bytearray]
    # Apply a validated page; returns True if anything changed.
    apply: Callable[[LogicalUnit, memoryview], Awaitable[bool]] | None = None
    # Bits of the current page that MODE SELECT set and the default lacks.
    not_default: bytes = b""

    def default(self, lu: LogicalUnit) -> bytearray:
        page = self.current(lu)
        for i, bits in enumerate(self.not_default):
            page[i] &= ~bits & 0xFF
        return page


MODE_PAGES: dict[int, ModePage] = {
    p.code: p
    for p in (
        ModePage(0x08, 0x12, _caching_current, _caching_changeable, _caching_apply),
        ModePage(0x0A, 0x0A, _control_current, _control_changeable, _control_apply, bytes((0, 0, 0, 0, SWP))),
        ModePage(0x1C, 0x0A, _iec_current, _iec_changeable),
    )
}

ALL_PAGES = 0x3F
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = range(4)


def _page_bytes(lu: LogicalUnit, page: ModePage, pc: int) -> bytearray:
    if pc == PC_CHANGEABLE:
        return page.changeable(lu)
    if pc == PC_DEFAULT:
        return page.default(lu)
    return page.current(lu)


def _block_descriptor(lu: LogicalUnit, long_lba: bool) -> bytes:
    """Mode parameter block descriptor (SBC-3 §6.4.2 short, §6.4.2.3 long)."""
    if long_lba:
        return struct.pack(">QII", lu.num_blocks, 0, lu.block_size)
    blocks = min(lu.num_blocks, 0xFFFFFFFF)
    return struct.pack(">II", blocks, lu.block_size & 0xFFFFFF)


def _mode_sense(cmd: Command, ten: bool) -> Reply:
    cdb = cmd.cdb
    lu = cmd.unit
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    code = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    if pc == PC_SAVED:
        raise ScsiError(Reason.SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit=7)
    if code == ALL_PAGES:
        if subpage not in (0x00, 0xFF):
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=3, bit=7)
        pages = [MODE_PAGES[c] for c in sorted(MODE_PAGES)]
    else:
        page = MODE_PAGES.get(code)
        if page is None:
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=5)
        if subpage not in (0x00, 0xFF):  # no subpages implemented
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=3, bit=7)
        pages = [page]
    body = bytearray()
    for page in pages:
        body += _page_bytes(lu, page, pc)
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    dev_specific = (WP if lu.read_only or lu.software_write_protect else 0) | DPOFUA
    if ten:
        header = bytearray(8)
        struct.pack_into(">H", header, 0, 6 + len(bd) + len(body))  # MODE DATA LENGTH excludes itself
        header[3] = dev_specific
        header[4] = 0x01 if (llbaa and bd) else 0  # LONGLBA
        struct.pack_into(">H", header, 6, len(bd))
    else:
        header = bytearray(4)
        header[0] = min(3 + len(bd) + len(body), 0xFF)
        header[2] = dev_specific
        header[3] = len(bd)
    return Command.allocation(bytes(header) + bd + body, alloc)


async def mode_sense6(cmd: Command) -> Reply:
    return _mode_sense(cmd, ten=False)


async def mode_sense10(cmd: Command) -> Reply:
    return _mode_sense(cmd, ten=True)


def _list_error(offset: int, bit: int | None = None) -> ScsiError:
    return ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=offset, bit=bit, in_cdb=False)


def _high_bit(value: int) -> int:
    return value.bit_length() - 1


async def _mode_select(cmd: Command, ten: bool) -> Reply:
    cdb = cmd.cdb
    lu = cmd.unit
    length = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    if cdb[1] & 0x01:  # SP=1: saved pages are not implemented (SPC-4 §6.9)
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=0)
    if length == 0:
        return None
    if not cdb[1] & 0x10:  # PF=0: vendor-specific (SCSI-1) page format unsupported
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field_pointer=1, bit=4)
    data = cmd.data_out(length)
    header_len = 8 if ten else 4
    if length < header_len:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if ten:
        long_lba = bool(data[4] & 0x01)
        bd_len = int.from_bytes(data[6:8], "big")
        bd_len_at = 6
    else:
        long_lba = False
        bd_len = data[3]
        bd_len_at = 3
    if bd_len not in (0, 16 if long_lba else 8):
        raise _list_error(bd_len_at)
    if header_len + bd_len > length:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if bd_len:
        # Only the current geometry may be "selected" (a change would be a
        # FORMAT UNIT, SBC-3 §6.4.2): NUMBER OF BLOCKS 0 or current, same length.
        bd = data[header_len : header_len + bd_len]
        if long_lba:
            blocks, _, blen = struct.unpack(">QII", bd)
            blen_at = header_len + 12
        else:
            blocks, blen = struct.unpack(">II", bd)
            blen &= 0xFFFFFF
            blen_at = header_len + 5
        if blen != lu.block_size:
            raise _list_error(blen_at)
        if blocks not in (0, lu.num_blocks, min(lu.num_blocks, 0xFFFFFFFF)):
            raise _list_error(header_len)
    # Validate every page before applying any (no partial MODE SELECT).
    accepted: list[tuple[ModePage, memoryview]] = []
    pos = header_len + bd_len
    while pos < length:
        if pos + 2 > length:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        if data[pos] & 0x40:  # SPF: no subpages implemented
            raise _list_error(pos, 6)
        page = MODE_PAGES.get(data[pos] & 0x3F)
        if page is None:
            raise _list_error(pos, 5)
        if data[pos + 1] != page.length:
            raise _list_error(pos + 1)
        end = pos + 2 + page.length
        if end > length:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        new = data[pos:end]
        current = page.current(lu)
        mask = page.changeable(lu)
        for i in range(2, len(new)):  # byte 0 PS bit is reserved in MODE SELECT
            bad = (new[i] ^ current[i]) & ~mask[i] & 0xFF
            if bad:
                raise _list_error(pos + i, _high_bit(bad))
        accepted.append((page, new))
        pos = end
    changed = False
    for page, new in accepted:
        if page.apply is not None:
            changed |= await page.apply(lu, new)
    if changed:
        # SPC-4 §7.5.1: other I_T nexuses learn of it by MODE PARAMETERS CHANGED.
        lu.unit_attentions.establish_all(Reason.MODE_PARAMETERS_CHANGED, except_nexus=cmd.nexus)
    return None


async def mode_select6(cmd: Command) -> Reply:
    return await _mode_select(cmd, ten=False)


async def mode_select10(cmd: Command) -> Reply:
    return await _mode_select(cmd, ten=True)
