"""Full-feature phase without sockets: CmdSN window, R2T sequencing, Data-In, Reject, TMF."""

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.connection import Close, Execute, TaskManagement
from pyiscsi_target.iscsi.pdu import (
    ALL_ONES, F_FINAL, F_READ, F_WRITE, DataIn, DataOut, NopIn, NopOut, R2T, Reject, ScsiCommand,
    ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, TextRequest, TextResponse,
)
from pyiscsi_target.scsi.command import ScsiResult, Status
from tests.iscsi.harness import TARGET, Wire, make_ctx

WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 0, 0])
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def logged_in(ops=None, **ctx_kw):
    ctx = make_ctx(**ctx_kw)
    ctx.offers["MaxOutstandingR2T"] = "4"       # the initiator's 2 wins (minimum)
    w = Wire(ctx)
    w.login(ops=ops or [("MaxRecvDataSegmentLength", "8192"), ("MaxBurstLength", "16384"),
                        ("FirstBurstLength", "8192"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                        ("MaxOutstandingR2T", "2")])
    w.actions.clear()
    return w


def execs(w):
    out = [a for a in w.actions if isinstance(a, Execute)]
    w.actions = [a for a in w.actions if not isinstance(a, Execute)]
    return out


def test_write_with_immediate_data_then_r2t_bursts():
    w = logged_in()
    payload = bytes(range(256)) * 160           # 40960 bytes
    r = w.send(ScsiCommand(flags=F_FINAL | F_WRITE | 1, itt=9, expected_length=len(payload), cmdsn=1,
                           cdb=WRITE10.ljust(16, b"\0")), payload[:8192])
    r2ts = [p for p, _ in r]
    # 32768 left, MaxBurstLength 16384, MaxOutstandingR2T 2: two R2Ts at once.
    assert [(t.r2tsn, t.buffer_offset, t.desired_length) for t in r2ts] == [(0, 8192, 16384), (1, 24576, 16384)]
    assert not execs(w)
    for t in r2ts:
        for i, off in enumerate(range(t.buffer_offset, t.buffer_offset + t.desired_length, 8192)):
            last = off + 8192 >= t.buffer_offset + t.desired_length
            w.send(DataOut(flags=F_FINAL if last else 0, itt=9, ttt=t.ttt, datasn=i, buffer_offset=off),
                   payload[off:off + 8192])
    (ex,) = execs(w)
    assert bytes(ex.task.data_out) == payload and ex.task.expected_length == len(payload)
    w.conn.scsi_done(9, ScsiResult(data_out_wanted=len(payload)))
    (rsp, _), = w.drain()
    assert isinstance(rsp, ScsiResponse) and rsp.status == 0 and rsp.residual == 0 and rsp.expdatasn == 2


def test_unsolicited_data_out_up_to_first_burst():
    w = logged_in()
    payload = b"x" * 12000
    r = w.send(ScsiCommand(flags=F_WRITE | 1, itt=3, expected_length=len(payload), cmdsn=1,
                           cdb=WRITE10.ljust(16, b"\0")), payload[:4096])
    assert r == []                                # waits for the unsolicited burst
    r = w.send(DataOut(flags=F_FINAL, itt=3, ttt=ALL_ONES, datasn=0, buffer_offset=4096), payload[4096:8192])
    (t, _), = r
    assert isinstance(t, R2T) and t.buffer_offset == 8192 and t.desired_length == 12000 - 8192
    w.send(DataOut(flags=F_FINAL, itt=3, ttt=t.ttt, datasn=0, buffer_offset=8192), payload[8192:])
    (ex,) = execs(w)
    assert bytes(ex.task.data_out) == payload


def test_data_out_with_wrong_datasn_is_rejected():
    w = logged_in()
    w.send(ScsiCommand(flags=F_WRITE | 1, itt=3, expected_length=8192, cmdsn=1, cdb=WRITE10.ljust(16, b"\0")))
    (rej, data), = w.send(DataOut(flags=F_FINAL, itt=3, ttt=ALL_ONES, datasn=5, buffer_offset=0), b"y" * 8192)
    assert isinstance(rej, Reject) and rej.reason == 0x04 and data[0] == 0x05


def test_read_is_split_by_mrdsl_and_max_burst_with_status_in_last_data_in():
    w = logged_in()
    w.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=4, expected_length=40000, cmdsn=1, cdb=READ10.ljust(16, b"\0")))
    (ex,) = execs(w)
    w.conn.scsi_done(4, ScsiResult(data_in=bytes(30000)))
    pdus = [p for p, _ in w.drain()]
    assert all(isinstance(p, DataIn) for p in pdus)
    assert [p.buffer_offset for p in pdus] == [0, 8192, 16384, 24576]
    assert [p.datasn for p in pdus] == [0, 1, 2, 3]
    assert [bool(p.flags & F_FINAL) for p in pdus] == [False, True, False, True]   # 16 KiB bursts
    last = pdus[-1]
    assert last.flags & 0x01 and last.flags & 0x02 and last.residual == 10000 and last.status == 0


