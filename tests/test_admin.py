"""The admin endpoint's protocol (pyiscsi_target.admin), without a target:
one JSON request line, one JSON answer line; the token of the TCP transport;
unknown and malformed requests refused; the CLI's endpoint lookup and the
check-config lines naming the endpoint and the metrics address."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from pyiscsi_target import admin
from pyiscsi_target.admin import AdminError, Endpoint, Operations, endpoint_for_config, request
from pyiscsi_target.cli import summarize
from pyiscsi_target.config import load_config

SNAP = {"version": "t", "targets": [], "sessions": []}


class _Result:
    def as_dict(self):
        return {"ok": True, "applied": ["target iqn.x:new added"], "errors": [], "warnings": []}


class _Reloader:
    calls = 0

    async def reload(self):
        _Reloader.calls += 1
        return _Result()


class _Server:
    class config:
        source = Path("/etc/pyiscsi-target/cluster.toml")


def _ops(token: str | None = None) -> Operations:
    ops = Operations.__new__(Operations)   # no telemetry, portals or HTTP: just the request handling
    ops.server, ops.token, ops.reloader = _Server(), token, _Reloader()
    return ops


@pytest.fixture(autouse=True)
def _fake_snapshot(monkeypatch):
    monkeypatch.setattr(admin, "snapshot", lambda server, ops=None: SNAP)


def run(coro):
    return asyncio.run(coro)


# -- handle(): the request → answer mapping ------------------------------------------

def test_status_and_reload_answers():
    ops = _ops()
    assert run(ops.handle({"op": "status"})) == {"ok": True, "status": SNAP}
    before = _Reloader.calls
    a = run(ops.handle({"op": "reload"}))
    assert a["ok"] is True and a["applied"] == ["target iqn.x:new added"]
    assert a["config"] == "/etc/pyiscsi-target/cluster.toml" and _Reloader.calls == before + 1


@pytest.mark.parametrize("req", [{"op": "shutdown"}, {"op": "status;reload"}, {}, {"op": None}, {"op": ["status"]}])
def test_unknown_requests_refused(req):
    before = _Reloader.calls
    a = run(_ops().handle(req))
    assert a["ok"] is False and "unknown op" in a["error"] and "status, reload" in a["error"]
    assert _Reloader.calls == before


@pytest.mark.parametrize("req", [{"op": "status"}, {"op": "status", "token": ""}, {"op": "status", "token": "x" * 64},
                                 {"op": "reload", "token": None}, {"op": "reload", "token": "ab" * 31 + "a"}])
def test_token_required_on_tcp(req):
    before = _Reloader.calls
    a = run(_ops(token="ab" * 32).handle(req))
    assert a == {"ok": False, "error": "wrong or missing token"}
    assert _Reloader.calls == before   # a refused reload does nothing


def test_right_token_accepted():
    assert run(_ops(token="ab" * 32).handle({"op": "status", "token": "ab" * 32}))["status"] == SNAP


# -- the wire: real sockets, the CLI's request() ---------------------------------------

async def _serve_and_ask(ops: Operations, server_coro, ask):
    srv = await server_coro(ops._client)
    try:
        return await asyncio.to_thread(ask, srv)
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="POSIX transport")
def test_unix_transport_round_trip(tmp_path):
    path = tmp_path / "admin.sock"
    ep = Endpoint("unix", path=path)
    answer = run(_serve_and_ask(_ops(), lambda cb: asyncio.start_unix_server(cb, path=str(path)),
                                lambda srv: request(ep, "status", timeout=10)))
    assert answer == {"ok": True, "status": SNAP}


def _tcp(cb):
    return asyncio.start_server(cb, host="127.0.0.1", port=0)


def test_tcp_transport_token_from_file(tmp_path):
    token = "cd" * 32
    (tmp_path / "admin.token").write_text(token + "\n")

    def ask(srv):
        port = srv.sockets[0].getsockname()[1]
        good = request(Endpoint("tcp", host="127.0.0.1", port=port, token_file=tmp_path / "admin.token"), "status")
        none = request(Endpoint("tcp", host="127.0.0.1", port=port), "status")
        (tmp_path / "wrong.token").write_text("ef" * 32)
        wrong = request(Endpoint("tcp", host="127.0.0.1", port=port, token_file=tmp_path / "wrong.token"), "reload")
        return good, none, wrong

    good, none, wrong = run(_serve_and_ask(_ops(token=token), _tcp, ask))
    assert good == {"ok": True, "status": SNAP}
    assert none == wrong == {"ok": False, "error": "wrong or missing token"}


def test_unreadable_token_file_is_a_clear_error(tmp_path):
    ep = Endpoint("tcp", host="127.0.0.1", port=1, token_file=tmp_path / "missing.token")
    with pytest.raises(AdminError, match="cannot read the admin token"):
        request(ep, "status")


def _raw(port: int, payload: bytes) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


@pytest.mark.parametrize("payload", [b"not json\n", b"[1, 2]\n", b'"status"\n', b"\xff\xfe\n"])
def test_malformed_requests_get_an_error_answer(payload):
    answer = run(_serve_and_ask(_ops(), _tcp, lambda srv: _raw(srv.sockets[0].getsockname()[1], payload)))
    assert answer["ok"] is False and answer["error"].startswith("bad request")


def test_oversized_request_refused():
    big = json.dumps({"op": "status", "pad": "x" * (admin.MAX_REQUEST + 10)}).encode() + b"\n"

    def ask(srv):
        try:
            return _raw(srv.sockets[0].getsockname()[1], big)
        except (ConnectionError, ValueError):
            return None   # closed before answering: refused too

    answer = run(_serve_and_ask(_ops(), _tcp, ask))
    assert answer is None or answer["ok"] is False


def test_nobody_listening(tmp_path):
    with pytest.raises(AdminError, match="no server is running"):
        request(Endpoint("unix", path=tmp_path / "admin.sock"), "status")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AdminError, match="refused"):
        request(Endpoint("tcp", host="127.0.0.1", port=port), "status")


# -- where the CLI looks, and what check-config says ----------------------------------

def _cfg(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text('[server]\nlisten = ["127.0.0.1:3260"]\nstate_dir = "st"\n' + extra +
                 '\n[[target]]\niqn = "iqn.2026-11.t:a"\n  [[target.lun]]\n  id = 0\n  path = "a.img"\n'
                 '  size = "1MiB"\n')
    return p


def test_endpoint_for_config(tmp_path):
    if os.name != "nt":
        ep = endpoint_for_config(_cfg(tmp_path, ""))
        assert ep.transport == "unix" and ep.path == tmp_path / "st" / "admin.sock"
    ep = endpoint_for_config(_cfg(tmp_path, '[admin]\ntransport = "tcp"\nlisten = "127.0.0.1:3999"\n'))
    assert (ep.transport, ep.host, ep.port, ep.token_file) == ("tcp", "127.0.0.1", 3999, tmp_path / "st" / "admin.token")
    with pytest.raises(Exception, match="enabled = false"):
        endpoint_for_config(_cfg(tmp_path, "[admin]\nenabled = false\n"))


@pytest.mark.skipif(sys.platform == "win32", reason="unix socket default")
def test_check_config_lists_admin_and_metrics(tmp_path):
    out = summarize(load_config(_cfg(tmp_path, '[metrics]\nlisten = "127.0.0.1:9180"\n')))
    assert f"admin:     unix socket {tmp_path / 'st' / 'admin.sock'} (mode 0600)" in out
    assert "metrics:   http://127.0.0.1:9180/metrics (Prometheus), dashboard http://127.0.0.1:9180/" in out
    out = summarize(load_config(_cfg(tmp_path, '[admin]\ntransport = "tcp"\nlisten = "[::1]:3262"\n')))
    assert f"admin:     tcp [::1]:3262, token in {tmp_path / 'st' / 'admin.token'}" in out
    assert "metrics:   not served" in out
    out = summarize(load_config(_cfg(tmp_path, "[admin]\nenabled = false\n")))
    assert "admin:     disabled" in out
