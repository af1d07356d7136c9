"""SPC-4 commands: INQUIRY/VPD, REPORT LUNS, MODE SENSE/SELECT, RSOC, misc."""

import struct


from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice

from .conftest import (BLOCKS, BS, NEXUS_A, NEXUS_B, TARGET_PORT, Harness, assert_check, assert_good, cdb10, cdb16, inquiry,
                       make_lu)


async def _h(**lu_kw) -> Harness:
    dev = ScsiTargetDevice("t", {0: make_lu(**lu_kw)})
    dev.add_nexus(NEXUS_A)
    dev.add_nexus(NEXUS_B)
    h = Harness(dev)
    await h.drain_ua()
    await h.drain_ua(NEXUS_B)
    return h


# --- INQUIRY ----------------------------------------------------------------------


async def test_standard_inquiry(h):
    r = await h.run(inquiry(alloc=255))
    assert_good(r)
    d = bytes(r.data_in)
    assert len(d) == 96 and d[4] == 91
    assert d[0] == 0x00 and d[1] == 0x00  # PDT 0, RMB 0
    assert d[2] == 0x06  # SPC-4
    assert d[3] == 0x12  # HISUP, RDF 2
    assert d[5] == 0x10  # TPGS 01b: implicit ALUA
    assert d[7] == 0x02  # CMDQUE
    assert d[8:16] == b"PYISCSI " and d[16:32] == b"VIRTUAL-DISK    " and d[32:36] == b"0001"
    descs = struct.unpack(">8H", d[58:74])
    assert descs[:4] == (0x00A0, 0x0960, 0x0460, 0x04C0)


async def test_inquiry_allocation_truncates(h):
    r = await h.run(inquiry(alloc=5))
    assert len(r.data_in) == 5 and r.data_in[4] == 91


async def test_inquiry_page_without_evpd_rejected(h):
    assert_check(await h.run(inquiry(evpd=0, page=0x80)), Reason.INVALID_FIELD_IN_CDB, fp=2)


async def test_inquiry_unknown_vpd_page(h):
    assert_check(await h.run(inquiry(evpd=1, page=0x8F)), Reason.INVALID_FIELD_IN_CDB, fp=2)


async def test_vpd_supported_pages_ascending(h):
    d = bytes((await h.run(inquiry(1, 0x00))).data_in)
    pages = list(d[4 : 4 + d[3]])
    assert pages == sorted(pages) and pages[0] == 0
    assert pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]  # no 0x8F: Windows would try ODX


async def test_vpd_serial(h, lu):
    d = bytes((await h.run(inquiry(1, 0x80))).data_in)
    assert d[1] == 0x80 and d[4 : 4 + d[3]] == lu.identity.serial.encode()


