"""Pre-dispatch checks: LUN, unit attention, opcode, CDB bits, SCSI-2 reservation."""

from pyiscsi_target.scsi.command import Status
from pyiscsi_target.scsi.sense import Reason
from pyiscsi_target.scsi.target import ScsiTargetDevice

from .conftest import NEXUS_A, NEXUS_B, Harness, assert_check, assert_good, cdb10, cdb16, inquiry, make_lu, sa_in16, tur


async def test_unknown_opcode(h):
    assert_check(await h.run(bytes([0xC7]) + bytes(15)), Reason.INVALID_COMMAND_OPERATION_CODE, fp=0)


async def test_unknown_service_action(h):
    assert_check(await h.run(sa_in16(0x05)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=4)


async def test_missing_lun(h):
    assert_check(await h.run(tur(), lun=7), Reason.LOGICAL_UNIT_NOT_SUPPORTED)
    assert_check(await h.run(bytes([0xC7]) + bytes(15), lun=7), Reason.LOGICAL_UNIT_NOT_SUPPORTED)


async def test_missing_lun_inquiry_pq3(h):
    r = await h.run(inquiry(), lun=7)
    assert_good(r)
    assert r.data_in[0] == 0x7F


async def test_missing_lun_report_luns_and_request_sense(h):
    r = await h.run(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]), lun=7)
    assert_good(r)
    assert bytes(r.data_in[:4]) == (8).to_bytes(4, "big")
    r = await h.run(bytes([0x03, 0, 0, 0, 18, 0]), lun=7)
    assert_good(r)
    assert (r.data_in[2], r.data_in[12], r.data_in[13]) == (5, 0x25, 0)


