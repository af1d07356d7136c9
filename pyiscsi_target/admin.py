"""The running server's local admin endpoint, and what hangs off it.

``pyiscsi-target status`` and ``pyiscsi-target reload`` talk to a running
``serve`` here.  The endpoint is local only, and access is the operating
system's business rather than a password of ours:

* POSIX: a Unix socket (default ``<state_dir>/admin.sock``) with mode 0600,
  so only the server's user (and root) can connect;
* Windows (or ``[admin] transport = "tcp"``): TCP on a loopback address, plus
  a random token in ``<state_dir>/admin.token`` (mode 0600) that every request
  must carry -- any local user can reach a loopback port, not every user can
  read the server's state directory.

Protocol: one JSON object per connection and line, one JSON answer line:
``{"op": "status"}`` → ``{"ok": true, "status": {...}}``;
``{"op": "reload"}`` → ``{"ok": bool, "applied": [...], "errors": [...], ...}``.

:class:`Operations` starts everything operational beside the iSCSI portals:
this endpoint, SIGHUP (= reload), the I/O counters (metrics.py) and the HTTP
port for Prometheus and the dashboard.  Nothing here is on the command path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import stat
import time
import tomllib
from pathlib import Path

from . import __version__

log = logging.getLogger("pyiscsi_target.admin")

__all__ = ["Operations", "AdminError", "Endpoint", "request", "endpoint_for_config", "snapshot", "format_status"]

MAX_REQUEST = 64 * 1024
IO_TIMEOUT = 10.0
TOKEN_FILE = "admin.token"


class AdminError(Exception):
    """The admin endpoint could not be reached or refused the request."""


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------

class Operations:
    """Admin endpoint + SIGHUP + telemetry + HTTP, for one TargetServer."""

    def __init__(self, server) -> None:
        from .metrics import Telemetry

        self.server = server
        self.started = time.time()
        self.telemetry = Telemetry(server)
        self.endpoint: asyncio.AbstractServer | None = None
        self.socket_path: Path | None = None
        self._socket_ino: tuple[int, int] | None = None
        self.token: str | None = None
        self.http = None
        self.reloader = None
        self._sampler: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, server) -> "Operations":
        """Start everything; OSError if the admin socket or HTTP port cannot be had."""
        from .reload import Reloader

        ops = cls(server)
        server.telemetry = ops.telemetry
        server.operations = ops
        loop = asyncio.get_running_loop()
        for iqn, dev in server.devices.items():
            ops.telemetry.attach(iqn, dev, loop.time)
        ops.reloader = Reloader(server, ops)
        try:
            if server.config.admin.enabled:
                await ops._start_endpoint()
            if server.config.metrics.listen is not None:
                from .dashboard import HttpServer

                ops.http = HttpServer(ops)
                await ops.http.start(server.config.metrics.listen)
        except BaseException:
            await ops.close()
            raise
        ops._sampler = loop.create_task(ops._sample_loop(), name="telemetry sampler")
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):  # no SIGHUP on Windows
            loop.add_signal_handler(signal.SIGHUP, ops._on_sighup)
        return ops

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.remove_signal_handler(signal.SIGHUP)
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.http is not None:
            await self.http.close()
        if self.endpoint is not None:
            self.endpoint.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.endpoint.wait_closed(), 2)
        self._remove_socket_file()
        if self.token is not None:
            with contextlib.suppress(OSError):
                (Path(self.server.config.server.state_dir) / TOKEN_FILE).unlink()
        for t in list(self._tasks):
            t.cancel()

    # -- SIGHUP -------------------------------------------------------------------
    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.server.config.source)
        t = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reloader.reload()  # logs its own outcome
        except Exception:
            log.exception("reload failed")

    async def _sample_loop(self) -> None:
        while True:
            self.telemetry.sample()
            await asyncio.sleep(1.0)

    # -- the endpoint ---------------------------------------------------------------
    async def _start_endpoint(self) -> None:
        a = self.server.config.admin
        state_dir = Path(self.server.config.server.state_dir)
        if a.transport == "unix":
            path = Path(a.socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            await _claim_socket_path(path)
            sock = _bound_private_unix_socket(path)
            self.socket_path = path
            st = os.stat(path)
            self._socket_ino = (st.st_dev, st.st_ino)
            self.endpoint = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)
            log.info("admin endpoint: %s", path)
        else:
            self.token = secrets.token_hex(32)
            state_dir.mkdir(parents=True, exist_ok=True)
            _write_private(state_dir / TOKEN_FILE, self.token + "\n")
            host, port = a.listen
            self.endpoint = await asyncio.start_server(self._client, host=host, port=port, limit=MAX_REQUEST,
                                                       reuse_address=True)
            log.info("admin endpoint: %s:%d (token in %s)", host, port, state_dir / TOKEN_FILE)

    def _remove_socket_file(self) -> None:
        # Only our own socket: a second server that failed to start must not
        # delete the socket of the one that is running.
        if self.socket_path is None or self._socket_ino is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_ino:
                self.socket_path.unlink()
        self.socket_path = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError) as e:
                answer = {"ok": False, "error": f"bad request: {e}"}
            else:
                answer = await self.handle(req)
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()

    async def handle(self, req: dict) -> dict:
        if self.token is not None and not hmac.compare_digest(str(req.get("token", "")), self.token):
            log.warning("admin request with a wrong or missing token refused")
            return {"ok": False, "error": "wrong or missing token"}
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": snapshot(self.server, self)}
        if op == "reload":
            return dict((await self.reloader.reload()).as_dict(), config=str(self.server.config.source))
        return {"ok": False, "error": f"unknown op {op!r}; known: status, reload"}


# sockaddr_un holds about 108 bytes: a deep state_dir would not fit.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def _unix_name(path: Path):
    """A name for bind()/connect() that fits sockaddr_un: the path itself, or,
    when it is too long, the same file reached through an O_PATH descriptor of
    its directory (``/proc/self/fd/N/name``, Linux)."""
    name = str(path)
    if len(os.fsencode(name)) <= _SUN_PATH_MAX or not hasattr(os, "O_PATH"):
        yield name
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a crashed server; refuse if a live server
    answers there (two servers on one state_dir would fight over PR state)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        with _unix_name(path) as name:
            _r, w = await asyncio.wait_for(asyncio.open_unix_connection(name), 2)
    except (OSError, asyncio.TimeoutError):
        path.unlink()
        return
    w.close()
    raise OSError(f"{path}: another pyiscsi-target is running with this admin socket (same state_dir?)")


def _bound_private_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that was never connectable with a
    wider mode: bind under a temporary name, chmod 0600, rename into place
    (chmod after binding at the final name leaves a window; umask is
    process-wide and would race the storage threads)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _unix_name(tmp) as name:
            sock.bind(name)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return sock


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The status snapshot (also served as /status.json to the dashboard)
# ---------------------------------------------------------------------------

# SessionParams field → RFC 7143 key name, in the order status shows them.
_KEY_NAMES = (
    ("header_digest", "HeaderDigest"), ("data_digest", "DataDigest"),
    ("max_recv_data_segment_length", "MaxRecvDataSegmentLength"),
    ("target_max_recv_data_segment_length", "TargetMaxRecvDataSegmentLength"),
    ("max_burst_length", "MaxBurstLength"), ("first_burst_length", "FirstBurstLength"),
    ("immediate_data", "ImmediateData"), ("initial_r2t", "InitialR2T"),
    ("max_outstanding_r2t", "MaxOutstandingR2T"), ("max_connections", "MaxConnections"),
    ("default_time2wait", "DefaultTime2Wait"), ("default_time2retain", "DefaultTime2Retain"),
    ("error_recovery_level", "ErrorRecoveryLevel"), ("data_pdu_in_order", "DataPDUInOrder"),
    ("data_sequence_in_order", "DataSequenceInOrder"), ("auth_method", "AuthMethod"),
    ("initiator_alias", "InitiatorAlias"),
)


def _key_value(field: str, v) -> str | int | None:
    if field in ("header_digest", "data_digest"):
        return "CRC32C" if v else "None"
    if isinstance(v, bool):
        return "Yes" if v else "No"
    return v


def _addr(a) -> str:
    if not a:
        return ""
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _pr(lu) -> dict | None:
    from .metrics import pr_state

    st = pr_state(lu)
    if st is None:
        return None
    holder = None
    if st.res_type is not None:
        if st.res_type.all_registrants:
            holder = "all registrants"
        elif st.res_holder is not None:
            holder = st.res_holder[0]
    rtype = st.res_type.name if st.res_type is not None else None
    return {
        "generation": st.generation,
        "type": rtype,
        "holder": holder,
        "aptpl": bool(st.aptpl),
        # Reservation keys are no secret: any initiator reads them with
        # PERSISTENT RESERVE IN (READ KEYS).
        "registrations": [{"key": f"0x{r.key:016x}", "initiator_port": r.initiator_port,
                           "target_port": r.target_port} for r in st.registrations],
    }


def _gateway(cfg) -> dict:
    """[gateway]: this gateway's name, ALUA target port group (= TPGT) and
    state, and its peers'."""
    gw = cfg.gateway
    return {"name": gw.name, "port_group": gw.port_group, "state": gw.state,
            "peers": [{"name": p.name, "port_group": p.port_group, "state": p.state,
                       "portals": [_addr(x) for x in p.portals]} for p in gw.peers]}


