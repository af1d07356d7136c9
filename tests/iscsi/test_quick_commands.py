"""The fabric's quick lane for SCSI Commands (PduReader.next_command +
IscsiConnection._scsi_command_quick) decides every command exactly as the
general path (next_pdu, _ffp_pdu, CmdWindow.accept, _on_scsi_command).

Each case sends the same bytes to two logged-in connections, one with the
quick lane and one without (``quick_commands = False``), and compares what
comes out: the PDUs on the wire (Rejects, R2Ts), the Execute actions with
their SCSI tasks, the CmdSN window and the commands in flight.  A check that
the lane was really taken (or really left) keeps the comparison honest.
"""

from __future__ import annotations

import pytest

from pyiscsi_target.iscsi.connection import Execute, IscsiConnection
from pyiscsi_target.iscsi.framing import encode_pdu
from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, F_WRITE, DataOut, NopOut, ScsiCommand
from tests.iscsi.test_connection import logged_in

READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]).ljust(16, b"\0")
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]).ljust(16, b"\0")
TUR = bytes(16)


def cmd(itt: int, cmdsn: int, flags: int = F_FINAL | F_READ | 1, *, expected: int = 4096, cdb: bytes = READ10,
        immediate: bool = False, lun: int = 0, data: bytes = b"") -> bytes:
    hdr = ScsiCommand(opbyte=0x41 if immediate else 0x01, flags=flags, itt=itt, expected_length=expected,
                      cmdsn=cmdsn, cdb=cdb, lun=lun)
    return b"".join(bytes(b) for b in encode_pdu(hdr.encode(len(data)), data))


def data_out(itt: int, ttt: int, offset: int, data: bytes) -> bytes:
    hdr = DataOut(flags=F_FINAL, itt=itt, ttt=ttt, datasn=0, buffer_offset=offset)
    return b"".join(bytes(b) for b in encode_pdu(hdr.encode(len(data)), data))


W4K = bytes(range(256)) * 16

# Each case: a list of byte chunks, as they would arrive from the socket.
CASES = {
    "read": [cmd(1, 1)],
    "no-data command": [cmd(1, 1, F_FINAL | 1, expected=0, cdb=TUR)],
    "write, all immediate data": [cmd(1, 1, F_FINAL | F_WRITE | 1, cdb=WRITE10, data=W4K)],
    "several commands in one chunk": [cmd(1, 1) + cmd(2, 2, F_FINAL | F_WRITE | 1, cdb=WRITE10, data=W4K)
                                      + cmd(3, 3, F_FINAL | 1, expected=0, cdb=TUR)],
    "a command split over two chunks": [cmd(1, 1, F_FINAL | F_WRITE | 1, cdb=WRITE10, data=W4K)[:1000],
                                        cmd(1, 1, F_FINAL | F_WRITE | 1, cdb=WRITE10, data=W4K)[1000:]],
    "immediate command": [cmd(1, 1, immediate=True)],
    "CmdSN gap, then filled": [cmd(2, 2), cmd(1, 1)],
    "duplicate CmdSN": [cmd(1, 1), cmd(2, 1)],
    "CmdSN outside the window": [cmd(1, 1000)],
    "ITT in use": [cmd(1, 1), cmd(1, 2)],
    "ITT of a write waiting for Data-Out": [cmd(1, 1, F_FINAL | F_WRITE | 1, expected=8192, cdb=WRITE10, data=W4K),
                                             cmd(1, 2)],
    "immediate data without W bit": [cmd(1, 1, data=W4K)],
    "write, part of the data immediate (R2T follows)": [cmd(1, 1, F_FINAL | F_WRITE | 1, expected=8192,
                                                           cdb=WRITE10, data=W4K)],
    "write, no data (R2T)": [cmd(1, 1, F_FINAL | F_WRITE | 1, cdb=WRITE10)],
    "write, unsolicited Data-Out to follow (F=0)": [cmd(1, 1, F_WRITE | 1, expected=8192, cdb=WRITE10, data=W4K),
                                                    data_out(1, 0xFFFFFFFF, 4096, W4K)],
    "write, data beyond the expected length": [cmd(1, 1, F_FINAL | F_WRITE | 1, expected=2048, cdb=WRITE10,
                                                   data=W4K)],
    "write with expected length 0 and data": [cmd(1, 1, F_FINAL | F_WRITE | 1, expected=0, cdb=WRITE10,
                                                  data=W4K)],
    "bidirectional": [cmd(1, 1, F_FINAL | F_READ | F_WRITE | 1, cdb=WRITE10, data=W4K)],
    "ORDERED and HEAD OF QUEUE": [cmd(1, 1, F_FINAL | F_READ | 2), cmd(2, 2, F_FINAL | F_READ | 3)],
    "flat LUN addressing": [cmd(1, 1, lun=(0x4000 | 300) << 48)],
    "unsupported LUN addressing": [cmd(1, 1, lun=0xC000 << 48)],
    "between other PDUs": [b"".join(bytes(b) for b in encode_pdu(NopOut(itt=7, cmdsn=1).encode(0))) + cmd(1, 1)],
}

# The cases the lane takes by itself, start to end.
QUICK = {"read", "no-data command", "write, all immediate data", "several commands in one chunk",
         "a command split over two chunks", "ORDERED and HEAD OF QUEUE", "flat LUN addressing",
         "unsupported LUN addressing"}


