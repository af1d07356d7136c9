"""One SCSI command's data transfer on the iSCSI side, tracked by its ITT.

For a write, the Data-Out collection: immediate data, the unsolicited burst
(TTT 0xFFFFFFFF, up to FirstBurstLength), then R2T-solicited bursts of at most
MaxBurstLength with at most MaxOutstandingR2T in flight (RFC 7143 §4.2.4,
§11.7, §11.8).  Sans-IO: it only says which R2Ts to send and when the buffer
is complete.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from .pdu import ALL_ONES, PduFormatError, RejectReason


class DataOutError(PduFormatError):
    """A Data-Out that does not fit the transfer (§7.1.x: protocol error at ERL 0)."""


@dataclass(slots=True)
class Burst:
    ttt: int
    r2tsn: int
    offset: int
    length: int
    next_datasn: int = 0
    received: int = 0


#: Up to this size a write buffer is a bytearray; above, an anonymous mmap,
#: whose pages the kernel commits only as Data-Out fills them: an Expected
#: Data Transfer Length of 4 GiB in a hostile header costs nothing until the
#: initiator actually sends the data (bytearray(n) zero-fills, i.e. commits, n).
LAZY_BUFFER_ABOVE = 64 * 1024


def _buffer(n: int):
    if n <= LAZY_BUFFER_ABOVE:
        return bytearray(n)
    return mmap.mmap(-1, n)


class WriteTransfer:
    __slots__ = ("itt", "lun", "expected", "buf", "received", "next_offset", "unsolicited_open",
                 "unsol_limit", "unsol_datasn", "bursts", "r2tsn", "cmd", "rec")

    def __init__(self, itt: int, lun: int, expected: int, immediate: bytes, unsolicited_more: bool,
                 first_burst: int, cmd=None, rec=None):
        self.itt = itt
        self.lun = lun
        self.expected = expected
        self.buf = _buffer(expected)
        n = min(len(immediate), expected)
        self.buf[:n] = immediate[:n]
        self.received = n
        # Unsolicited Data-Out may follow the command when its F bit is clear (§11.3.4).
        self.unsolicited_open = unsolicited_more
        self.unsol_limit = min(first_burst, expected)
        self.unsol_datasn = 0
        self.next_offset = n
        self.bursts: dict[int, Burst] = {}
        self.r2tsn = 0
        self.cmd = cmd
        self.rec = rec

    @property
    def complete(self) -> bool:
        return self.received >= self.expected and not self.unsolicited_open

    def data_out(self, ttt: int, datasn: int, offset: int, data, final: bool) -> None:
        """Place one Data-Out's data; raises :class:`DataOutError` if it does not fit."""
        n = len(data)
        if offset + n > self.expected:
            raise DataOutError(f"Data-Out beyond the expected length ({offset}+{n} > {self.expected})",
                               RejectReason.PROTOCOL_ERROR)
        if ttt == ALL_ONES:
            if not self.unsolicited_open:
                raise DataOutError("unsolicited Data-Out not expected", RejectReason.PROTOCOL_ERROR)
            if offset + n > self.unsol_limit:
                raise DataOutError("unsolicited data beyond FirstBurstLength", RejectReason.PROTOCOL_ERROR)
            if datasn != self.unsol_datasn:
                raise DataOutError(f"DataSN {datasn}, expected {self.unsol_datasn}", RejectReason.PROTOCOL_ERROR)
            self.unsol_datasn += 1
            if final:
                self.unsolicited_open = False
        else:
            b = self.bursts.get(ttt)
            if b is None:
                raise DataOutError(f"Data-Out for unknown TTT 0x{ttt:08x}", RejectReason.INVALID_PDU_FIELD)
            if offset < b.offset or offset + n > b.offset + b.length:
                raise DataOutError("Data-Out outside its R2T", RejectReason.PROTOCOL_ERROR)
            if datasn != b.next_datasn:
                raise DataOutError(f"DataSN {datasn}, expected {b.next_datasn}", RejectReason.PROTOCOL_ERROR)
            b.next_datasn += 1
            b.received += n
            if final or b.received >= b.length:
                del self.bursts[ttt]
        self.buf[offset:offset + n] = data
        self.received += n
        if offset + n > self.next_offset and ttt == ALL_ONES:
            self.next_offset = offset + n

    def next_r2ts(self, max_outstanding: int, max_burst: int, new_ttt) -> list[Burst]:
        """R2Ts to send now (none while the unsolicited burst is still open)."""
        out = []
        if self.unsolicited_open:
            return out
        while len(self.bursts) < max_outstanding and self.next_offset < self.expected:
            length = min(max_burst, self.expected - self.next_offset)
            b = Burst(new_ttt(), self.r2tsn, self.next_offset, length)
            self.r2tsn += 1
            self.next_offset += length
            self.bursts[b.ttt] = b
            out.append(b)
        return out
