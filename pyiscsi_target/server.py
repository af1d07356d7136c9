"""asyncio glue: portals, one protocol object per TCP connection, shutdown.

All protocol decisions live in the sans-IO :class:`~.iscsi.connection.IscsiConnection`;
this module only moves bytes, runs the actions it asks for (SCSI commands,
task management) as asyncio tasks, arms its timer, and stops cleanly on
SIGINT/SIGTERM: portals closed, sessions closed, every LU flushed, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import deque
from functools import partial

from .iscsi.connection import Close, Execute, IscsiConnection, SessionStarted, TaskManagement, TmfFunction
from .payload import PENDING, DeferredPayload
from .iscsi.acl import AccessList
from .iscsi.chap import ALGORITHM_NAMES, ChapCredentials
from .iscsi.limits import ConnectionLimiter
from .iscsi.session import PortalContext, TargetEntry
from .scsi.command import TmfResponse

log = logging.getLogger("pyiscsi_target.server")

# Data-In a connection may owe before further commands wait for it to read.
READ_BUDGET = 64 * 1024 * 1024


def _owed(a: Execute) -> int:
    """Data-In a command may produce: its expected length unless it carries Data-Out."""
    return 0 if len(a.task.data_out) else a.task.expected_length


# Stop reading from an initiator while this much of our output is still queued:
# a client that does not read cannot make us buffer unbounded Data-In.
WRITE_HIGH_WATER = 4 * 1024 * 1024


def offers_from_config(c) -> dict[str, str]:
    """RFC 7143 §13 keys the target offers, from the ``[iscsi]`` config section."""
    yn = {True: "Yes", False: "No"}
    return {
        "MaxRecvDataSegmentLength": str(c.max_recv_data_segment_length),
        "MaxBurstLength": str(c.max_burst_length),
        "FirstBurstLength": str(c.first_burst_length),
        "ImmediateData": yn[c.immediate_data],
        "InitialR2T": yn[c.initial_r2t],
        "MaxOutstandingR2T": str(c.max_outstanding_r2t),
        "HeaderDigest": ",".join(c.header_digest),
        "DataDigest": ",".join(c.data_digest),
        "DefaultTime2Wait": str(c.default_time2wait),
        "DefaultTime2Retain": str(c.default_time2retain),
        "MaxConnections": str(c.max_connections),
        "ErrorRecoveryLevel": "0",
        "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes",
        "AuthMethod": "None",
    }


def chap_credentials(c) -> ChapCredentials | None:
    """``[target.chap]`` / ``[discovery.chap]`` config → what the login checks."""
    if c is None:
        return None
    return ChapCredentials(c.user, c.secret.encode(), c.mutual_user,
                           c.mutual_secret.encode() if c.mutual_secret is not None else None,
                           tuple(ALGORITHM_NAMES[a] for a in c.algorithms))


def access_list(t) -> AccessList | None:
    inits, nets = getattr(t, "allow_initiators", ()), getattr(t, "allow_networks", ())
    return AccessList.build(inits, nets) if inits or nets else None


class IscsiProtocol(asyncio.BufferedProtocol):
    """One TCP connection.  A BufferedProtocol: the socket reads straight into
    the connection's buffers, so a large data segment is copied once, kernel
    to its final buffer (see PduReader.get_buffer)."""

    #: The socket's descriptor for sendfile (connection_made); -1: never.
    _sock_fd = -1

    def __init__(self, server: "TargetServer"):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: IscsiConnection | None = None
        self.tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._wq: list = []                 # output gathered during this loop iteration
        self._flush_scheduled = False
        self._in_receive = False
        # Commands received but not started because the initiator is not
        # reading what we already owe it (see _may_start).
        self._held: deque = deque()
        self._read_bytes = 0               # Data-In owed by commands started and not answered
        self._writing_paused = False

    # -- asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        local = transport.get_extra_info("sockname")[:2]
        peer = transport.get_extra_info("peername")[:2]
        if not self.server.admit(self, peer):      # connection limits (security)
            transport.abort()
            return
        self.conn = IscsiConnection(self.server.ctx, local, peer, self.loop.time())
        self.conn.protocol = self
        # Every read from the socket asks get_buffer first: let the loop call
        # the reader's own (one Python call less per read).  uvloop takes the
        # protocol's methods once, when the transport gets its protocol, so
        # hand the protocol over again (Transport.set_protocol) to have it
        # take this one; asyncio's own loops look the method up on each read.
        self.get_buffer = self.conn.reader.get_buffer
        transport.set_protocol(self)
        # For sendfile of zero-copy Data-In payloads (payload.py), where the
        # platform has it; the transport still owns the socket.
        sock = transport.get_extra_info("socket")
        self._sock_fd = sock.fileno() if sock is not None and hasattr(os, "sendfile") else -1
        self.server.protocols.add(self)
        self.server.slow_down(self)                # after refused logins from this source
        self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        # The BufferedProtocol method; connection_made replaces it on the
        # instance with the reader's own, which this only forwards to.
        return self.conn.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes, self.loop.time())
        self._after_input()

    def data_received(self, data: bytes) -> None:   # plain Protocol use (tests, other loops)
        self.conn.receive_data(data, self.loop.time())
        self._after_input()

    def _after_input(self) -> None:
        # Commands that finish in their first step answer inside this call;
        # their responses join this chunk's batch (flushed just below).
        self._in_receive = True
        try:
            self._pump()
        finally:
            self._in_receive = False
        # Everything this chunk of input produced (R2Ts, NOP-Ins, responses
        # of the commands that finished inline, ...) is one batch: send it
        # now rather than a loop iteration later.
        out = self.conn.take_output()
        if out:
            if not self._wq and not PENDING:
                # The whole queue is this batch (_flush, without the call).
                if not self.transport.is_closing():
                    self.transport.writelines(out)
                return
            self._wq += out
        if self._wq:
            self._flush()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._start_held()

    def connection_lost(self, exc) -> None:
        self.server.protocols.discard(self)
        self._held.clear()
        if PENDING:
            for item in self._wq:  # never to be sent: no longer pending
                if isinstance(item, DeferredPayload):
                    item.done()
        if self.conn is not None:
            # Free the receive buffers now, not when the cyclic GC gets to
            # the protocol <-> connection cycle (many short connections).
            self.conn.reader.release()
            self.conn.protocol = None
        if self._timer:
            self._timer.cancel()
        conn = self.conn
        if conn is None:
            return
        self.server.forget(self)
        if conn.phase.value != "closed":
            conn.close("connection lost")
            conn.take_actions()
        s = conn.session
        if s is not None and s.connections.get(conn.cid) is conn:
            del s.connections[conn.cid]
            if not s.connections:
                # ERL 0: the session ends with its last connection (no Time2Retain recovery).
                self.server.ctx.sessions.remove(s)
                if s.nexus is not None and self.server.ctx.sessions.find(s.key) is None:
                    s.target.device.remove_nexus(s.nexus)
        if s is not None:
            log.info("connection closed: %s TSIH %d CID %d", conn._who(), s.tsih, conn.cid,
                     extra=conn.log_fields("disconnect", tsih=s.tsih, cid=conn.cid))

    # -- running what the connection asks for -------------------------------------
    def _pump(self) -> None:
        conn = self.conn
        out = conn.take_output()
        if out:
            # Coalesce: every response produced in this loop iteration (many
            # commands complete together at high queue depth) leaves in one
            # writelines, i.e. one send syscall instead of one per command.
            self._wq.extend(out)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        for action in conn.take_actions():
            if type(action) is Execute:
                if not self._read_bytes and not self._held and not self._writing_paused:
                    self._start(action)     # nothing owed: _may_start's answer, without the call
                elif self._held or not self._may_start(action):
                    self._held.append(action)
                else:
                    self._start(action)
            elif type(action) is TaskManagement:
                self._drop_held(action)
                self._spawn(self._task_management(action))
            elif type(action) is SessionStarted:
                if self.server.telemetry is not None:
                    self.server.telemetry.login_ok()
                for old in action.reinstated:
                    proto = getattr(old, "protocol", None)
                    if proto is not None:
                        proto._pump()
            elif type(action) is Close:
                self._flush()
                self.transport.close()
        self._arm_timer()

    def _flush(self) -> None:
        self._flush_scheduled = False
        wq, self._wq = self._wq, []
        if not wq:
            return
        if PENDING:
            self._flush_deferred(wq)
        elif not self.transport.is_closing():
            self.transport.writelines(wq)

    def _flush_deferred(self, wq: list) -> None:
        """Like _flush, with zero-copy payloads (payload.py) in the queue: each
        goes out by sendfile when nothing is queued ahead of it on the socket
        (order), the rest of it (socket full) and any other case as bytes."""
        t = self.transport
        closing = t.is_closing()
        batch: list = []
        for item in wq:
            if not isinstance(item, DeferredPayload):
                batch.append(item)
                continue
            if closing:
                item.done()
                continue
            if batch:
                t.writelines(batch)
                batch = []
            sent = 0
            if self._sock_fd >= 0 and not t.get_write_buffer_size():
                try:
                    sent = item.send_to(self._sock_fd)
                except OSError:  # the connection broke: the transport reports it
                    sent = 0
            if sent < len(item):
                t.write(item.materialize(sent))
            item.done()
        if batch and not closing:
            t.writelines(batch)

    def _spawn(self, coro) -> None:
        t = self.loop.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # -- starting commands, within a budget of Data-In owed --------------------------
    def _may_start(self, a: Execute) -> bool:
        """A client that stops reading must not make us produce unbounded
        Data-In: while our output is paused, or while READ_BUDGET bytes of
        reads are already owed, new commands wait here (in order) instead of
        running.  One command always may run, so progress never stops."""
        if self._writing_paused:
            return False
        return self._read_bytes == 0 or self._read_bytes + _owed(a) <= READ_BUDGET

    def _start(self, a: Execute) -> None:
        task = a.task
        owed = 0 if len(task.data_out) else task.expected_length      # _owed(a)
        self._read_bytes += owed
        t = a.device.submit(a.task, partial(self._scsi_done, a.itt, owed), self.loop)
        if not t.done():
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def _start_held(self) -> None:
        while self._held and self._may_start(self._held[0]):
            self._start(self._held.popleft())

    def _drop_held(self, tmf: TaskManagement) -> None:
        """A TMF also covers commands still waiting to start: they end as aborted."""
        if not self._held:
            return
        fn = tmf.function
        keep = deque()
        for a in self._held:
            # Every held command is this connection's, so of the TMF's own nexus.
            if fn == TmfFunction.ABORT_TASK:
                hit = a.itt == tmf.rtt
            else:
                hit = fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET) or a.task.lun == tmf.lun
            if hit:
                self.conn.task_aborted(a.itt)
            else:
                keep.append(a)
        self._held = keep

    def _scsi_done(self, itt: int, owed: int, result) -> None:
        self._read_bytes -= owed
        if result is None:           # aborted by a task management function
            self.conn.task_aborted(itt)
        else:
            self.conn.scsi_done(itt, result)
        if self._held:
            self._start_held()
        if self._in_receive and not self._held:
            # Answered inside the _pump of _after_input, which collects the
            # output once for the whole chunk: no _pump per command.  (A
            # command's completion adds output only, no actions.)
            return
        self._pump()
        if not self._in_receive and len(self.tasks) <= 1 and self._wq:
            # Nothing else in flight (this command's task is still counted):
            # no batch to wait for, answer now (queue depth 1 latency).
            self._flush()

    async def _task_management(self, a: TaskManagement) -> None:
        dev, nexus, lun = a.device, a.nexus, a.lun
        fn = a.function
        try:
            if fn == TmfFunction.ABORT_TASK:
                r = await dev.abort_task(nexus, lun, a.rtt)
            elif fn == TmfFunction.ABORT_TASK_SET:
                r = await dev.abort_task_set(nexus, lun)
            elif fn == TmfFunction.CLEAR_TASK_SET:
                r = await dev.clear_task_set(nexus, lun)
            elif fn == TmfFunction.LOGICAL_UNIT_RESET:
                r = await dev.lun_reset(nexus, lun)
            else:
                r = await dev.target_reset(nexus, cold=fn == TmfFunction.TARGET_COLD_RESET)
        except Exception:
            log.exception("task management function %d failed", fn)
            r = TmfResponse.REJECTED
        self.conn.tmf_done(a.itt, int(r))
        self._pump()
        if fn == TmfFunction.TARGET_COLD_RESET and int(r) == 0:
            # §11.5.1: a cold reset closes every connection to the target.
            for proto in list(self.server.protocols):
                s = proto.conn.session if proto.conn else None
                if s is not None and s.target is not None and s.target.device is dev:
                    proto.conn.close("target cold reset")
                    proto._pump()

    # -- timer -------------------------------------------------------------------
    def _arm_timer(self) -> None:
        """Keep one timer armed no later than the connection's next deadline.

        Deadlines mostly move later (each PDU received pushes the keepalive
        back), so a timer that fires early just re-arms: far cheaper than
        cancelling and re-creating a TimerHandle for every PDU.
        """
        conn = self.conn
        if conn is None:
            at = None
        elif self._timer is not None and not conn.timer_moved:
            return      # only last_rx moved the deadline, later: the armed timer re-arms when it fires
        else:
            conn.timer_moved = False
            at = conn.get_timer()
        if at is None:
            if self._timer:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.conn.handle_timer(self.loop.time())
        self._pump()


class TargetServer:
    def __init__(self, config, devices: dict):
        self.config = config
        self.devices = devices
        srv = config.server
        targets = {t.iqn: TargetEntry(t.iqn, devices[t.iqn], t.alias, chap=chap_credentials(t.chap),
                                      acl=access_list(t)) for t in config.targets}
        self.ctx = PortalContext(targets=targets, offers=offers_from_config(config.iscsi),
                                 portals=list(srv.listen), nop_interval=srv.nop_interval,
                                 nop_timeout=srv.nop_timeout, login_timeout=srv.login_timeout,
                                 max_sessions=srv.max_sessions,
                                 discovery_chap=chap_credentials(getattr(config, "discovery_chap", None)),
                                 **gateway_context(config))
        self.limiter = ConnectionLimiter(getattr(srv, "max_connections_total", 1024),
                                         getattr(srv, "max_connections_per_address", 64),
                                         getattr(srv, "login_failure_delay", 1.0))
        self.protocols: set[IscsiProtocol] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.telemetry = None       # metrics.Telemetry once admin.Operations started (login counts)

    # -- admission limits (iscsi/limits.py) ---------------------------------------
    def admit(self, proto: IscsiProtocol, peer) -> bool:
        why = self.limiter.admit(peer[0])
        if why is None:
            return True
        if self.limiter.should_log(peer[0], proto.loop.time()):
            log.warning("connection refused: %s: %s", _fmt_addr(peer), why,
                        extra={"event": "connection_refused", "address": _fmt_addr(peer), "reason": why})
        return False

    def slow_down(self, proto: IscsiProtocol) -> None:
        conn = proto.conn
        delay = self.limiter.delay(conn.peer[0], proto.loop.time())
        if delay <= 0:
            return
        # Read nothing from this source for a while: a password guesser gets
        # one try per delay per connection, and the connection limit caps those.
        proto.transport.pause_reading()
        conn.login_deadline += delay

        def resume():
            if not proto.transport.is_closing() and conn.phase.value == "login":
                proto.transport.resume_reading()
        proto.loop.call_later(delay, resume)

    def forget(self, proto: IscsiProtocol) -> None:
        conn = proto.conn
        host = conn.peer[0]
        self.limiter.release(host)
        failure = conn.login.failure
        if failure is not None:
            self.limiter.login_failed(host, failure.status, proto.loop.time())
            if self.telemetry is not None:
                self.telemetry.login_failed(failure.status)
        elif conn.session is not None:
            self.limiter.login_succeeded(host)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.server.listen:
            server = await loop.create_server(lambda: IscsiProtocol(self), host=host, port=port,
                                              reuse_address=True, backlog=128)
            self.servers.append(server)
            for sock in server.sockets:
                log.info("listening on %s", _fmt_addr(sock.getsockname()))

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.close()
        pending = [t for p in list(self.protocols) for t in p.tasks]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for dev in self.devices.values():
            await dev.close()


def gateway_context(config) -> dict:
    """[gateway] for the fabric: this gateway's port group is the TPGT of its
    portals (login TargetPortalGroupTag, SendTargets) and the relative target
    port id of its I_T nexuses; peers' portals go into SendTargets."""
    gw = config.gateway
    return {"tpgt": gw.port_group,
            "peer_portals": [(h, p, peer.port_group) for peer in gw.peers for h, p in peer.portals]}