SMALL_FIRST_BURST = [("MaxRecvDataSegmentLength", "8192"), ("MaxBurstLength", "16384"), ("FirstBurstLength", "2048"),
                     ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxOutstandingR2T", "2")]
NO_IMMEDIATE_DATA = [("MaxRecvDataSegmentLength", "8192"), ("ImmediateData", "No"), ("InitialR2T", "Yes")]


def run(chunks: list[bytes], quick: bool, ops=None):
    w = logged_in(ops)
    w.conn.quick_commands = quick
    w.conn._commands_ok = quick            # as the full feature phase sets it
    general = []
    real = IscsiConnection._ffp_pdu

    def spy(self, rec):
        general.append(rec.bhs.opcode)
        return real(self, rec)

    w.conn._ffp_pdu = spy.__get__(w.conn)
    wire = []
    for c in chunks:
        wire += [(type(p).__name__, p, bytes(d)) for p, d in w.send_raw(c)]
    tasks = [(a.itt, a.task.nexus, a.task.lun, bytes(a.task.cdb), a.task.tag, a.task.attribute,
              bytes(a.task.data_out), a.task.expected_length) for a in w.actions if isinstance(a, Execute)]
    win = w.conn.session.window
    state = (win.exp_cmdsn, win.max_cmdsn, win.outstanding, sorted(win._held), sorted(w.conn.running),
             sorted(w.conn.transfers))
    return wire, tasks, state, general


@pytest.mark.parametrize("ops", [SMALL_FIRST_BURST, NO_IMMEDIATE_DATA], ids=["FirstBurstLength 2048", "ImmediateData No"])
def test_immediate_data_limits_of_the_session(ops):
    """Immediate data beyond FirstBurstLength, or with ImmediateData=No: the
    general path rejects it, the lane does not take it."""
    chunks = [cmd(1, 1, F_FINAL | F_WRITE | 1, cdb=WRITE10, data=W4K), cmd(2, 2)]
    quick, general = run(chunks, True, ops), run(chunks, False, ops)
    assert quick[:3] == general[:3]
    assert [name for name, _, _ in quick[0]] == ["Reject"] and quick[3] == [0x01]


@pytest.mark.parametrize("name", list(CASES))
def test_quick_lane_decides_as_the_general_path(name):
    quick = run(CASES[name], True)
    general = run(CASES[name], False)
    assert quick[:3] == general[:3]
    if name in QUICK:
        assert quick[3] == [] and general[3]          # the lane took every command
        assert quick[1]                               # ... and they run
    else:
        assert quick[3]                               # handed to the general path, which decided


def test_window_accept_next_is_accept_for_the_next_command_only():
    from pyiscsi_target.iscsi.cmdsn import CmdWindow

    for first in (1, 0xFFFFFFFF):                     # and across the 2^32 wrap
        a, b = CmdWindow(first, 4), CmdWindow(first, 4)
        assert a.accept_next(first) and b.accept(first, "x") == ["x"]
        assert (a.exp_cmdsn, a.max_cmdsn, a.outstanding) == (b.exp_cmdsn, b.max_cmdsn, b.outstanding)
        nxt = (first + 1) & 0xFFFFFFFF
        assert not a.accept_next((nxt + 1) & 0xFFFFFFFF)          # a gap: left to accept()
        assert a.exp_cmdsn == nxt and not a._held
        assert not a.accept_next(first)                           # a duplicate
    w = CmdWindow(1, 1)
    assert w.accept_next(1) and not w.accept_next(2)              # MaxCmdSN reached


# --- the same comparison on generated traffic -------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_pdu = st.builds(
    lambda opbyte, flags, itt, cmdsn, expected, cdb0, dlen, lun: cmd(
        itt, cmdsn, flags, expected=expected, cdb=bytes([cdb0]) + bytes(15), immediate=bool(opbyte),
        lun=lun, data=bytes(dlen)),
    st.sampled_from([0, 1]),
    st.one_of(st.sampled_from([0x81, 0xC1, 0xA1, 0x21, 0xE1, 0x82, 0x83]),   # the usual ones
              st.integers(0, 255)),                       # and every other combination
    st.integers(0, 4),                                    # few ITTs: collisions happen
    st.integers(0, 6),                                    # CmdSN 1.. with gaps, duplicates and 0
    st.sampled_from([0, 512, 4096, 8192, 16384]),
    st.sampled_from([0x28, 0x2A, 0x00, 0x88]),
    st.sampled_from([0, 512, 4096, 8192]),                # 8192 = MaxRecvDataSegmentLength
    st.sampled_from([0, 1 << 48, (0x4000 | 300) << 48, 0xC000 << 48]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pdu, min_size=1, max_size=6), st.lists(st.integers(1, 9000), max_size=4))
def test_generated_command_streams_decide_alike(pdus, cuts):
    """Random SCSI Command PDUs (any flags, colliding ITTs, CmdSN gaps and
    duplicates, immediate data of every size), cut into chunks at random
    places: the quick lane and the general path answer alike."""
    stream = b"".join(pdus)
    points = sorted({c % len(stream) for c in cuts} - {0})
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    quick = run(chunks, True)
    general = run(chunks, False)
    assert quick[:3] == general[:3]
