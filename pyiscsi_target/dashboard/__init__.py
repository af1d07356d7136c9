"""The metrics/dashboard HTTP port: ``/metrics`` for Prometheus, ``/`` a small
read-only page, ``/status.json`` the data it polls.

A tiny asyncio HTTP/1.1 server (GET/HEAD, one request per connection) on the
server's own event loop, so a snapshot is consistent without locks and the
page needs no framework.  The page's script and style are files beside this
module -- no external JS, nothing fetched from elsewhere (the CSP forbids it).
It changes nothing: there is no POST, and the admin endpoint is not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from importlib import resources

log = logging.getLogger("pyiscsi_target.dashboard")

__all__ = ["HttpServer"]

MAX_HEAD = 8192
IO_TIMEOUT = 10.0
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
HEADERS = (
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Content-Security-Policy: default-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n"
)


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


class HttpServer:
    def __init__(self, ops) -> None:
        self.ops = ops
        self.server: asyncio.AbstractServer | None = None
        self.url = ""
        self._registry = None
        self._clients: set[asyncio.Task] = set()

    async def start(self, listen: tuple[str, int]) -> None:
        host, port = listen
        self.server = await asyncio.start_server(self._client, host=host, port=port, reuse_address=True,
                                                 limit=MAX_HEAD)
        sock = self.server.sockets[0].getsockname()
        shown = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        self.url = f"http://{shown}:{sock[1]}/"
        log.info("dashboard %s, Prometheus metrics %smetrics", self.url, self.url)
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("dashboard and /metrics on %s are reachable from the network: they show initiator "
                        "names and addresses (never secrets) to anyone who can connect", self.url)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._clients):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def registry(self):
        if self._registry is None:
            from ..metrics import make_registry

            self._registry = make_registry(self.ops.server, self.ops.telemetry)
        return self._registry

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await self._send(writer, 400, "text/plain", b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, "text/plain", b"read-only: GET only\n", extra="Allow: GET, HEAD\r\n")
                return
            status, ctype, body = self.route(target)
            await self._send(writer, status, ctype, body, head_only=method == "HEAD")
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("dashboard request failed")
        finally:
            self._clients.discard(task)
            writer.close()

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path in STATIC:
            name, ctype = STATIC[path]
            return 200, ctype, _static(name)
        if path == "/status.json":
            from ..admin import snapshot

            st = snapshot(self.ops.server, self.ops)
            st["series"] = self.ops.telemetry.series()
            return 200, "application/json", json.dumps(st, default=str).encode()
        if path == "/metrics":
            try:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            except ImportError:
                return 503, "text/plain", b"prometheus_client is not installed (pip install prometheus_client)\n"
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry())
        if path == "/favicon.ico":
            return 204, "image/x-icon", b""
        return 404, "text/plain", b"not found\n"

    @staticmethod
    async def _send(writer, status: int, ctype: str, body: bytes, *, head_only: bool = False, extra: str = "") -> None:
        reason = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n{HEADERS}{extra}\r\n")
        writer.write(head.encode("latin-1") + (b"" if head_only else body))
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
