"""Cutting a byte stream into PDUs and PDUs into bytes (RFC 7143 §11.2) — sans-IO.

A PDU on the wire is: BHS (48) | AHS (TotalAHSLength*4) | HeaderDigest (4, if
negotiated) | data segment | pad to 4 | DataDigest (4, if negotiated and data
is present).  :class:`PduReader` takes whatever bytes arrive and hands back
whole PDUs; it never reads a socket.  Its limits are checked from the header
*before* any data is buffered, so a peer announcing 16 MiB of data makes us
skip it, not store it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import digest as _digest
from .pdu import BHS_LEN, PduFormatError, RejectReason, decode_bhs

DIGEST_LEN = _digest.DIGEST_LEN
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class HeaderDigestError(PduFormatError):
    """§7.8: a header digest error at ERL 0 means the connection is lost."""


@dataclass(slots=True)
class Received:
    bhs: object                      # a pdu.* dataclass
    raw_bhs: bytes                   # the 48 bytes, for a Reject's data segment
    ahs: bytes
    data: bytes                      # the data segment without padding
    data_digest_ok: bool = True
    oversized: bool = False          # data longer than our MaxRecvDataSegmentLength: skipped


class PduReader:
    """Feed bytes with :meth:`feed`; take PDUs with :meth:`next_pdu` until None."""

    __slots__ = ("_buf", "_pos", "header_digest", "data_digest", "max_data_len", "_skip", "_pending")

    def __init__(self, max_data_len: int = 8192):
        self._buf = bytearray()
        self._pos = 0
        self.header_digest = False
        self.data_digest = False
        # Our MaxRecvDataSegmentLength: 8192 during login (§13.12), then as declared.
        self.max_data_len = max_data_len
        self._skip = 0                 # bytes of an oversized data segment still to drop
        self._pending: Received | None = None

    def feed(self, data) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        buf += data

    def peek_header(self) -> bytes | None:
        """The next BHS's 48 bytes once they are here (for checks before its data arrives)."""
        if self._pending is not None or len(self._buf) - self._pos < BHS_LEN:
            return None
        return bytes(self._buf[self._pos:self._pos + BHS_LEN])

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_pdu(self) -> Received | None:
        """One whole PDU, or None when more bytes are needed.

        Raises :class:`HeaderDigestError` (drop the connection) or
        :class:`PduFormatError` (unknown opcode: reject, framing still intact
        because the lengths were readable).
        """
        if self._pending is not None:
            if self._skip:
                return None
            done, self._pending = self._pending, None
            return done
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        ahs_len = buf[pos + 4] * 4
        dlen = int.from_bytes(buf[pos + 5:pos + 8], "big")
        hlen = BHS_LEN + ahs_len + (DIGEST_LEN if self.header_digest else 0)
        if avail < hlen:
            return None
        if self.header_digest:
            got = _digest.unpack_digest(buf, pos + BHS_LEN + ahs_len)
            want = _digest.digest_value(memoryview(buf)[pos:pos + BHS_LEN + ahs_len])
            if got != want:
                raise HeaderDigestError("header digest mismatch", RejectReason.PROTOCOL_ERROR)
        raw = bytes(memoryview(buf)[pos:pos + BHS_LEN])
        ahs = bytes(buf[pos + BHS_LEN:pos + BHS_LEN + ahs_len]) if ahs_len else b""
        padded = dlen + (-dlen % 4)
        ddlen = DIGEST_LEN if (self.data_digest and dlen) else 0
        if dlen > self.max_data_len:
            # Consume the header now; drop the data as it streams past.
            self._pos = pos + hlen
            skip = padded + ddlen
            have = min(skip, len(buf) - self._pos)
            self._pos += have
            self._skip = skip - have
            try:
                bhs = decode_bhs(raw)
            except PduFormatError:
                bhs = None
            rec = Received(bhs, raw, ahs, b"", True, oversized=True)
            if self._skip:
                self._pending = rec
                return None
            return rec
        total = hlen + padded + ddlen
        if avail < total:
            return None
        dstart = pos + hlen
        # One copy out of the receive buffer (slicing the bytearray first would be two).
        data = bytes(memoryview(buf)[dstart:dstart + dlen]) if dlen else b""
        ok = True
        if ddlen:
            got = _digest.unpack_digest(buf, dstart + padded)
            ok = got == _digest.digest_value(memoryview(buf)[dstart:dstart + padded])
        self._pos = pos + total
        if self._pos == len(buf):
            buf.clear()
            self._pos = 0
        try:
            bhs = decode_bhs(raw)
        except PduFormatError as exc:   # framing is already past it: the caller can Reject
            exc.raw_bhs = raw
            raise
        return Received(bhs, raw, ahs, data, ok)


def encode_pdu(bhs_bytes: bytes, data=b"", *, ahs: bytes = b"", header_digest: bool = False,
               data_digest: bool = False) -> list:
    """Buffers for ``transport.writelines``: header (+digest), data, pad (+digest).

    ``bhs_bytes`` must already carry the right DataSegmentLength/TotalAHSLength.
    The data segment is passed through as is (a memoryview stays a view).
    """
    head = bhs_bytes + ahs if ahs else bhs_bytes
    if header_digest:
        head = head + _digest.digest(head)
    dlen = len(data)
    if not dlen:
        return [head]
    pad = _PAD[dlen & 3]
    if data_digest:
        return [head, data, pad + _digest.digest(data, pad)]
    return [head, data, pad] if pad else [head, data]
