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
* A notify returns once every watcher acknowledged; the acknowledgement is
  sent when the watch callback returns, so the callback waits for the event
  loop to finish applying the change.  The Python binding does not say *who*
  failed to acknowledge, so each process watches an inbox object of its own
  (``<record>.gw.<instance id>``) and the announcer notifies every
  registered inbox separately: a timeout then names the silent gateway.
  When ``announce`` returns, every live gateway enforces the new state.
* A dead watcher makes a notify wait the full timeout until its watch
  expires; RADOS stays the authority (the new state is already written).
* Watches can miss notifies across a reconnect; the error callback makes the
  owner re-read (``on_lost``) and re-establishes the watch.

Fencing.  A gateway that does not acknowledge a change in time is either
dead or cut off -- and a cut-off gateway may still let a preempted node
write.  So the announcer *blocklists* it (``ceph osd blocklist add`` of that
client instance, what librbd does to break an exclusive lock): from then on
the OSDs refuse every operation of that instance and drop its watch.  The
registry ``<record>.gateways`` (one xattr per process: instance id ->
address, written before it starts watching) is where the announcer finds
the inboxes and the address to blocklist.  The fenced process learns it from
its watch (ESHUTDOWN, how librados reports "blocklisted") and calls
``on_fenced``: the server stops and exits with status 3; a service manager
restarts it as a new instance.  Needs the mon capability ``profile rbd``
(which allows ``osd blocklist``).
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
#: How long a change waits for every other gateway to apply it before the
#: silent ones are fenced.  Applying takes milliseconds; 5 s is a stalled
#: or dead process, and stays well inside initiators' command timeouts.
NOTIFY_TIMEOUT_MS = 5_000
#: How long a fenced instance stays blocklisted (it never comes back: a
#: restarted gateway is a new instance).
FENCE_SECONDS = 24 * 3600
MAX_RECORD = 1024 * 1024


