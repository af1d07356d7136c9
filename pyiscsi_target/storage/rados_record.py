"""A small versioned record in one RADOS object, shared by several processes.

Used for state that several gateways must agree on (a LU's reservations):
compare-and-swap writes on the object's version, and watch/notify so each
process hears of the others' changes.  What the bytes mean is not this
module's business.

librados specifics that shape it (measured, shared/reference/ceph-test-cluster.md):

* ``WriteOp.assert_version`` makes a write fail with ERANGE/EOVERFLOW when the
  object changed since it was read: the compare-and-swap.  The version of a
  read is ``Ioctx.get_last_version()``, which is per I/O context, so each
  record has its own context and a lock around read-then-version.
* A notify returns once every watcher acknowledged.  The acknowledgement is
  sent when the watch callback returns, so the callback waits for the event
  loop to finish applying the change: when ``announce`` returns, every live
  gateway enforces the new state.
* A dead watcher makes notifies wait the full timeout until its watch
  expires; a timeout therefore means "some gateway is gone", and RADOS stays
  the authority (the survivor's state is already written).
* Watches can miss notifies across a reconnect; the error callback makes the
  owner re-read (``on_lost``) and re-establishes the watch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

__all__ = ["RadosRecord"]

#: librados pings watches every 5 s; shorter timeouts were seen to miss notifies.
WATCH_TIMEOUT_S = 30
#: How long a change waits for every other gateway to apply it.
NOTIFY_TIMEOUT_MS = 10_000
MAX_RECORD = 4 * 1024 * 1024


class RadosRecord:
    """One RADOS object holding a versioned record (see module doc)."""

    def __init__(self, cluster, pool: str, name: str, *, namespace: str = "",
                 notify_timeout_ms: int = NOTIFY_TIMEOUT_MS) -> None:
        from .ceph_bindings import import_rados_rbd

        self._rados, _ = import_rados_rbd()
        self.cluster = cluster
        self.pool = pool
        self.name = name
        self.namespace = namespace
        self.notify_timeout_ms = notify_timeout_ms
        self._ioctx = None
        self._lock = threading.Lock()  # read + get_last_version as one step
        self._watch = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[bytes], Awaitable[None]] | None = None
        self._on_lost: Callable[[], Awaitable[None]] | None = None
        self._closed = False

    def _ctx(self):
        if self._ioctx is None:
            ioctx = self.cluster.open_ioctx(self.pool)
            if self.namespace:
                ioctx.set_namespace(self.namespace)
            self._ioctx = ioctx
        return self._ioctx

    # --- blocking parts (run in a thread) ---------------------------------------

    def _load_blocking(self) -> tuple[bytes | None, int]:
        rados = self._rados
        with self._lock:
            ioctx = self._ctx()
            try:
                data = ioctx.read(self.name, MAX_RECORD)
            except rados.ObjectNotFound:
                return None, 0
            version = ioctx.get_last_version()
        return (data or None), version

    def _store_blocking(self, data: bytes, version: int) -> int | None:
        rados = self._rados
        with self._lock:
            ioctx = self._ctx()
            with rados.WriteOpCtx() as op:
                if version == 0:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                else:
                    op.assert_version(version)
                op.write_full(data)
                try:
                    ioctx.operate_write_op(op, self.name)
                except rados.ObjectExists:
                    return None
                except rados.ObjectNotFound:
                    return None
                except rados.Error as e:
                    # assert_version: ERANGE (object older than asserted,
                    # cannot happen unless recreated) or EOVERFLOW (newer).
                    if getattr(e, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):
                        return None
                    raise
            return ioctx.get_last_version()

    def _ensure_exists_blocking(self) -> None:
        """A watch needs the object: create it empty unless it exists."""
        rados = self._rados
        with self._lock:
            ioctx = self._ctx()
            with rados.WriteOpCtx() as op:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                try:
                    ioctx.operate_write_op(op, self.name)
                except rados.ObjectExists:
                    pass

    def _watch_blocking(self) -> None:
        self._watch = self._ctx().watch(self.name, self._watch_callback, self._watch_error,
                                        WATCH_TIMEOUT_S)

    def _notify_blocking(self, message: bytes) -> None:
        rados = self._rados
        try:
            # The message is a str in the Python binding: send text (JSON).
            self._ctx().notify(self.name, message.decode("utf-8"), self.notify_timeout_ms)
        except rados.TimedOut:
            log.warning("%s/%s: a gateway did not acknowledge a change within %d ms; the record "
                        "holds the change and a gateway that lost contact re-reads it",
                        self.pool, self.name, self.notify_timeout_ms)

    # --- callbacks from librados threads ---------------------------------------

    def _watch_callback(self, notify_id, notifier_id, watch_id, data) -> None:
        loop, handler = self._loop, self._on_message
        if loop is None or handler is None or self._closed or not data:
            return
        fut = asyncio.run_coroutine_threadsafe(handler(bytes(data)), loop)
        try:
            # Acknowledge (by returning) only once the change is enforced here.
            fut.result(timeout=self.notify_timeout_ms / 1000)
        except Exception:
            log.exception("%s/%s: applying a change from another gateway failed", self.pool, self.name)

    def _watch_error(self, err) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        log.warning("%s/%s: watch lost (%s); re-reading the record and watching again", self.pool, self.name, err)
        asyncio.run_coroutine_threadsafe(self._rewatch(), loop)

    async def _rewatch(self) -> None:
        old, self._watch = self._watch, None
        if old is not None:
            try:
                await asyncio.to_thread(old.close)
            except Exception:
                pass
        while not self._closed:
            try:
                await asyncio.to_thread(self._watch_blocking)
                break
            except Exception as e:
                log.warning("%s/%s: watching again failed (%s); retrying", self.pool, self.name, e)
                await asyncio.sleep(1)
        if self._on_lost is not None and not self._closed:
            await self._on_lost()

    # --- the SharedObject interface --------------------------------------------

    async def load(self) -> tuple[bytes | None, int]:
        return await asyncio.to_thread(self._load_blocking)

    async def store(self, data: bytes, version: int) -> int | None:
        if len(data) > MAX_RECORD:
            raise ValueError("record too large")
        return await asyncio.to_thread(self._store_blocking, data, version)

    async def announce(self, message: bytes) -> None:
        await asyncio.to_thread(self._notify_blocking, message)

    async def listen(self, on_message: Callable[[bytes], Awaitable[None]],
                     on_lost: Callable[[], Awaitable[None]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_lost = on_message, on_lost
        await asyncio.to_thread(self._ensure_exists_blocking)
        await asyncio.to_thread(self._watch_blocking)

    async def close(self) -> None:
        self._closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                await asyncio.to_thread(watch.close)
            except Exception as e:  # the cluster may be gone already
                log.debug("%s/%s: closing the watch: %s", self.pool, self.name, e)
        if self._ioctx is not None:
            ioctx, self._ioctx = self._ioctx, None
            await asyncio.to_thread(ioctx.close)