def _designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 4
    while pos < 4 + int.from_bytes(page[2:4], "big"):
        n = page[pos + 3]
        out.append((page[pos] & 0x0F, (page[pos + 1] >> 4) & 3, page[pos + 1] & 0x0F, page[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


async def test_vpd_device_identification(h, lu):
    d = bytes((await h.run(inquiry(1, 0x83))).data_in)
    ds = _designators(d)
    assert (1, 0, 3, lu.identity.naa) in ds  # NAA, LU association, binary
    t10 = [v for cs, a, t, v in ds if t == 1]
    assert t10 == [b"PYISCSI " + lu.identity.serial.encode()]
    name = [v for cs, a, t, v in ds if t == 8]
    assert len(name) == 1 and len(name[0]) % 4 == 0
    assert name[0].rstrip(b"\0") == TARGET_PORT.encode()
    rel = [(a, v) for cs, a, t, v in ds if t == 4]
    assert rel == [(1, b"\0\0\0\x01")]


async def test_vpd_block_limits_thin(h, lu):
    d = bytes((await h.run(inquiry(1, 0xB0))).data_in)
    assert d[3] == 0x3C and len(d) == 64
    assert d[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    max_xfer, opt_xfer = struct.unpack_from(">II", d, 8)
    assert max_xfer == lu.max_transfer_blocks and opt_xfer <= max_xfer
    max_unmap, max_desc, gran = struct.unpack_from(">III", d, 20)
    assert 0 < max_unmap <= 1 << 20 and 0 < max_desc and gran >= 1
    assert struct.unpack_from(">Q", d, 36)[0] == lu.max_write_same_blocks


async def test_vpd_block_limits_and_lbp_full():
    h = await _h(thin=False)
    d = bytes((await h.run(inquiry(1, 0xB0))).data_in)
    assert struct.unpack_from(">II", d, 20) == (0, 0)
    d = bytes((await h.run(inquiry(1, 0xB2))).data_in)
    assert d[5] == 0 and d[6] & 7 == 0


async def test_vpd_lbp_thin(h):
    d = bytes((await h.run(inquiry(1, 0xB2))).data_in)
    assert d[5] & 0xE0 == 0xE0  # LBPU LBPWS LBPWS10
    assert d[5] & 0x04  # LBPRZ
    assert d[6] & 7 == 2  # thin


async def test_vpd_rotation_rate():
    h = await _h(rotation_rate=1)
    d = bytes((await h.run(inquiry(1, 0xB1))).data_in)
    assert d[3] == 0x3C and d[4:6] == b"\x00\x01"


# --- REPORT LUNS ------------------------------------------------------------------


def report_luns(select=0, alloc=4096):
    return struct.pack(">BBBxxxIxx", 0xA0, 0, select, alloc)


async def test_report_luns():
    dev = ScsiTargetDevice("t", {0: make_lu(0), 5: make_lu(5), 300: make_lu(300)})
    dev.add_nexus(NEXUS_A)
    h = Harness(dev)
    for select in (0, 2):
        d = bytes((await h.run(report_luns(select))).data_in)
        assert int.from_bytes(d[:4], "big") == 24
        assert d[8:16] == bytes(8) and d[16:24] == b"\x00\x05" + bytes(6) and d[24:32] == b"\x41\x2c" + bytes(6)
    d = bytes((await h.run(report_luns(1))).data_in)
    assert d == bytes(8)


async def test_report_luns_errors(h):
    assert_check(await h.run(report_luns(alloc=15)), Reason.INVALID_FIELD_IN_CDB, fp=6)
    assert_check(await h.run(report_luns(select=3)), Reason.INVALID_FIELD_IN_CDB, fp=2)
    r = await h.run(report_luns(alloc=16))
    assert_good(r)
    assert len(r.data_in) == 16


# --- MODE SENSE / MODE SELECT --------------------------------------------------------


def ms6(page, pc=0, dbd=False, alloc=255, sub=0):
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0])


def ms10(page, pc=0, dbd=False, llbaa=False, alloc=1024):
    return struct.pack(">BBBBxxxHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0, alloc, 0)


def _pages(body: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(body):
        out[body[pos] & 0x3F] = body[pos : pos + 2 + body[pos + 1]]
        pos += 2 + body[pos + 1]
    return out


async def test_mode_sense6_all_pages(h, lu):
    d = bytes((await h.run(ms6(0x3F))).data_in)
    assert d[0] == len(d) - 1
    assert d[2] == 0x10  # DPOFUA, not WP
    assert d[3] == 8 and struct.unpack_from(">II", d, 4) == (BLOCKS, BS)
    pages = _pages(d[12:])
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04 == 0  # WCE reflects backend.write_cache (False)
    assert pages[0x0A][3] & 0x06 == 0  # QERR 0
    assert pages[0x0A][2] & 0x04 == 0  # D_SENSE 0


async def test_mode_sense_write_protect_and_wce():
    h = await _h(read_only=True)
    h.device.luns[0].backend.write_cache = True
    d = bytes((await h.run(ms6(0x08, dbd=True))).data_in)
    assert d[2] == 0x90 and d[3] == 0
    assert d[4] == 0x08 and d[6] & 0x04


async def test_mode_sense10_long_lba(h):
    d = bytes((await h.run(ms10(0x0A, llbaa=True))).data_in)
    assert int.from_bytes(d[:2], "big") == len(d) - 2
    assert d[4] & 1 and int.from_bytes(d[6:8], "big") == 16
    assert struct.unpack_from(">QxxxxI", d, 8) == (BLOCKS, BS)
    assert d[24] == 0x0A


async def test_mode_sense_changeable(h):
    d = bytes((await h.run(ms6(0x08, pc=1, dbd=True))).data_in)
    assert d[4 + 2] == 0x04  # MemoryBackend has set_write_cache: WCE changeable


async def test_mode_sense_changeable_without_switch():
    from pyiscsi_target.storage.memory import MemoryBackend

    backend = MemoryBackend(BLOCKS * BS)
    backend.set_write_cache = None  # a backend that cannot switch
    h = await _h(backend=backend)
    d = bytes((await h.run(ms6(0x08, pc=1, dbd=True))).data_in)
    assert d[6] == 0


async def test_mode_sense_errors(h):
    assert_check(await h.run(ms6(0x08, pc=3)), Reason.SAVING_PARAMETERS_NOT_SUPPORTED)
    assert_check(await h.run(ms6(0x19)), Reason.INVALID_FIELD_IN_CDB, fp=2, bit=5)
    assert_check(await h.run(ms6(0x3F, sub=1)), Reason.INVALID_FIELD_IN_CDB, fp=3)


async def test_mode_sense_truncation(h):
    r = await h.run(ms6(0x3F, alloc=4))
    assert len(r.data_in) == 4 and r.data_in[0] > 3


def mode_select6(params: bytes, pf=True, sp=False):
    return bytes([0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, len(params), 0])


async def _caching_page(h) -> bytearray:
    d = bytes((await h.run(ms6(0x08, dbd=True))).data_in)
    return bytearray(d[4:])


async def test_mode_select_toggles_wce(h, lu):
    page = await _caching_page(h)
    page[2] |= 0x04
    r = await h.run(mode_select6(bytes(4) + page), bytes(4) + page)
    assert_good(r)
    assert lu.backend.write_cache is True
    assert (await _caching_page(h))[2] & 0x04
    # The other nexus learns of it (SPC-4 §7.5.1).
    assert_check(await h.run(bytes(6), nexus=NEXUS_B), Reason.MODE_PARAMETERS_CHANGED)
    page[2] &= ~0x04
    assert_good(await h.run(mode_select6(bytes(4) + page), bytes(4) + page))
    assert lu.backend.write_cache is False and lu.backend.flush_calls  # flushed before disabling


async def test_mode_select_rejects_unchangeable_bit(h):
    page = await _caching_page(h)
    page[2] |= 0x01  # RCD is not changeable
    params = bytes(4) + page
    assert_check(await h.run(mode_select6(params), params), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=6, bit=0, cd=False)


async def test_mode_select_errors(h, lu):
    page = bytes(await _caching_page(h))
    params = bytes(4) + page
    assert_check(await h.run(mode_select6(params, sp=True), params), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=0)
    assert_check(await h.run(mode_select6(params, pf=False), params), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=4)
    short = params[:10]
    assert_check(await h.run(mode_select6(short), short), Reason.PARAMETER_LIST_LENGTH_ERROR)
    bad = bytes(4) + b"\x19\x06" + bytes(6)
    assert_check(await h.run(mode_select6(bad), bad), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=4, cd=False)
    badlen = bytes(4) + b"\x08\x10" + page[2:]
    assert_check(await h.run(mode_select6(badlen), badlen), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=5)
    # block descriptor with another block length
    bd = bytes([0, 0, 0, 8]) + struct.pack(">II", 0, 4096) + page
    assert_check(await h.run(mode_select6(bd), bd), Reason.INVALID_FIELD_IN_PARAMETER_LIST, fp=9)
    # with the right one it is accepted
    bd = bytes([0, 0, 0, 8]) + struct.pack(">II", 0, BS) + page
    assert_good(await h.run(mode_select6(bd), bd))
    assert_good(await h.run(mode_select6(b""), b""))


async def test_mode_select_swp_write_protects_the_lu_for_every_nexus(h, lu):
    """Control mode page SWP (SPC-4 §7.5.8; libiscsi ModeSense6.Control-SWP,
    Sanitize.Readonly): changeable; once set, writes from any nexus get DATA
    PROTECT / WRITE PROTECTED, reads work, MODE SENSE shows WP and SWP."""
    d = bytes((await h.run(ms6(0x0A, pc=1, dbd=True))).data_in)
    assert d[4 + 4] == 0x08  # SWP changeable
    page = bytearray(bytes((await h.run(ms6(0x0A, dbd=True))).data_in)[4:])
    assert page[4] & 0x08 == 0
    page[4] |= 0x08
    assert_good(await h.run(mode_select6(bytes(4) + page), bytes(4) + page))
    assert lu.backend.flush_calls  # cached writes reach the medium before protection
    assert_check(await h.run(bytes(6), nexus=NEXUS_B), Reason.MODE_PARAMETERS_CHANGED)
    for nexus in (NEXUS_A, NEXUS_B):
        assert_check(await h.run(cdb10(0x2A, 0, 1), bytes(BS), nexus=nexus), Reason.WRITE_PROTECTED)
        assert_check(await h.run(cdb16(0x8B, 0, 1), bytes(BS), nexus=nexus), Reason.WRITE_PROTECTED)
        assert_good(await h.run(cdb10(0x28, 0, 1), nexus=nexus))
    d = bytes((await h.run(ms6(0x0A, dbd=True))).data_in)
    assert d[2] & 0x80 and d[4 + 4] & 0x08  # WP in the header, SWP in the page
    d = bytes((await h.run(ms6(0x0A, pc=2, dbd=True))).data_in)
    assert d[4 + 4] & 0x08 == 0  # the default is SWP=0
    page[4] &= ~0x08
    assert_good(await h.run(mode_select6(bytes(4) + page), bytes(4) + page))
    assert_good(await h.run(cdb10(0x2A, 0, 1), bytes(BS)))


async def test_mode_select_short_data_out(h):
    page = bytes(await _caching_page(h))
    params = bytes(4) + page
    r = await h.run(mode_select6(params), params[:8])
    assert_check(r, Reason.INVALID_FIELD_IN_COMMAND_IU)
    assert r.data_out_wanted == len(params)


# --- REPORT SUPPORTED OPERATION CODES -----------------------------------------------


def rsoc(options=0, op=0, sa=0, rctd=False, alloc=65535):
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, op, sa, alloc, 0, 0)


async def test_rsoc_all(h):
    d = bytes((await h.run(rsoc())).data_in)
    n = int.from_bytes(d[:4], "big")
    assert n == len(d) - 4 and n % 8 == 0
    descs = [d[4 + i : 12 + i] for i in range(0, n, 8)]
    ops = {(x[0], int.from_bytes(x[2:4], "big"), x[5] & 1) for x in descs}
    assert (0x28, 0, 0) in ops and (0x9E, 0x10, 1) in ops and (0xA3, 0x0C, 1) in ops and (0x42, 0, 0) in ops
    for x in descs:
        assert x[5] & 1 or int.from_bytes(x[2:4], "big") == 0  # SERVACTV clear => SA 0
        assert int.from_bytes(x[6:8], "big") in (6, 10, 12, 16)


async def test_rsoc_all_rctd(h):
    d = bytes((await h.run(rsoc(rctd=True))).data_in)
    first = d[4:24]
    assert first[5] & 0x02 and int.from_bytes(first[8:10], "big") == 0x0A


async def test_rsoc_hides_unsupported_on_full_lu():
    h = await _h(thin=False)
    d = bytes((await h.run(rsoc())).data_in)
    ops = {d[4 + i] for i in range(0, int.from_bytes(d[:4], "big"), 8)}
    assert 0x42 not in ops


async def test_rsoc_one_command(h):
    d = bytes((await h.run(rsoc(1, 0x2A))).data_in)
    assert d[1] & 7 == 3 and int.from_bytes(d[2:4], "big") == 10
    assert d[4] == 0x2A and d[5] == 0x18  # usage: DPO FUA, no WRPROTECT
    d = bytes((await h.run(rsoc(2, 0x9E, 0x10, rctd=True))).data_in)
    assert d[1] & 0x80 and d[1] & 7 == 3 and d[4:6] == b"\x9e\x1f" and len(d) == 4 + 16 + 12
    d = bytes((await h.run(rsoc(1, 0xC7))).data_in)
    assert d[1] & 7 == 1


async def test_rsoc_errors(h):
    assert_check(await h.run(rsoc(1, 0x9E)), Reason.INVALID_FIELD_IN_CDB, fp=2)
    assert_check(await h.run(rsoc(2, 0x28)), Reason.INVALID_FIELD_IN_CDB, fp=2)
    assert_check(await h.run(rsoc(5)), Reason.INVALID_FIELD_IN_CDB, fp=2)


# --- misc ---------------------------------------------------------------------------


async def test_start_stop_unit(h):
    for byte4 in (0x01, 0x00, 0x11, 0x03):
        assert_good(await h.run(bytes([0x1B, 1, 0, 0, byte4, 0])))
    assert_good(await h.run(bytes(6)))


async def test_prevent_allow(h):
    assert_good(await h.run(bytes([0x1E, 0, 0, 0, 0, 0])))
    for prevent in (1, 2, 3):
        assert_check(await h.run(bytes([0x1E, 0, 0, 0, prevent, 0])), Reason.INVALID_FIELD_IN_CDB, fp=4, bit=1)


async def test_request_sense_desc_rejected(h):
    assert_check(await h.run(bytes([0x03, 1, 0, 0, 252, 0])), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=0)
