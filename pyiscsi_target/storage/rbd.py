"""Ceph RBD images as a :class:`~.base.Backend` (``path = "rbd:pool/image"``).

I/O goes through librbd's asynchronous calls (``aio_read``, ``aio_write``,
``aio_discard``, ``aio_write_zeroes``, ``aio_flush``).  Their completion
callbacks run on a librbd thread; each one hands its result to the event
loop with ``loop.call_soon_threadsafe``, so the loop never waits for Ceph.
The blocking calls (connect, open, create, stat, close) run in a thread.

One ``rados.Rados`` connection per process (per [ceph] settings) is shared by
every RBD LUN: a Rados handle is a full cluster client (monitor session,
OSD connections, threads), and one serves any number of images.

Semantics chosen for several gateways exporting one image (multipath, or
a cluster whose nodes log in to different gateways):

* ``rbd cache = false``: librbd's client-side cache would make one gateway
  read stale data another gateway already overwrote, and would hold
  acknowledged writes in RAM.  Without it a write completes only once the
  OSDs have it, so ``write_cache = False`` (WCE=0) and FUA, SYNCHRONIZE CACHE
  and ``flush`` have nothing left to do beyond waiting for librbd.
* ``rbd skip partial discard = false``: by default librbd silently skips
  the parts of a discard that do not cover whole objects, which then still
  read the old data.  UNMAP and WRITE SAME(UNMAP) promise zeros (LBPRZ=1),
  so partial ranges are zeroed instead.
* images created here have the ``layering`` feature only: with
  ``exclusive-lock`` two gateways writing one image pass the lock back and
  forth on every write (measured ~8x slower).

Attributes for the cluster-wide persistent reservations (scsi/pr_shared):
``rados`` (the shared connection), ``ioctx`` (the image's pool), ``pool_id``,
``image_id`` (librbd's id: stable across renames), ``fsid`` (the cluster's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import StorageError
from .ceph_bindings import import_rados_rbd

__all__ = ["CephSettings", "RbdBackend", "open_rbd", "parse_rbd_path", "RBD_PREFIX"]

log = logging.getLogger(__name__)

RBD_PREFIX = "rbd:"

#: Client options every connection of ours sets (see the module doc).
CLIENT_OPTIONS = {
    "rbd_cache": "false",
    "rbd_skip_partial_discard": "false",
    # A wrong monitor address or key fails start-up in 30 s, not librados' 300 s.
    "client_mount_timeout": "30",
}

#: GET LBA STATUS asks for the allocation of everything from an LBA to the
#: end.  Without the object-map feature librbd learns it one object at a time
#: (~40 us per 4 MiB object here), so at most this much is mapped exactly per
#: call; the rest is reported allocated (an initiator asks again from there).
ALLOCATION_SCAN_MAX = 1 << 30


@dataclass(frozen=True, slots=True)
class CephSettings:
    """How to reach the cluster ([ceph] in the config)."""

    conf: str = "/etc/ceph/ceph.conf"
    client: str = "admin"  # the id: the entity is client.<id>
    keyring: str | None = None
    op_timeout: float = 30.0  # seconds; 0 = librados' default (wait forever)


def parse_rbd_path(path: str) -> tuple[str, str]:
    """``"rbd:pool/image"`` -> ``("pool", "image")``; ValueError otherwise."""
    if not path.startswith(RBD_PREFIX):
        raise ValueError(f'"{path}" does not start with "{RBD_PREFIX}"')
    spec = path[len(RBD_PREFIX):]
    if "@" in spec:
        raise ValueError(f'"{path}": snapshots (@snap) cannot be exported; use "rbd:pool/image"')
    parts = spec.split("/")
    if len(parts) == 3:
        raise ValueError(f'"{path}": RADOS namespaces are not supported; use "rbd:pool/image"')
    if len(parts) != 2 or not all(parts) or any(p != p.strip() for p in parts):
        raise ValueError(f'"{path}" is not an RBD image; use "rbd:pool/image"')
    return parts[0], parts[1]


# ---------------------------------------------------------------------------
# The shared cluster connection
# ---------------------------------------------------------------------------


class _Connection:
    def __init__(self, rados) -> None:
        self.rados = rados
        self.users = 0
        self.fsid: str = rados.get_fsid()


_connections: dict[CephSettings, _Connection] = {}
_conn_lock = threading.Lock()


def _acquire(settings: CephSettings) -> _Connection:
    """The process's connection for ``settings`` (blocking; connects once)."""
    rados_mod, _ = import_rados_rbd()
    with _conn_lock:
        c = _connections.get(settings)
        if c is None:
            conf = dict(CLIENT_OPTIONS)
            if settings.keyring:
                conf["keyring"] = settings.keyring
            if settings.op_timeout:
                # An operation the OSDs (or monitors) do not answer fails with
                # ETIMEDOUT after this long, as tcmu-runner's osd_op_timeout:
                # the initiator gets an error and fails over to another path.
                conf["rados_osd_op_timeout"] = conf["rados_mon_op_timeout"] = str(int(max(1, settings.op_timeout)))
            name = f"client.{settings.client}"
            if not Path(settings.conf).is_file():
                raise StorageError(errno.ENOENT, f"Ceph config {settings.conf} does not exist")
            try:
                r = rados_mod.Rados(conffile=settings.conf, rados_id=settings.client, conf=conf)
                r.connect()
            except rados_mod.Error as e:
                raise StorageError(errno.EIO, f"cannot connect to the Ceph cluster of {settings.conf} as {name}: "
                                   f"{e}") from e
            c = _connections[settings] = _Connection(r)
            log.info("connected to Ceph cluster %s (%s) as %s", c.fsid, settings.conf, name)
        c.users += 1
        return c