def snapshot(server, ops: Operations | None = None) -> dict:
    """Everything ``status`` shows, as plain JSON-able data.  No secrets:
    CHAP appears as present or not, never a name's secret."""
    cfg = server.config
    tel = ops.telemetry if ops else getattr(server, "telemetry", None)
    rates = tel.rates() if tel else {"total": (0.0, 0.0, 0.0, 0.0)}
    now = time.time()
    portals = []
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets or ():
            portals.append(_addr(sock.getsockname()))
    sessions_by_target: dict[str, int] = {}
    sessions = []
    for s in sorted(list(server.ctx.sessions.by_tsih.values()), key=lambda s: s.tsih):
        tname = s.target.name if s.target is not None else None
        if tname:
            sessions_by_target[tname] = sessions_by_target.get(tname, 0) + 1
        conns = []
        for cid, c in sorted(s.connections.items()):
            conns.append({
                "cid": cid,
                "peer": _addr(c.peer),
                "local": _addr(c.local),
                "header_digest": "CRC32C" if c.header_digest else "None",
                "data_digest": "CRC32C" if c.data_digest else "None",
                "in_flight": len(getattr(c, "running", ())) + len(getattr(c, "transfers", ())),
            })
        p = s.params
        params = {}
        for field, key in _KEY_NAMES:
            v = getattr(p, field, None)
            if v is not None:
                params[key] = _key_value(field, v)
        sessions.append({
            "tsih": s.tsih,
            "isid": s.isid.hex(),
            "initiator": s.initiator_name,
            "type": s.session_type,
            "target": tname,
            "connections": conns,
            "in_flight": sum(c["in_flight"] for c in conns),
            "params": params,
        })
    targets = []
    for iqn, dev in server.devices.items():
        entry = server.ctx.targets.get(iqn)
        luns = []
        for lun_id, lu in sorted(dev.luns.items()):
            b = lu.backend
            st = tel.stats(iqn, lun_id) if tel else None
            r = rates.get((iqn, lun_id), (0.0, 0.0, 0.0, 0.0))
            luns.append({
                "id": lun_id,
                "path": str(getattr(b, "path", "")),
                "size": b.size,
                "block_size": lu.block_size,
                "read_only": lu.read_only,
                "thin": lu.thin,
                "cache": getattr(b, "mode", "none"),
                "dirty_bytes": getattr(b, "dirty_bytes", 0),
                "serial": lu.identity.serial,
                "naa": lu.identity.naa.hex(),
                "reserved_by": lu.reserved_by.initiator_port if lu.reserved_by is not None else None,
                "pr": _pr(lu),
                # Several gateways: where the reservations are shared, and
                # which silent gateways this one fenced.
                "shared_reservations": lu.shared.status() if lu.shared is not None else None,
                "io": {
                    "read_ops": st.read_ops if st else 0,
                    "write_ops": st.write_ops if st else 0,
                    "read_bytes": st.read_bytes if st else 0,
                    "write_bytes": st.write_bytes if st else 0,
                    "read_iops": r[0], "write_iops": r[1], "read_bps": r[2], "write_bps": r[3],
                },
            })
        targets.append({
            "iqn": iqn,
            "alias": entry.alias if entry else None,
            "chap": bool(entry and entry.chap is not None),
            "acl": bool(entry and entry.acl is not None),
            "sessions": sessions_by_target.get(iqn, 0),
            "luns": luns,
        })
    tot = rates["total"]
    out = {
        "version": __version__,
        "pid": os.getpid(),
        "config": str(cfg.source),
        "started": ops.started if ops else None,
        "uptime": round(now - ops.started, 1) if ops else None,
        "portals": portals or [_addr(x) for x in cfg.server.listen],
        "gateway": _gateway(cfg),
        "dashboard": ops.http.url if ops and ops.http else None,
        "throughput": {"read_iops": tot[0], "write_iops": tot[1], "read_bps": tot[2], "write_bps": tot[3]},
        "targets": targets,
        "sessions": sessions,
        "logins": {"ok": tel.logins_ok, "failed": dict(tel.logins_failed)} if tel else None,
        "reloads": dict(tel.reloads) if tel else None,
    }
    if ops and ops.reloader and ops.reloader.last is not None:
        out["last_reload"] = ops.reloader.last.as_dict()
    return out


