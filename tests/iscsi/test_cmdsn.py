from hypothesis import given, strategies as st

from pyiscsi_target.iscsi.cmdsn import CmdWindow, sn_add, sn_lt


def test_serial_arithmetic_wraps():
    assert sn_lt(0xFFFFFFFF, 0)
    assert not sn_lt(0, 0xFFFFFFFF)
    assert sn_add(0xFFFFFFFF, 2) == 1


def test_in_order_delivery_and_window_edges():
    w = CmdWindow(10, depth=4)
    assert (w.exp_cmdsn, w.max_cmdsn) == (10, 13)
    assert w.accept(10, "a") == ["a"]
    assert w.accept(9, "old") is None          # below ExpCmdSN: ignored
    assert w.accept(10, "dup") is None         # duplicate: ignored
    assert w.accept(14, "high") is None        # above MaxCmdSN: ignored
    assert w.accept(12, "c") == []             # waits behind the gap at 11
    assert w.accept(11, "b") == ["b", "c"]
    assert w.exp_cmdsn == 13 and w.outstanding == 3


def test_window_opens_as_commands_complete_and_never_shrinks():
    w = CmdWindow(1, depth=2)
    assert w.accept(1, "a") == ["a"]
    assert w.accept(2, "b") == ["b"]
    assert w.max_cmdsn == 2
    assert w.accept(3, "c") is None            # window full
    w.done()
    assert w.max_cmdsn == 3
    assert w.accept(3, "c") == ["c"]
    before = w.max_cmdsn
    w.done(0)
    assert w.max_cmdsn == before


def test_rejected_command_consumes_its_cmdsn():
    w = CmdWindow(5, depth=8)
    assert w.accept(6, "b") == []
    assert w.accept(5, None) == ["b"]          # a rejected PDU fills the gap
    assert w.exp_cmdsn == 7


@given(st.integers(0, 0xFFFFFFFF), st.permutations(list(range(16))))
def test_any_arrival_order_delivers_in_cmdsn_order(start, order):
    w = CmdWindow(start, depth=32)
    got = []
    for i in order:
        got += w.accept(sn_add(start, i), i)
    assert got == list(range(16))