def test_check_condition_goes_in_a_scsi_response_with_sense():
    w = logged_in()
    w.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=4, expected_length=512, cmdsn=1, cdb=READ10.ljust(16, b"\0")))
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    w.conn.scsi_done(4, ScsiResult(status=Status.CHECK_CONDITION, sense=sense))
    (rsp, data), = w.drain()
    assert isinstance(rsp, ScsiResponse) and rsp.status == 2
    assert data[:2] == len(sense).to_bytes(2, "big") and data[2:] == sense


def test_cmdsn_outside_window_is_ignored_and_others_continue():
    w = logged_in()
    assert w.send(NopOut(opbyte=0, itt=7, cmdsn=500)) == []
    (nop, _), = w.send(NopOut(opbyte=0, itt=8, cmdsn=1))
    assert isinstance(nop, NopIn) and nop.itt == 8 and nop.expcmdsn == 2


def test_commands_wait_behind_a_cmdsn_gap():
    w = logged_in()
    assert w.send(NopOut(opbyte=0, itt=7, cmdsn=2)) == []
    got = w.send(NopOut(opbyte=0, itt=6, cmdsn=1))
    assert [p.itt for p, _ in got] == [6, 7]


def test_unknown_opcode_gets_reject_and_session_continues():
    w = logged_in()
    raw = bytearray(NopOut(itt=1).encode(0))
    raw[0] = 0x1C
    (rej, data), = w.send_raw(bytes(raw))
    assert isinstance(rej, Reject) and rej.reason == 0x05 and data[0] == 0x1C
    (nop, _), = w.send(NopOut(opbyte=0, itt=8, cmdsn=1))
    assert isinstance(nop, NopIn)


def test_oversized_data_segment_is_rejected_and_consumes_cmdsn():
    w = logged_in()
    (rej, _), = w.send(ScsiCommand(flags=F_FINAL | F_WRITE | 1, itt=1, expected_length=300000, cmdsn=1,
                                   cdb=WRITE10.ljust(16, b"\0")), bytes(300000))
    assert isinstance(rej, Reject) and rej.reason == 0x04
    (nop, _), = w.send(NopOut(opbyte=0, itt=8, cmdsn=2))
    assert isinstance(nop, NopIn) and nop.expcmdsn == 3


def test_nop_in_ping_and_timeout():
    w = logged_in(nop_interval=10.0, nop_timeout=5.0)
    assert w.conn.get_timer() == 10.0
    w.conn.handle_timer(10.0)
    (ping, _), = w.drain()
    assert isinstance(ping, NopIn) and ping.ttt != ALL_ONES and ping.itt == ALL_ONES
    w.send(NopOut(itt=ALL_ONES, ttt=ping.ttt, cmdsn=1), now=11.0)
    assert w.conn.nop_ttt is None
    w.conn.handle_timer(21.0)
    (ping2, _), = w.drain()
    w.conn.handle_timer(26.0)
    w.drain()
    assert any(isinstance(a, Close) for a in w.actions)


