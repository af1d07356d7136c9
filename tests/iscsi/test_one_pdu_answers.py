"""scsi_done's one-call answers (GOOD read in one Data-In, GOOD without data)
put the same bytes on the wire as the general segmenting code."""

import pytest

from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, F_WRITE, ScsiCommand
from pyiscsi_target.scsi.command import ScsiResult, Status
from tests.iscsi.test_connection import logged_in

READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
SENSE = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])

CASES = [
    # (command flags, expected length, immediate data, result)
    (F_READ, 4096, b"", ScsiResult(data_in=bytes(range(256)) * 16)),
    (F_READ, 8192, b"", ScsiResult(data_in=bytes(8192))),                 # exactly MaxRecvDataSegmentLength
    (F_READ, 12288, b"", ScsiResult(data_in=bytes(12288))),               # two Data-In
    (F_READ, 4096, b"", ScsiResult(data_in=bytes(2048))),                 # underflow
    (F_READ, 4096, b"", ScsiResult(data_in=bytes(8192))),                 # overflow
    (F_READ, 4094, b"", ScsiResult(data_in=bytes(4094))),                 # padded
    (F_READ, 4096, b"", ScsiResult(data_in=b"")),                         # nothing read
    (F_READ, 0, b"", ScsiResult()),
    (F_READ, 4096, b"", ScsiResult(status=Status.CHECK_CONDITION, sense=SENSE)),
    (F_READ, 4096, b"", ScsiResult(status=Status.CONDITION_MET, data_in=bytes(4096))),
    (F_READ, 4096, b"", ScsiResult(status=Status.RESERVATION_CONFLICT)),
    (F_WRITE, 4096, bytes(4096), ScsiResult(data_out_wanted=4096)),
    (F_WRITE, 4096, bytes(4096), ScsiResult(data_out_wanted=2048)),       # underflow
    (F_WRITE, 4096, bytes(4096), ScsiResult(data_out_wanted=8192)),       # overflow
    (F_WRITE, 4096, bytes(4096), ScsiResult(data_in=b"xx", data_out_wanted=4096)),
    (F_WRITE, 4096, bytes(4096), ScsiResult(status=Status.CHECK_CONDITION, sense=SENSE, data_out_wanted=4096)),
    (0, 0, b"", ScsiResult()),
    (0, 0, b"", ScsiResult(data_in=bytes(4))),                            # data for a no-data command
    (0, 512, b"", ScsiResult()),
    (F_READ | F_WRITE, 4096, bytes(4096), ScsiResult(data_in=bytes(4096), data_out_wanted=4096)),
]


def answer(one_pdu: bool, flags: int, expected: int, data: bytes, result: ScsiResult, immediate: bool) -> bytes:
    w = logged_in()
    w.conn.one_pdu_answers = one_pdu
    cdb = (WRITE10 if flags & F_WRITE else READ10).ljust(16, b"\0")
    w.send(ScsiCommand(opbyte=0x41 if immediate else 0x01, flags=F_FINAL | flags | 1, itt=5,
                       expected_length=expected, cmdsn=1, cdb=cdb), data)
    w.drain()
    w.conn.scsi_done(5, result)
    return b"".join(bytes(b) for b in w.conn.take_output())


@pytest.mark.parametrize("immediate", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_same_bytes_as_the_general_code(case, immediate):
    flags, expected, data, result = CASES[case]
    fast = answer(True, flags, expected, data, result, immediate)
    assert fast
    assert fast == answer(False, flags, expected, data, result, immediate)


def test_deferred_payload_passes_whole_or_is_materialized_and_released():
    """A zero-copy payload (payload.py) rides unchanged in the one-Data-In
    answer; every other answer (here: two Data-In PDUs) takes its bytes and
    releases it, so nothing stays pending."""
    from pyiscsi_target.payload import PENDING, DeferredPayload

    class Recording(DeferredPayload):
        __slots__ = ("raw", "released")

        def __init__(self, raw: bytes) -> None:
            self.raw, self.released = raw, False
            PENDING.add(self)

        def __len__(self) -> int:
            return len(self.raw)

        def materialize(self, start: int = 0) -> bytes:
            return self.raw[start:]

        def done(self) -> None:
            self.released = True
            super().done()

    whole = Recording(bytes(range(256)) * 16)
    w = logged_in()
    w.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=5, expected_length=4096, cmdsn=1, cdb=READ10.ljust(16, b"\0")))
    w.drain()
    w.conn.scsi_done(5, ScsiResult(data_in=whole))
    out = w.conn.take_output()
    assert out[-1] is whole and not whole.released  # the server sends it (sendfile) and releases it then
    whole.done()

    split = Recording(bytes(12288))  # more than MaxRecvDataSegmentLength (8192): two Data-In
    w = logged_in()
    w.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=5, expected_length=12288, cmdsn=1, cdb=READ10.ljust(16, b"\0")))
    w.drain()
    w.conn.scsi_done(5, ScsiResult(data_in=split))
    out = b"".join(bytes(b) for b in w.conn.take_output())
    assert split.released and split not in PENDING
    assert out == answer(True, F_READ, 12288, b"", ScsiResult(data_in=bytes(12288)), False)