async def test_power_on_ua_first_then_good(device):
    h = Harness(device)
    # INQUIRY and REPORT LUNS do not consume the UA (SAM-5 §5.14).
    assert_good(await h.run(inquiry()))
    assert_good(await h.run(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0])))
    assert_check(await h.run(tur()), Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
    assert_good(await h.run(tur()))
    # The other nexus still has its own.
    assert_check(await h.run(tur(), nexus=NEXUS_B), Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET)


async def test_ua_reported_for_unknown_opcode(device):
    h = Harness(device)
    assert_check(await h.run(bytes([0xC7]) + bytes(15)), Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
    assert_check(await h.run(bytes([0xC7]) + bytes(15)), Reason.INVALID_COMMAND_OPERATION_CODE)


async def test_request_sense_returns_and_clears_ua(device):
    h = Harness(device)
    r = await h.run(bytes([0x03, 0, 0, 0, 252, 0]))
    assert_good(r)
    assert (r.data_in[2], r.data_in[12], r.data_in[13]) == (6, 0x29, 0)
    assert_good(await h.run(tur()))
    r = await h.run(bytes([0x03, 0, 0, 0, 252, 0]))
    assert (r.data_in[2], r.data_in[12], r.data_in[13]) == (0, 0, 0)


async def test_ua_queue_order_and_reset_supersedes(h, lu):
    ua = lu.unit_attentions
    ua.establish(NEXUS_A, Reason.MODE_PARAMETERS_CHANGED)
    ua.establish(NEXUS_A, Reason.CAPACITY_DATA_HAS_CHANGED)
    ua.establish(NEXUS_A, Reason.MODE_PARAMETERS_CHANGED)  # duplicate: queued once
    assert_check(await h.run(tur()), Reason.MODE_PARAMETERS_CHANGED)
    assert_check(await h.run(tur()), Reason.CAPACITY_DATA_HAS_CHANGED)
    assert_good(await h.run(tur()))
    ua.establish(NEXUS_A, Reason.CAPACITY_DATA_HAS_CHANGED)
    ua.establish(NEXUS_A, Reason.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert_check(await h.run(tur()), Reason.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert_good(await h.run(tur()))


async def test_remove_nexus_forgets_ua(device, lu):
    device.remove_nexus(NEXUS_B)
    assert not lu.unit_attentions.pending(NEXUS_B)


async def test_reserved_bit_in_cdb(h):
    # READ(10) with RDPROTECT=1 and no protection information (libiscsi Read10.ReadProtect)
    assert_check(await h.run(cdb10(0x28, 0, 1, flags=0x20)), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=5, cd=True)
    # Reserved byte 12 in REPORT LUNS... control byte NACA in TEST UNIT READY
    assert_check(await h.run(bytes([0, 0, 0, 0, 0, 0x04])), Reason.INVALID_FIELD_IN_CDB, fp=5, bit=2)


async def test_unmap_not_supported_on_full_lu():
    dev = ScsiTargetDevice("t", {0: make_lu(thin=False)})
    dev.add_nexus(NEXUS_A)
    h = Harness(dev)
    await h.drain_ua()
    r = await h.run(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24))
    assert_check(r, Reason.INVALID_COMMAND_OPERATION_CODE)
    assert_check(await h.run(sa_in16(0x12, 0, 24)), Reason.INVALID_FIELD_IN_CDB, fp=1)


async def test_internal_error_is_hardware_error(h, lu):
    async def boom(offset, length):
        raise RuntimeError("bug")

    def boom_now(offset, length):
        raise RuntimeError("bug")

    # Both ways a READ reaches the backend: without waiting (the quick lane
    # and the handler ask read_now first) and awaiting read.
    lu.read_now = boom_now
    assert_check(await h.run(cdb10(0x28, 0, 1)), Reason.INTERNAL_TARGET_FAILURE)
    lu.read_now = None
    lu.backend.read = boom
    assert_check(await h.run(cdb10(0x28, 0, 1)), Reason.INTERNAL_TARGET_FAILURE)


async def test_overlapped_tag(h, lu):
    import asyncio

    gate = asyncio.Event()
    orig = lu.backend.read

    async def slow(offset, length):
        await gate.wait()
        return await orig(offset, length)

    lu.backend.read = slow
    lu.read_now = None          # a backend whose reads always wait (as RBD's)
    t1 = asyncio.create_task(h.run(cdb10(0x28, 0, 1), tag=99))
    await asyncio.sleep(0)
    assert_check(await h.run(tur(), tag=99), Reason.OVERLAPPED_COMMANDS_ATTEMPTED)
    gate.set()
    assert_good(await t1)


async def test_scsi2_reservation_conflicts(h, device):
    assert_good(await h.run(bytes([0x16, 0, 0, 0, 0, 0])))  # RESERVE(6) by A
    assert_good(await h.run(bytes([0x16, 0, 0, 0, 0, 0])))  # again by the holder
    assert (await h.run(bytes([0x16, 0, 0, 0, 0, 0]), nexus=NEXUS_B)).status == Status.RESERVATION_CONFLICT
    assert_good(await h.run(bytes([0x17, 0, 0, 0, 0, 0]), nexus=NEXUS_B))  # RELEASE from B: no-op
    ms = bytes([0x1A, 0, 0x3F, 0, 255, 0])
    assert_good(await h.run(ms))
    assert (await h.run(ms, nexus=NEXUS_B)).status == Status.RESERVATION_CONFLICT
    assert (await h.run(cdb10(0x28, 0, 1), nexus=NEXUS_B)).status == Status.RESERVATION_CONFLICT
    for allowed in (inquiry(), bytes([0x03, 0, 0, 0, 18, 0]), bytes([0x25]) + bytes(9), sa_in16(0x10)):
        assert_good(await h.run(allowed, nexus=NEXUS_B))
    assert_good(await h.run(bytes([0x17, 0, 0, 0, 0, 0])))  # RELEASE by A
    assert_good(await h.run(bytes([0x56]) + bytes(9), nexus=NEXUS_B))  # RESERVE(10) by B
    assert (await h.run(tur())).status == Status.RESERVATION_CONFLICT
    assert_good(await h.run(bytes([0x57]) + bytes(9), nexus=NEXUS_B))
    assert_good(await h.run(tur()))


async def test_reservation_released_by_lun_reset_and_nexus_loss(h, device, lu):
    assert_good(await h.run(bytes([0x16, 0, 0, 0, 0, 0])))
    await device.lun_reset(NEXUS_B, 0)
    assert lu.reserved_by is None
    assert_check(await h.run(tur()), Reason.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert_good(await h.run(bytes([0x16, 0, 0, 0, 0, 0])))
    device.remove_nexus(NEXUS_A)
    assert lu.reserved_by is None


async def test_reserve_third_party_rejected(h):
    assert_check(await h.run(bytes([0x16, 0x10, 0, 0, 0, 0])), Reason.INVALID_FIELD_IN_CDB, fp=1, bit=4)


async def test_short_cdb(h):
    t = h.task(b"")
    t.cdb = b""
    assert_check(await h.device.execute(t), Reason.INVALID_COMMAND_OPERATION_CODE)
    t = h.task(cdb16(0x88, 0, 1))
    t.cdb = t.cdb[:10]
    assert_check(await h.device.execute(t), Reason.INVALID_FIELD_IN_CDB, fp=10)
