"""A logical unit: a backend plus the SCSI state that belongs to the LU.

Identity (VPD 0x80 serial, VPD 0x83 NAA) comes from configuration and must be
stable across restarts (Windows and MPIO match disks by it).  The LU also owns
its task set, its unit-attention queues, its SCSI-2 reservation holder and the
write gate that makes COMPARE AND WRITE atomic against other writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..storage.base import Backend
from .command import Nexus
from .pr import PersistentReservations
from .pr_shared import SharedReservations
from .tasks import TaskSet
from .ua import UnitAttentions

__all__ = ["LuIdentity", "LogicalUnit", "WriteGate", "encode_lun", "decode_lun"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LuIdentity:
    serial: str  # VPD 0x80 unit serial, ASCII, <= 32 chars
    naa: bytes  # 16-byte NAA-6 IEEE Registered Extended designator (VPD 0x83, LU association)
    vendor: str = "PYISCSI"  # padded to 8
    product: str = "VIRTUAL-DISK"  # padded to 16
    revision: str = "0001"  # 4

    def __post_init__(self) -> None:
        if len(self.naa) != 16 or self.naa[0] >> 4 != 6:
            raise ValueError("naa must be a 16-byte NAA IEEE Registered Extended (type 6h) value")
        for name, value, limit in (
            ("serial", self.serial, 32),
            ("vendor", self.vendor, 8),
            ("product", self.product, 16),
            ("revision", self.revision, 4),
        ):
            if not value.isascii() or not value.isprintable() or len(value) > limit:
                raise ValueError(f"{name} must be printable ASCII of at most {limit} characters")


class WriteGate:
    """Shared/exclusive gate over the LU's writes.

    Ordinary writes pass *shared* and run concurrently; COMPARE AND WRITE
    passes *exclusive* (SBC-3 §5.2: the compare and the write are one atomic
    operation with respect to any other command that writes the medium).  A
    waiting exclusive holder blocks new shared holders so it cannot starve.
    The uncontended shared path awaits nothing.
    """

    __slots__ = ("_shared", "_exclusive", "_waiters")

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiters: list[tuple[bool, asyncio.Future[None]]] = []

    def _wake(self) -> None:
        while self._waiters:
            exclusive, fut = self._waiters[0]
            if fut.done():  # cancelled waiter
                self._waiters.pop(0)
                continue
            if exclusive:
                if self._shared or self._exclusive:
                    return
                self._exclusive = True
            else:
                if self._exclusive:
                    return
                self._shared += 1
            self._waiters.pop(0)
            fut.set_result(None)
            if exclusive:
                return

    async def _acquire(self, exclusive: bool) -> None:
        free = not self._exclusive and not self._waiters and (not exclusive or not self._shared)
        if free:
            if exclusive:
                self._exclusive = True
            else:
                self._shared += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((exclusive, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled: give it back
                self._release(exclusive)
            else:
                self._wake()
            raise

    def _release(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = False
        else:
            self._shared -= 1
        self._wake()

    def try_shared(self) -> bool:
        """Take the gate shared if that needs no waiting (the per-WRITE fast
        path: no async context manager objects); pair with release_shared()."""
        if self._exclusive or self._waiters:
            return False
        self._shared += 1
        return True

    def release_shared(self) -> None:
        self._release(False)

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self._acquire(False)
        try:
            yield
        finally:
            self._release(False)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        await self._acquire(True)
        try:
            yield
        finally:
            self._release(True)


class LogicalUnit:
    """One LU: block device model over a byte-addressed :class:`Backend`."""

    def __init__(
        self,
        lun_id: int,
        backend: Backend,
        identity: LuIdentity,
        *,
        block_size: int = 512,
        read_only: bool = False,
        rotation_rate: int = 0,
        physical_block_exponent: int = 0,
        max_transfer_bytes: int = 32 * 1024 * 1024,
        pr: PersistentReservations | None = None,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two >= 512")
        if backend.size % block_size:
            raise ValueError("backend size must be a multiple of the block size")
        if not 0 <= lun_id < 16384:
            raise ValueError("lun_id must be in 0..16383 (SAM-5 flat space addressing)")
        self.lun_id = lun_id
        self.backend = backend
        self.identity = identity
        self.block_size = block_size
        self.read_only = read_only
        # Control mode page SWP (SPC-4 §7.5.8): write-protected by MODE SELECT
        # until cleared or restart (saved pages are not implemented).
        self.software_write_protect = False
        # VPD 0xB1 MEDIUM ROTATION RATE: 0 = not reported, 1 = non-rotating, else rpm.
        self.rotation_rate = rotation_rate
        # READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 §5.16.2).
        self.physical_block_exponent = physical_block_exponent
        # VPD 0xB0 limits, in logical blocks (SBC-3 §6.5.3).
        self.max_transfer_blocks = max(1, max_transfer_bytes // block_size)
        self.optimal_transfer_blocks = max(1, min(self.max_transfer_blocks, (1024 * 1024) // block_size))
        self.max_unmap_blocks = 1024 * 1024  # libiscsi calls more than 1 Mi "insane"
        self.max_unmap_descriptors = 256
        self.unmap_granularity = max(1 << physical_block_exponent, 4096 // block_size)
        self.max_write_same_blocks = (2 * 1024**3) // block_size
        self.max_compare_write_blocks = 255  # one byte in the CDB (SBC-3 §5.2)

        # READ's zero-copy read where the backend has one (storage/file.py
        # read_for_transfer: a payload or None); None: READ uses backend.read.
        self.read_for_transfer = getattr(backend, "read_for_transfer", None)
        # The backend's read without waiting (bytes, or None if it must wait);
        # None: every READ awaits backend.read.
        self.read_now = getattr(backend, "read_now", None)
        self.tasks = TaskSet()
        self.unit_attentions = UnitAttentions()
        self.write_gate = WriteGate()
        # SPC-2 RESERVE(6)/(10) holder.
        self.reserved_by: Nexus | None = None
        # SPC-4 §5.12 persistent reservations (registrations survive nexus
        # loss and resets; with APTPL also restarts, through ``pr.persist``).
        self.pr = pr if pr is not None else PersistentReservations()
        # PR OUT commands run one at a time (persist, then commit).
        self.pr_lock = asyncio.Lock()
        # Set when several gateways export this LU: the reservation state
        # above is then a copy of a shared record (pr_shared.SharedReservations).
        self.shared: SharedReservations | None = None

    async def stop_sharing(self) -> None:
        """Stop following the shared reservation record (before the image and
        the cluster connection under both close).  Errors are logged: closing
        goes on."""
        shared, self.shared = self.shared, None
        if shared is not None:
            try:
                await shared.close()
            except Exception:
                log.exception("LUN %d: closing its shared reservations failed", self.lun_id)

    def release_scsi2(self, only: Nexus | None = None) -> None:
        """Nexus loss (``only`` = that nexus) or a reset (None): release the
        SPC-2 reservation (SPC-2 §5.5.3).  Synchronous for its callers; the
        shared record, if any, follows in the background."""
        holder = self.reserved_by
        if only is not None and holder != only:
            return
        self.reserved_by = None
        if self.shared is not None and (holder is not None or only is None):
            self.shared.release_scsi2_later(only)

    @property
    def num_blocks(self) -> int:
        return self.backend.size // self.block_size

    @property
    def thin(self) -> bool:
        return bool(self.backend.thin)

    @property
    def write_cache_switchable(self) -> bool:
        return callable(getattr(self.backend, "set_write_cache", None))

    def __repr__(self) -> str:
        return f"LogicalUnit({self.lun_id}, {self.num_blocks} x {self.block_size})"


def encode_lun(lun_id: int) -> bytes:
    """The 8-byte LUN structure for ``lun_id`` (SAM-5 §4.7): peripheral device
    addressing below 256, flat space addressing up to 16383."""
    if 0 <= lun_id < 256:
        return bytes((0, lun_id)) + bytes(6)
    if lun_id < 16384:
        return bytes((0x40 | (lun_id >> 8), lun_id & 0xFF)) + bytes(6)
    raise ValueError(f"LUN {lun_id} not addressable with single level addressing")


def decode_lun(lun: bytes) -> int:
    """Inverse of :func:`encode_lun`; other address methods give -1 (no such LU)."""
    method = lun[0] >> 6
    if any(lun[2:8]) or method not in (0, 1):
        return -1
    if method == 0 and lun[0] & 0x3F:  # peripheral addressing with a bus id
        return -1
    return ((lun[0] & 0x3F) << 8) | lun[1]