# ---------------------------------------------------------------------------
# Client side (the CLI)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Endpoint:
    transport: str            # "unix" | "tcp"
    path: Path | None = None  # unix
    host: str = "127.0.0.1"   # tcp
    port: int = 0
    token_file: Path | None = None

    def __str__(self) -> str:
        return str(self.path) if self.transport == "unix" else f"{_addr((self.host, self.port))}"


def endpoint_for_config(config_path: str | Path) -> Endpoint:
    """Where the server started with ``config_path`` listens for admin requests.

    Reads only what it needs ([server] state_dir, [admin]) with the same
    defaults and path rules as config.py, so ``status`` and ``reload`` still
    find the server while the rest of the file is being edited (and maybe
    invalid: that is what reload then reports)."""
    from .config import AdminConfig, ConfigError, ServerConfig, _resolve, parse_portal

    p = Path(config_path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot find the admin endpoint: {e}") from None
    base = p.absolute().parent
    server = data.get("server") if isinstance(data.get("server"), dict) else {}
    admin = data.get("admin") if isinstance(data.get("admin"), dict) else {}
    state_dir = _resolve(base, str(server.get("state_dir", ServerConfig().state_dir)))
    transport = admin.get("transport", "tcp" if os.name == "nt" else "unix")
    if admin.get("enabled", True) is False:
        raise ConfigError(f"{p}: [admin] enabled = false: the server has no admin endpoint")
    if transport == "tcp":
        host, port = AdminConfig().listen
        if "listen" in admin:
            try:
                host, port = parse_portal(admin["listen"])
            except ValueError as e:
                raise ConfigError(f"{p}: admin.listen: {e}") from None
        return Endpoint("tcp", host=host, port=port, token_file=state_dir / TOKEN_FILE)
    sock = admin.get("socket")
    return Endpoint("unix", path=_resolve(base, sock) if isinstance(sock, str) else state_dir / "admin.sock")


def request(ep: Endpoint, op: str, timeout: float = 60.0) -> dict:
    """Send one request, return the answer; AdminError if nobody answers."""
    req: dict = {"op": op}
    try:
        if ep.transport == "unix":
            if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - Windows
                raise AdminError('Unix sockets are not available here; set [admin] transport = "tcp"')
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            with _unix_name(Path(ep.path)) as name:
                s.connect(name)
        else:
            if ep.token_file is not None:
                try:
                    req["token"] = ep.token_file.read_text().strip()
                except OSError as e:
                    raise AdminError(f"cannot read the admin token {ep.token_file}: {e.strerror or e} "
                                     "(run as the server's user)") from None
            s = socket.create_connection((ep.host, ep.port), timeout=timeout)
            s.settimeout(timeout)
    except FileNotFoundError:
        raise AdminError(f"no server is running with admin socket {ep} (is 'pyiscsi-target serve' running "
                         "with this config?)") from None
    except PermissionError:
        raise AdminError(f"{ep}: permission denied (run as the server's user or root)") from None
    except ConnectionRefusedError:
        raise AdminError(f"{ep}: connection refused: no server is running there") from None
    except OSError as e:
        raise AdminError(f"{ep}: {e.strerror or e}") from None
    with s:
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise AdminError(f"{ep}: {e.strerror or e}") from None
    try:
        return json.loads(buf)
    except ValueError:
        raise AdminError(f"{ep}: the server sent no valid answer") from None


# ---------------------------------------------------------------------------
# Human format of a snapshot (``pyiscsi-target status``)
# ---------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}B"


def _rate(bps: float, iops: float) -> str:
    return f"{_size(bps)}/s ({iops:.0f} IOPS)"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + f"{m}m{s:02d}s"


def format_status(st: dict) -> str:
    t = st["throughput"]
    out = [
        f"pyiscsi-target {st['version']}, pid {st['pid']}, up {_duration(st.get('uptime'))}, config {st['config']}",
        f"portals:    {', '.join(st['portals'])}",
    ]
    gw = st.get("gateway")
    if gw:
        line = f"gateway:    {gw['name']}, port group {gw['port_group']} ({gw['state']})"
        for p in gw["peers"]:
            line += f"; peer {p['name']}: group {p['port_group']} ({p['state']})"
        out.append(line)
    if st.get("dashboard"):
        out.append(f"dashboard:  {st['dashboard']}  (Prometheus: {st['dashboard']}metrics)")
    out.append(f"throughput: read {_rate(t['read_bps'], t['read_iops'])}, write {_rate(t['write_bps'], t['write_iops'])}")
    lg = st.get("logins") or {}
    failed = ", ".join(f"{k} {v}" for k, v in sorted((lg.get("failed") or {}).items())) or "none"
    out.append(f"logins:     {lg.get('ok', 0)} ok; refused: {failed}")
    for tg in st["targets"]:
        flags = [f"CHAP {'yes' if tg['chap'] else 'no'}", f"ACL {'yes' if tg['acl'] else 'no'}",
                 f"{tg['sessions']} session{'s' if tg['sessions'] != 1 else ''}"]
        alias = f'  alias "{tg["alias"]}"' if tg.get("alias") else ""
        out.append(f"target {tg['iqn']}{alias}  ({', '.join(flags)})")
        for lun in tg["luns"]:
            cache = lun["cache"]
            if cache != "none":
                cache += f", dirty {_size(lun['dirty_bytes'])}"
            ro = ", read-only" if lun["read_only"] else ""
            out.append(f"  LUN {lun['id']}: {_size(lun['size'])}, {lun['block_size']}-byte blocks{ro}, cache {cache}, "
                       f"serial {lun['serial']}  {lun['path']}")
            io = lun["io"]
            out.append(f"         I/O: read {_rate(io['read_bps'], io['read_iops'])}, "
                       f"write {_rate(io['write_bps'], io['write_iops'])}; "
                       f"total {_size(io['read_bytes'])} read, {_size(io['write_bytes'])} written")
            pr = lun.get("pr")
            if pr is not None:
                keys = ", ".join(f"{r['key']} ({r['initiator_port']})" for r in pr["registrations"]) or "none"
                res = f"{pr['type']} held by {pr['holder']}" if pr["type"] else "no reservation"
                out.append(f"         PR: {res}; registered keys: {keys}; generation {pr['generation']}")
            if lun.get("reserved_by"):
                out.append(f"         SPC-2 RESERVE held by {lun['reserved_by']}")
            shared = lun.get("shared_reservations")
            if shared:
                fenced = ", ".join(f"instance {gid} at {addr}" for gid, addr in sorted(shared["fenced"].items()))
                out.append(f"         reservations shared in {shared['record']} (version {shared['version']}, "
                           f"{shared['gateways']} other gateway{'s' if shared['gateways'] != 1 else ''})"
                           + (f"; fenced: {fenced}" if fenced else ""))
    out.append(f"sessions:   {len(st['sessions'])}")
    for s in st["sessions"]:
        where = f"target {s['target']}" if s["target"] else "discovery"
        out.append(f"  TSIH {s['tsih']}  {s['initiator']}  ISID {s['isid']}  {where}  "
                   f"({s['in_flight']} command{'s' if s['in_flight'] != 1 else ''} in flight)")
        for c in s["connections"]:
            out.append(f"    CID {c['cid']}: {c['peer']} -> {c['local']}, digests header {c['header_digest']} "
                       f"data {c['data_digest']}, {c['in_flight']} in flight")
        keys = ", ".join(f"{k}={v}" for k, v in s["params"].items() if v is not None and k not in
                         ("HeaderDigest", "DataDigest"))
        out.append(f"    {keys}")
    last = st.get("last_reload")
    if last:
        out.append(f"last reload: {'applied' if last['ok'] else 'refused'} at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['time']))}")
    return "\n".join(out)

