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
#: A data segment at least this large, not yet complete, is received straight
#: into a buffer of its own (one copy, kernel to final buffer, instead of three).
DIRECT_ABOVE = 32 * 1024
#: Where BufferedProtocol reads land when no large segment is in progress.
SCRATCH_SIZE = 256 * 1024
COMPACT_ABOVE = 256 * 1024
_SCRATCH = bytearray(SCRATCH_SIZE)
_SCRATCH_VIEW = memoryview(_SCRATCH)
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class HeaderDigestError(PduFormatError):
    """§7.8: a header digest error at ERL 0 means the connection is lost."""


@dataclass(slots=True)
class Received:
    bhs: object                      # a pdu.* dataclass
    raw_bhs: bytes                   # the 48 bytes, for a Reject's data segment
    ahs: bytes
    data: bytes | memoryview         # the data segment without padding
    data_digest_ok: bool = True
    oversized: bool = False          # data longer than our MaxRecvDataSegmentLength: skipped
    unknown: bool = False            # an unknown opcode whose data was received (raised later)


class PduReader:
    """Feed bytes with :meth:`feed`; take PDUs with :meth:`next_pdu` until None."""

    __slots__ = ("_buf", "_pos", "header_digest", "data_digest", "max_data_len", "_skip", "_pending",
                 "_direct", "_scratch")

    def __init__(self, max_data_len: int = 8192):
        self._buf = bytearray()
        self._pos = 0
        self.header_digest = False
        self.data_digest = False
        # Our MaxRecvDataSegmentLength: 8192 during login (§13.12), then as declared.
        self.max_data_len = max_data_len
        self._skip = 0                 # bytes of an oversized data segment still to drop
        self._pending: Received | None = None
        # A large data segment being received straight into its own buffer:
        # [dest, have, raw, ahs, dlen, padded] (see _start_direct).
        self._direct: list | None = None
        self._scratch: bytearray | None = None

    # -- BufferedProtocol side: the socket reads straight into our buffers ------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go: the rest of a large data segment
        (no copy at all), else a scratch area that :meth:`buffer_updated` feeds."""
        d = self._direct
        if d is not None:
            return memoryview(d[0])[d[1]:]
        # One scratch area for every connection: asyncio calls get_buffer, the
        # read and buffer_updated back to back for one connection, and
        # buffer_updated copies the bytes out before anyone else reads.
        self._scratch = _SCRATCH
        return _SCRATCH_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        d = self._direct
        if d is not None:
            d[1] += nbytes
            if d[1] == len(d[0]):
                self._finish_direct()
            return
        if not self._pos and not self._skip:
            # feed's usual case (everything before was consumed): append.
            self._buf += _SCRATCH_VIEW[:nbytes]
            return
        self.feed(_SCRATCH_VIEW[:nbytes])

    def release(self) -> None:
        """Drop every buffer (the connection is gone)."""
        self._buf = bytearray()
        self._pos = 0
        self._direct = None
        self._pending = None

    def feed(self, data) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return
        d = self._direct
        if d is not None:
            dest, have = d[0], d[1]
            n = min(len(dest) - have, len(data))
            dest[have:have + n] = data[:n]
            d[1] = have + n
            data = data[n:]
            if d[1] == len(dest):
                self._finish_direct()
            if not len(data):
                return
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        elif self._pos > COMPACT_ABOVE:
            # Drop the consumed prefix, or a stream that never ends on a PDU
            # boundary would grow the buffer forever.
            del buf[:self._pos]
            self._pos = 0
        buf += data

    def _start_direct(self, pos: int, hlen: int, raw: bytes, ahs: bytes, dlen: int, padded: int,
                      ddlen: int) -> None:
        """The rest of this PDU goes straight into a buffer of its own."""
        buf = self._buf
        dest = bytearray(padded + ddlen)
        have = len(buf) - pos - hlen
        dest[:have] = memoryview(buf)[pos + hlen:]
        buf.clear()
        self._pos = 0
        self._direct = [dest, have, raw, ahs, dlen, padded]

    def _finish_direct(self) -> None:
        dest, _, raw, ahs, dlen, padded = self._direct
        self._direct = None
        ok = True
        if len(dest) > padded:
            ok = _digest.unpack_digest(dest, padded) == _digest.digest_value(memoryview(dest)[:padded])
        try:
            bhs = decode_bhs(raw)
        except PduFormatError:
            bhs = None
        view = memoryview(dest)[:dlen]
        if bhs is None:
            self._pending = Received(None, raw, ahs, view, ok, unknown=True)
        else:
            self._pending = Received(bhs, raw, ahs, view, ok)

    def peek_header(self) -> bytes | None:
        """The next BHS's 48 bytes once they are here (for checks before its data arrives)."""
        if self._pending is not None or len(self._buf) - self._pos < BHS_LEN:
            return None
        return bytes(self._buf[self._pos:self._pos + BHS_LEN])

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_command(self) -> tuple[bytes, bytes, int] | None:
        """The next PDU, taken here when it is the usual SCSI Command: whole,
        no AHS, no digests, data (immediate data) within our limit.  Returns
        (its 48-byte BHS, its data segment, how many bytes are still
        buffered) and consumes it; None consumes nothing (:meth:`next_pdu`
        takes whatever it is, or says more bytes are needed).  One call and
        two copies instead of next_pdu's parsing into a Received: the
        fabric's quick lane for commands (IscsiConnection._process)."""
        if self._pending is not None or self._direct is not None or self.header_digest or self.data_digest:
            return None
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN or buf[pos] & 0x3F != 0x01 or buf[pos + 4]:   # not a whole BHS of a SCSI Command without AHS
            return None
        dlen = (buf[pos + 5] << 16) | (buf[pos + 6] << 8) | buf[pos + 7]
        total = BHS_LEN + dlen + (-dlen % 4)
        if avail < total or dlen > self.max_data_len:
            return None
        raw = bytes(buf[pos:pos + BHS_LEN])
        data = bytes(memoryview(buf)[pos + BHS_LEN:pos + BHS_LEN + dlen]) if dlen else b""
        pos += total
        rest = len(buf) - pos
        if not rest:
            buf.clear()
            pos = 0
        self._pos = pos
        return raw, data, rest

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
            if done.unknown:
                exc = PduFormatError(f"unknown opcode 0x{done.raw_bhs[0] & 0x3F:02x}",
                                     RejectReason.COMMAND_NOT_SUPPORTED)
                exc.raw_bhs = done.raw_bhs
                raise exc
            return done
        if self._direct is not None:
            return None
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        ahs_len = buf[pos + 4] * 4
        dlen = (buf[pos + 5] << 16) | (buf[pos + 6] << 8) | buf[pos + 7]   # no slice object
        hlen = BHS_LEN + ahs_len + (DIGEST_LEN if self.header_digest else 0)
        if avail < hlen:
            return None
        if self.header_digest:
            got = _digest.unpack_digest(buf, pos + BHS_LEN + ahs_len)
            want = _digest.digest_value(memoryview(buf)[pos:pos + BHS_LEN + ahs_len])
            if got != want:
                raise HeaderDigestError("header digest mismatch", RejectReason.PROTOCOL_ERROR)
        raw = bytes(buf[pos:pos + BHS_LEN])    # 48 bytes: two small copies beat a memoryview
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
            if padded >= DIRECT_ABOVE:
                self._start_direct(pos, hlen, raw, ahs, dlen, padded, ddlen)
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
