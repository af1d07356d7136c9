"""An in-memory backend: a sparse image held in fixed-size chunks.

Useful as a real ``memory`` backend (scratch LUNs, benchmarks of the protocol
path without a disk) and in tests.  Chunks are allocated on first write and
dropped by ``discard``, so allocation reporting is exact to the chunk.
Nothing here blocks, so no thread pool is involved.
"""

from __future__ import annotations

__all__ = ["MemoryBackend"]

Buffer = bytes | bytearray | memoryview


class MemoryBackend:
    """Implements :class:`pyiscsi_target.storage.base.Backend`."""

    def __init__(
        self,
        size: int,
        *,
        thin: bool = True,
        write_cache: bool = False,
        chunk_size: int = 64 * 1024,
    ) -> None:
        if size < 0 or chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("size must be >= 0 and chunk_size a power of two")
        self.size = size
        self.thin = thin
        self.write_cache = write_cache
        self.chunk_size = chunk_size
        self._chunks: dict[int, bytearray] = {}
        self.closed = False
        # Observability for tests and stats.
        self.flush_calls: list[tuple[int, int]] = []
        self.fua_writes = 0

    # --- helpers ----------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise ValueError("backend is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside image of {self.size} bytes")

    def _spans(self, offset: int, length: int):
        """(chunk index, start in chunk, end in chunk, position in the request)."""
        cs = self.chunk_size
        pos = 0
        while pos < length:
            at = offset + pos
            index, start = divmod(at, cs)
            end = min(cs, start + (length - pos))
            yield index, start, end, pos
            pos += end - start

    # --- Backend ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        return self._copy_out(offset, length)

    def read_now(self, offset: int, length: int) -> bytearray:
        """:meth:`read` without a coroutine (nothing here waits)."""
        return self._copy_out(offset, length)

    def _copy_out(self, offset: int, length: int) -> bytearray:
        self._check(offset, length)
        out = bytearray(length)
        for index, start, end, pos in self._spans(offset, length):
            chunk = self._chunks.get(index)
            if chunk is not None:
                out[pos : pos + end - start] = chunk[start:end]
        return out

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        for index, start, end, pos in self._spans(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = bytearray(self.chunk_size)
            chunk[start:end] = view[pos : pos + end - start]
        if fua:
            self.fua_writes += 1

    async def flush(self, offset: int = 0, length: int = 0) -> None:
        if self.closed:
            raise ValueError("backend is closed")
        self.flush_calls.append((offset, length))

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for index, start, end, _ in self._spans(offset, length):
            if start == 0 and end == self.chunk_size:
                self._chunks.pop(index, None)
            else:
                chunk = self._chunks.get(index)
                if chunk is not None:
                    chunk[start:end] = bytes(end - start)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.thin:
            await self.discard(offset, length)
            return
        self._check(offset, length)
        for index, start, end, _ in self._spans(offset, length):
            chunk = self._chunks.get(index)
            if chunk is not None:
                chunk[start:end] = bytes(end - start)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        extents: list[tuple[int, int, bool]] = []
        for index, start, end, pos in self._spans(offset, length):
            allocated = not self.thin or index in self._chunks
            if extents and extents[-1][2] == allocated:
                o, n, a = extents[-1]
                extents[-1] = (o, n + end - start, a)
            else:
                extents.append((offset + pos, end - start, allocated))
        return extents

    def set_write_cache(self, enabled: bool) -> None:
        """Switch the (notional) write cache: makes WCE changeable in MODE SELECT."""
        self.write_cache = enabled

    async def close(self) -> None:
        self.closed = True
