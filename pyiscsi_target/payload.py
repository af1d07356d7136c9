"""Data-In payloads that are not copied into memory: zero-copy reads.

A 256 KiB READ from an image in memory (tmpfs) costs two copies on the
event-loop thread: image -> buffer (``preadv``) and buffer -> socket
(``writev``); tgt spreads the same copies over two threads, we have one core.
``sendfile`` lets the kernel move the page-cache pages to the socket instead
(benchmarks/copy_paths.py: ~2x the MiB/s and ~60 % of the CPU per read).

So a large READ from such an image may return a :class:`DeferredPayload`: an
opaque, sized stand-in for the bytes.  The fabric treats it as data of that
length; the one-PDU Data-In answer passes it through, every other path turns
it into bytes with :meth:`~DeferredPayload.materialize`; the server sends it
with :meth:`~DeferredPayload.send_to` when nothing else is queued on the socket
(ordering), else materializes it.

The bytes must be those of the medium when the READ completed.  A payload
lives from that moment until its connection's next flush -- normally the end
of the same receive callback -- and every write to an image first settles
all pending payloads (:func:`settle_pending`: they read their bytes before
the write changes them).  So a WRITE that runs after the READ completed
(ORDERED, or a later command in the same batch) never shows through.
"""

from __future__ import annotations

import os

__all__ = ["DeferredPayload", "FileRegion", "PENDING", "settle_pending"]


class DeferredPayload:
    """Bytes to send later; the base knows no files."""

    __slots__ = ()

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def materialize(self, start: int = 0) -> bytes:  # pragma: no cover - abstract
        """The bytes from ``start`` to the end (read now, once)."""
        raise NotImplementedError

    def send_to(self, sock_fd: int) -> int:  # pragma: no cover - abstract
        """Send as much as the socket takes without blocking; bytes sent."""
        return 0

    def done(self) -> None:
        """Sent or materialized: no longer pending."""
        PENDING.discard(self)


#: Payloads created and not yet sent or materialized (event-loop thread only).
PENDING: set[DeferredPayload] = set()


def settle_pending() -> None:
    """Before anything changes an image: every pending payload takes its bytes
    now.  They stay pending (queued for sending) until the server sent them."""
    for p in PENDING:
        p.materialize()


class FileRegion(DeferredPayload):
    """``length`` bytes of an open file at ``offset``."""

    __slots__ = ("fd", "offset", "length", "data")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.data: bytes | None = None
        PENDING.add(self)

    def __len__(self) -> int:
        return self.length

    def materialize(self, start: int = 0) -> bytes:
        if self.data is None:
            parts = []
            done = 0
            while done < self.length:
                chunk = os.pread(self.fd, self.length - done, self.offset + done)
                if not chunk:
                    raise OSError(5, f"unexpected end of image at {self.offset + done}")
                parts.append(chunk)
                done += len(chunk)
            self.data = parts[0] if len(parts) == 1 else b"".join(parts)
        return self.data[start:] if start else self.data

    def send_to(self, sock_fd: int) -> int:
        if self.data is not None:  # settled by a write: the bytes, not the file
            return 0
        sent = 0
        try:
            while sent < self.length:
                n = os.sendfile(sock_fd, self.fd, self.offset + sent, self.length - sent)
                if n == 0:
                    break
                sent += n
        except BlockingIOError:
            pass
        return sent
