"""The contract every storage backend keeps: bytes at offsets, no SCSI.

A backend is async towards the SCSI core: it must never block the event loop
(file backends hand pread/pwrite/fdatasync to a thread pool, which releases the
GIL).  Offsets and lengths are in bytes; the SCSI core converts LBAs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class StorageError(OSError):
    """An I/O error from the medium; the SCSI core maps it to MEDIUM ERROR."""


@runtime_checkable
class Backend(Protocol):
    #: Size of the image in bytes (a multiple of the LUN's block size).
    size: int
    #: True when unallocated regions exist / can be punched (thin, sparse).
    thin: bool
    #: True when data written is volatile until ``flush`` (a write cache).
    write_cache: bool

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes (holes read as zeros)."""

    # Optional, not part of the protocol check: ``read_now(offset, length)``,
    # a plain method returning the bytes when it can without blocking the
    # event loop (an image in memory, the page cache), else None, and raising
    # what ``read`` raises.  The SCSI core asks it before awaiting ``read``,
    # so a subclass that changes ``read`` must change or drop it as well.

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` the data is on stable storage on return."""

    async def flush(self, offset: int = 0, length: int = 0) -> None:
        """Make everything written so far stable (length 0 = to the end)."""

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate a range so it reads back as zeros (punch a hole)."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros (may deallocate when thin)."""

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Extents ``(offset, length, allocated)`` covering the range, in order."""

    async def close(self) -> None:
        """Flush and release the image."""