def _fmt_addr(a) -> str:
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config, *, stop: asyncio.Event | None = None) -> int:
    from .assemble import build_devices

    for warning in getattr(config, "warnings", ()):
        log.warning("config: %s", warning)
    stop = stop or asyncio.Event()
    fenced: list[bool] = []

    def on_fenced() -> None:
        # Another gateway blocklisted our cluster client (storage/rados_record.py):
        # every RBD operation now fails, so stop and let the service manager
        # start a new instance that rejoins.
        fenced.append(True)
        stop.set()

    devices = await build_devices(config, on_fenced=on_fenced)
    server = TargetServer(config, devices)
    server.on_fenced = on_fenced
    # Signal handlers before anything listens: a SIGTERM that arrives as soon
    # as the portal accepts must still flush and exit 0, not kill the process.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):   # Windows: KeyboardInterrupt ends it
            pass
    # Admin endpoint, SIGHUP reload, metrics/dashboard HTTP: up before the
    # portals, so whoever sees port 3260 open can also ask for status.
    from .admin import Operations

    try:
        ops = await Operations.start(server)
    except OSError as exc:
        log.error("cannot start the admin endpoint or metrics port: %s", exc)
        for dev in devices.values():
            await dev.close()
        return 1
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await ops.close()
        for dev in devices.values():
            await dev.close()
        return 1
    log.info("serving %d target(s): %s", len(server.devices), ", ".join(server.devices))
    gw = config.gateway
    log.info("gateway %s: target port group %d (%s)%s", gw.name, gw.port_group, gw.state,
             "".join(f"; peer {p.name}: group {p.port_group} ({p.state})" for p in gw.peers))
    try:
        await stop.wait()
    except asyncio.CancelledError:
        # Windows: no loop signal handlers, so Ctrl-C (also how NSSM stops a
        # service) makes asyncio.run cancel this task.  Stop as on SIGTERM:
        # close the sessions and flush every LUN (write-back data included).
        log.info("interrupted")
    await ops.close()
    log.info("shutting down: closing sessions and flushing LUNs")
    await server.stop()
    if fenced:
        log.critical("stopped: fenced by another gateway (exit status %d)", EXIT_FENCED)
        return EXIT_FENCED
    log.info("stopped")
    return 0


#: Exit status of a gateway fenced by another one (systemd Restart=on-failure restarts it).
EXIT_FENCED = 3


def run(config) -> int:
    """Run the target until SIGINT/SIGTERM; returns the process exit status."""
    from .tuning import tune_malloc

    tune_malloc()
    status = None
    if sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            status = uvloop.run(serve(config))
    if status is None:
        status = asyncio.run(serve(config))
    if status == EXIT_FENCED:
        # Everything is flushed and closed; skip the interpreter's clean-up:
        # librados objects of a blocklisted client crash when finalized.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