def test_timer_moved_says_when_the_deadline_may_have_moved_earlier():
    """The glue re-asks get_timer only when timer_moved is set (else only
    last_rx moved the deadline, later, and its armed timer re-arms when it
    fires): so every change that can bring the deadline earlier must set it,
    and ordinary PDUs need not."""
    w = logged_in(nop_interval=10.0, nop_timeout=5.0)
    assert w.conn.timer_moved                              # the login set it
    w.conn.timer_moved = False
    w.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=1, expected_length=512, cmdsn=1,
                       cdb=READ10.ljust(16, b"\0")), now=3.0)
    assert not w.conn.timer_moved and w.conn.get_timer() == 13.0   # later: no need to re-ask
    w.conn.handle_timer(13.0)                              # a ping: its deadline is earlier
    (ping, _), = w.drain()
    assert w.conn.timer_moved and w.conn.get_timer() == 18.0
    w.conn.timer_moved = False
    w.send(NopOut(itt=ALL_ONES, ttt=ping.ttt, cmdsn=2), now=14.0)   # answered: back to the interval
    assert w.conn.timer_moved and w.conn.get_timer() == 24.0
    w.conn.timer_moved = False
    w.conn.close("test")
    assert w.conn.timer_moved and w.conn.get_timer() is None


def test_send_targets_in_normal_session_reports_own_target_with_connected_address():
    w = logged_in()
    (rsp, data), = w.send(TextRequest(itt=5, cmdsn=1), keys.encode_text([("SendTargets", "All")]))
    assert isinstance(rsp, TextResponse) and rsp.final
    assert keys.decode_text(data) == [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]


def test_abort_task_of_a_write_still_gathering_data():
    w = logged_in()
    w.send(ScsiCommand(flags=F_WRITE | 1, itt=3, expected_length=8192, cmdsn=1, cdb=WRITE10.ljust(16, b"\0")))
    (rsp, _), = w.send(TaskMgmtRequest(flags=0x81, itt=50, rtt=3, cmdsn=2, refcmdsn=1))
    assert isinstance(rsp, TaskMgmtResponse) and rsp.response == 0
    assert not any(isinstance(a, TaskManagement) for a in w.actions)


def test_lun_reset_is_handed_to_the_scsi_core():
    w = logged_in()
    assert w.send(TaskMgmtRequest(flags=0x85, itt=50, cmdsn=1, lun=0)) == []
    (tm,) = [a for a in w.actions if isinstance(a, TaskManagement)]
    assert tm.function == 5 and tm.lun == 0
    w.conn.tmf_done(50, 0)
    (rsp, _), = w.drain()
    assert isinstance(rsp, TaskMgmtResponse) and rsp.itt == 50 and rsp.response == 0


def test_task_reassign_is_not_supported_at_erl0():
    w = logged_in()
    (rsp, _), = w.send(TaskMgmtRequest(flags=0x88, itt=50, cmdsn=1, rtt=1))
    assert rsp.response == 4


def test_write_announcing_more_than_the_buffer_cap_is_rejected_and_consumes_cmdsn():
    from pyiscsi_target.iscsi.connection import MAX_WRITE_BUFFER
    w = logged_in()
    (rej, data), = w.send(ScsiCommand(flags=F_FINAL | F_WRITE | 1, itt=1, expected_length=MAX_WRITE_BUFFER + 512,
                                      cmdsn=1, cdb=WRITE10.ljust(16, b"\0")))
    assert isinstance(rej, Reject) and rej.reason == 0x09 and data[:1] == b"\x01"
    assert not w.conn.transfers and not execs(w)
    (nop, _), = w.send(NopOut(opbyte=0, itt=8, cmdsn=2))
    assert isinstance(nop, NopIn) and nop.expcmdsn == 3