def _release(settings: CephSettings) -> None:
    """One image fewer.  After the last one the connection is dropped here but
    not shut down explicitly: others may still hold it (the shared
    reservation records' watches); librados shuts it down when the last
    reference goes (``Rados.__dealloc__``), after their watches."""
    with _conn_lock:
        c = _connections.get(settings)
        if c is None:
            return
        c.users -= 1
        if c.users <= 0:
            del _connections[settings]


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


class RbdBackend:
    """One RBD image, open for the life of the LUN."""

    thin = True  # discard deallocates (and reads back zeros, see the module doc)
    write_cache = False  # rbd cache is off: a completed write is on the OSDs

    def __init__(self, settings: CephSettings, conn: _Connection, ioctx, image, *, pool: str, name: str,
                 block_size: int, read_only: bool) -> None:
        self.settings = settings
        self.rados = conn.rados
        self.fsid = conn.fsid
        self.ioctx = ioctx
        self.image = image
        self.pool = pool
        self.pool_id: int = conn.rados.pool_lookup(pool)
        self.image_name = name
        self.image_id: str = image.id()
        self.path = f"{RBD_PREFIX}{pool}/{name}"
        self.block_size = block_size
        self.read_only = read_only
        self.image_size = image.size()
        self.size = self._usable(self.image_size)
        self._closing = False
        self._closed = False
        self._inflight = 0
        self._idle: asyncio.Event | None = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def open(cls, pool: str, name: str, settings: CephSettings, *, size: int | None = None, create: bool = False,
             block_size: int = 512, read_only: bool = False) -> "RbdBackend":
        """Open (with ``create`` and a ``size``: create) an image.  Blocking.

        An existing image keeps its size: ``size`` only sizes a new one (a
        different configured size is logged; resizing a shared image is
        ``rbd resize`` followed by a reload of every gateway)."""
        rados_mod, rbd_mod = import_rados_rbd()
        spec = f"{pool}/{name}"
        conn = _acquire(settings)
        ioctx = image = None
        try:
            try:
                ioctx = conn.rados.open_ioctx(pool)
            except rados_mod.ObjectNotFound:
                raise StorageError(errno.ENOENT, f"rbd:{spec}: no pool {pool!r} in cluster {conn.fsid}") from None
            try:
                image = rbd_mod.Image(ioctx, name, read_only=read_only)
            except rbd_mod.ImageNotFound:
                if not create or read_only or size is None:
                    why = ("the LUN is read-only" if read_only else
                           "add a size to create it" if size is None else "creating it was not asked")
                    raise StorageError(errno.ENOENT, f"rbd:{spec}: image does not exist ({why})") from None
                try:
                    rbd_mod.RBD().create(ioctx, name, size, old_format=False, features=rbd_mod.RBD_FEATURE_LAYERING)
                except rbd_mod.ImageExists:  # another gateway created it meanwhile: use that one
                    pass
                else:
                    log.info("rbd:%s: created (%d bytes, features: layering)", spec, size)
                image = rbd_mod.Image(ioctx, name, read_only=read_only)
            b = cls(settings, conn, ioctx, image, pool=pool, name=name, block_size=block_size, read_only=read_only)
            if b.size == 0:
                raise StorageError(errno.EINVAL, f"rbd:{spec}: image ({b.image_size} bytes) is smaller than one "
                                   f"{block_size}-byte block")
            if b.size != b.image_size:
                log.warning("rbd:%s: %d trailing bytes beyond the last whole block are unused", spec,
                            b.image_size - b.size)
            if size is not None and b.image_size != size:
                log.warning("rbd:%s: the image holds %d bytes, not the configured size %d: the image's size is "
                            "used (resize with `rbd resize`, then reload every gateway)", spec, b.image_size, size)
            if image.features() & rbd_mod.RBD_FEATURE_EXCLUSIVE_LOCK and not read_only:
                log.warning("rbd:%s: has the exclusive-lock feature: gateways writing it at the same time pass "
                            "the lock back and forth (slow); `rbd feature disable %s object-map fast-diff "
                            "exclusive-lock` when nothing else needs it", spec, spec)
            return b
        except BaseException as e:
            if image is not None:
                image.close()
            if ioctx is not None:
                ioctx.close()
            _release(settings)
            if isinstance(e, rbd_mod.Error) or isinstance(e, rados_mod.Error):
                raise StorageError(errno.EIO, f"rbd:{spec}: {e}") from e
            raise

    def _usable(self, image_size: int) -> int:
        return image_size - image_size % self.block_size

    def refresh_size(self) -> int:
        """Re-read the image size (after ``rbd resize``) and return the new
        usable size; the caller tells initiators.  Blocking (a header read)."""
        self._check(0, 0, False)
        try:
            self.image_size = self.image.size()
        except Exception as e:
            raise StorageError(errno.EIO, f"{self.path}: cannot read the image size: {e}") from e
        self.size = self._usable(self.image_size)
        return self.size

    # -- plumbing -------------------------------------------------------------------

    def _check(self, offset: int, length: int, writing: bool) -> None:
        if self._closing:
            raise StorageError(errno.EBADF, f"{self.path}: image is closed")
        if writing and self.read_only:
            raise StorageError(errno.EROFS, f"{self.path}: image is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(errno.EINVAL, f"{self.path}: range {offset}+{length} outside the image "
                                             f"(size {self.size})")

    async def _aio(self, what: str, start, *args):
        """Start one librbd aio call; its completion (on a librbd thread) comes
        back to this loop.  Returns (return value, extra callback args)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def deliver(rv: int, extra: tuple) -> None:  # on the loop
            self._op_done()
            if not fut.done():
                fut.set_result((rv, extra))

        def oncomplete(completion, *extra) -> None:  # librbd thread
            rv = completion.get_return_value()
            try:
                loop.call_soon_threadsafe(deliver, rv, extra)
            except RuntimeError:  # pragma: no cover - loop closed under us
                pass

        self._inflight += 1
        try:
            start(*args, oncomplete)
        except Exception as e:
            self._op_done()
            raise StorageError(errno.EIO, f"{what} {self.path}: {e}") from e
        # librbd cannot recall an operation it started: an aborted command
        # (ABORT TASK, LUN RESET, PREEMPT AND ABORT) ends only once its
        # operation has completed (SAM-5 §7.2), so a preempted node's write
        # never lands after the preemptor was told it is fenced.
        try:
            rv, extra = await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():
                await asyncio.wait([fut])
            raise
        if rv < 0:
            raise StorageError(-rv, f"{what} {self.path}: {errno.errorcode.get(-rv, rv)}")
        return rv, extra

    def _op_done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    # -- Backend API ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        if length == 0:
            return b""
        rv, extra = await self._aio("cannot read", self.image.aio_read, offset, length)
        data = extra[0]
        if data is None or len(data) != length:  # librbd reads holes as zeros: never short
            raise StorageError(errno.EIO, f"cannot read {self.path}: short read at {offset}")
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        # fua needs nothing more: without rbd cache a completed write is on the OSDs.
        if not isinstance(data, bytes):
            # The binding takes bytes (or a bytearray, which it does not copy):
            # a copy keeps librbd's input stable even if the command is aborted
            # and the fabric reuses its receive buffer meanwhile.
            data = bytes(data)
        self._check(offset, len(data), True)
        if not data:
            return
        await self._aio("cannot write", self.image.aio_write, data, offset)

    async def flush(self, offset: int = 0, length: int = 0) -> None:
        if self._closing:
            raise StorageError(errno.EBADF, f"{self.path}: image is closed")
        if self.read_only:
            return
        await self._aio("cannot flush", self.image.aio_flush)

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        if length:
            await self._aio("cannot discard", self.image.aio_discard, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        # A thin LU: deallocating reads back zeros (partial objects are zeroed).
        await self.discard(offset, length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length, False)
        if length == 0:
            return []
        scan = min(length, ALLOCATION_SCAN_MAX)
        extents = await asyncio.to_thread(self._allocation_sync, offset, scan)
        if scan < length:
            extents = _add_extent(extents, offset + scan, length - scan, True)
        return extents

    def _allocation_sync(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        found: list[tuple[int, int]] = []

        def cb(off: int, n: int, exists: bool) -> int:
            if exists:
                found.append((off, n))
            return 0

        try:
            # Against no snapshot: every extent holding data is reported.
            self.image.diff_iterate(offset, length, None, cb)
        except Exception as e:
            raise StorageError(errno.EIO, f"cannot map {self.path}: {e}") from e
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        for off, n in sorted(found):
            s, e = max(off, pos), min(off + n, end)
            if e <= s:
                continue
            if s > pos:
                out = _add_extent(out, pos, s - pos, False)
            out = _add_extent(out, s, e - s, True)
            pos = e
        if pos < end:
            out = _add_extent(out, pos, end - pos, False)
        return out

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._inflight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        try:
            if not self.read_only:
                self.image.flush()
            self.image.close()
            self.ioctx.close()
        finally:
            self._closed = True
            _release(self.settings)

    def __repr__(self) -> str:
        return f"<RbdBackend {self.path} id {self.image_id} {self.size} bytes{' ro' if self.read_only else ''}>"


def _add_extent(out: list[tuple[int, int, bool]], start: int, n: int, allocated: bool) -> list[tuple[int, int, bool]]:
    if out and out[-1][2] == allocated and out[-1][0] + out[-1][1] == start:
        s, m, a = out[-1]
        out[-1] = (s, m + n, a)
    else:
        out.append((start, n, allocated))
    return out


def open_rbd(path: str, settings: CephSettings, *, size: int | None = None, create: bool = False,
             block_size: int = 512, read_only: bool = False) -> RbdBackend:
    """Open ``"rbd:pool/image"`` (blocking; from asyncio use a thread)."""
    pool, name = parse_rbd_path(path)
    return RbdBackend.open(pool, name, settings, size=size, create=create, block_size=block_size,
                           read_only=read_only)