class RadosRecord:
    """One RADOS object holding a versioned record (see module doc)."""

    def __init__(self, cluster, pool: str, name: str, *, namespace: str = "",
                 notify_timeout_ms: int = NOTIFY_TIMEOUT_MS,
                 on_fenced: Callable[[], None] | None = None) -> None:
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
        self.on_fenced = on_fenced
        self._broken_watches: list = []
        self.registry = f"{name}.gateways"
        #: Instances this process fenced (gid -> address), for tests and status.
        self.fenced: dict[int, str] = {}
        #: Other registered processes at the last announcement (or start).
        self.peers_seen = 0

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

    def _inbox(self, gid: int) -> str:
        return f"{self.name}.gw.{gid}"

    def _ensure_exists_blocking(self, obj: str) -> None:
        """A watch needs its object: create it empty unless it exists."""
        rados = self._rados
        with self._lock:
            ioctx = self._ctx()
            with rados.WriteOpCtx() as op:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                try:
                    ioctx.operate_write_op(op, obj)
                except rados.ObjectExists:
                    pass

    def _watch_blocking(self) -> None:
        self._watch = self._ctx().watch(self._inbox(self.cluster.get_instance_id()), self._watch_callback,
                                        self._watch_error, WATCH_TIMEOUT_S)

    def _register_blocking(self) -> None:
        """Record this instance's id and address for whoever may have to fence it."""
        gid = self.cluster.get_instance_id()
        addrs = self.cluster.get_addrs()
        with self._lock:
            self._ctx().set_xattr(self.registry, str(gid), str(addrs).encode())

    def _unregister_blocking(self) -> None:
        rados = self._rados
        gid = self.cluster.get_instance_id()
        with self._lock:
            for fn, args in ((self._ctx().rm_xattr, (self.registry, str(gid))),
                             (self._ctx().remove_object, (self._inbox(gid),))):
                try:
                    fn(*args)
                except rados.Error:
                    pass

    def _peers_blocking(self) -> list[int]:
        """Instance ids of every other registered process."""
        me = self.cluster.get_instance_id()
        rados = self._rados
        with self._lock:
            try:
                return [int(k) for k, _ in self._ctx().get_xattrs(self.registry) if k.isdigit() and int(k) != me]
            except rados.ObjectNotFound:
                return []

    def _forget_blocking(self, gid: int) -> None:
        rados = self._rados
        with self._lock:
            try:
                self._ctx().rm_xattr(self.registry, str(gid))
            except rados.Error:
                pass

    def _fence_blocking(self, gid: int) -> str | None:
        rados = self._rados
        with self._lock:
            try:
                addr = self._ctx().get_xattr(self.registry, str(gid)).decode()
            except (rados.ObjectNotFound, rados.NoData):
                return None
        # get_addrs() gives "[v2:127.0.0.1:0/123,v1:...]" or one address:
        # blocklist every address of the instance.
        for one in addr.strip("[]").split(","):
            one = one.strip()
            if one:
                self.cluster.blocklist_add(one.removeprefix("v2:").removeprefix("v1:"), FENCE_SECONDS)
        self._forget_blocking(gid)
        with self._lock:
            try:
                self._ctx().remove_object(self._inbox(gid))
            except rados.Error:
                pass
        return addr

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

    def _watch_error(self, watch_id, err) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        if abs(int(err)) == errno.ESHUTDOWN:  # librados: this instance is blocklisted
            loop.call_soon_threadsafe(self._fenced_now)
            return
        log.warning("%s/%s: watch lost (%s); re-reading the record and watching again", self.pool, self.name, err)
        asyncio.run_coroutine_threadsafe(self._rewatch(), loop)

    def _fenced_now(self) -> None:
        if self._closed:
            return
        log.critical("%s/%s: this gateway was fenced (blocklisted) by another gateway that "
                     "did not hear from it in time; stopping", self.pool, self.name)
        self._closed = True
        if self.on_fenced is not None:
            self.on_fenced()

    async def _rewatch(self) -> None:
        old, self._watch = self._watch, None
        if old is not None:
            try:
                await asyncio.to_thread(old.close)
            except Exception:
                # The binding tries again from its destructor, and a second
                # unwatch of a broken watch corrupts librados' heap: keep it.
                self._broken_watches.append(old)
        while not self._closed:
            try:
                await asyncio.to_thread(self._register_blocking)
                await asyncio.to_thread(self._ensure_exists_blocking, self._inbox(self.cluster.get_instance_id()))
                await asyncio.to_thread(self._watch_blocking)
                break
            except Exception as e:
                if isinstance(e, self._rados.ConnectionShutdown) or getattr(e, "errno", None) == errno.ESHUTDOWN:
                    # A blocklisted instance's operations fail this way (the
                    # watch itself reported only "not connected").
                    self._fenced_now()
                    return
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
        """Notify every other registered gateway's inbox at once; fence the
        ones that do not acknowledge within the timeout."""
        peers = await asyncio.to_thread(self._peers_blocking)
        self.peers_seen = len(peers)
        if not peers:
            return
        text = message.decode("utf-8")  # a str in the Python binding: send text (JSON)
        results = await asyncio.gather(*(self._notify_one(gid, text) for gid in peers))
        for gid, rc in zip(peers, results):
            if rc == -errno.ENOENT:  # its inbox is gone: it closed without unregistering
                await asyncio.to_thread(self._forget_blocking, gid)
                self.peers_seen -= 1
            elif rc == -errno.ETIMEDOUT:
                await self._fence(gid)
                self.peers_seen -= 1
            elif rc != 0:
                log.error("%s/%s: telling gateway instance %d of a change failed (%d)", self.pool, self.name, gid, rc)

    async def _notify_one(self, gid: int, text: str) -> int:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def oncomplete(completion, rc, acks, timeouts) -> None:  # librados thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(rc))

        def start() -> None:
            with self._lock:
                self._ctx().aio_notify(self._inbox(gid), oncomplete, text, self.notify_timeout_ms)

        try:
            await asyncio.to_thread(start)
        except self._rados.ObjectNotFound:
            return -errno.ENOENT
        return int(await done)

    async def _fence(self, gid: int) -> None:
        try:
            addr = await asyncio.to_thread(self._fence_blocking, gid)
        except Exception as e:
            log.error("%s/%s: gateway instance %d did not acknowledge a change within %d ms and "
                      "fencing it failed: %s", self.pool, self.name, gid, self.notify_timeout_ms, e)
            return
        if addr is not None:
            self.fenced[gid] = addr
            log.warning("%s/%s: gateway instance %d at %s did not acknowledge a change within %d ms: "
                        "fenced (blocklisted) so it cannot act on stale reservations", self.pool,
                        self.name, gid, addr, self.notify_timeout_ms)

    async def listen(self, on_message: Callable[[bytes], Awaitable[None]],
                     on_lost: Callable[[], Awaitable[None]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_lost = on_message, on_lost
        # Registered before watching, watching before the owner reads the
        # record: a change is either in what it reads or announced to it.
        await asyncio.to_thread(self._register_blocking)
        await asyncio.to_thread(self._ensure_exists_blocking, self._inbox(self.cluster.get_instance_id()))
        await asyncio.to_thread(self._watch_blocking)
        self.peers_seen = len(await asyncio.to_thread(self._peers_blocking))

    def status(self) -> dict:
        return {"record": f"RADOS {self.pool}/{self.name}", "gateways": self.peers_seen,
                "fenced": {str(gid): addr for gid, addr in self.fenced.items()}}

    async def close(self) -> None:
        self._closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                await asyncio.to_thread(watch.close)
                await asyncio.to_thread(self._unregister_blocking)
            except Exception as e:  # the cluster may be gone already
                log.debug("%s/%s: closing the watch: %s", self.pool, self.name, e)
        if self._ioctx is not None:
            ioctx, self._ioctx = self._ioctx, None
            await asyncio.to_thread(ioctx.close)
