"""``[admin] transport = "tcp"`` (the Windows default) on the live server:
``status`` and ``reload`` work with the token from <state_dir>/admin.token
and fail without it."""

from __future__ import annotations

import json
import socket
import stat

from tests.e2e.ops_support import cli
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config


def _ask(port: int, req: dict) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def test_tcp_admin_needs_the_token(tmp_path):
    port, aport = free_port(), free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text() + f'\n[admin]\ntransport = "tcp"\nlisten = "127.0.0.1:{aport}"\n')
    t = start_target(cfg, "127.0.0.1", port)
    token_file = tmp_path / "state" / "admin.token"
    try:
        assert not (tmp_path / "state" / "admin.sock").exists()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) == 64

        # with the token (read by the CLI from the state dir): works
        p = cli("status", cfg, "--json")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert {x["iqn"] for x in st["targets"]} == {QUORUM, DATA}
        assert token not in p.stdout
        p = cli("status", cfg)
        assert p.returncode == 0 and f"target {DATA}" in p.stdout
        p = cli("reload", cfg)
        assert p.returncode == 0, p.stderr

        # without it: refused, by the server and by the CLI
        assert _ask(aport, {"op": "status"}) == {"ok": False, "error": "wrong or missing token"}
        assert _ask(aport, {"op": "reload", "token": "0" * 64}) == {"ok": False, "error": "wrong or missing token"}
        assert _ask(aport, {"op": "status", "token": token})["ok"] is True
        token_file.rename(tmp_path / "moved.token")
        p = cli("status", cfg, "--json")
        assert p.returncode == 1 and "cannot read the admin token" in p.stderr and not p.stdout
        token_file.write_text("f" * 64 + "\n")       # a stale/forged token
        p = cli("status", cfg)
        assert p.returncode == 1 and "wrong or missing token" in p.stderr
        assert "admin request with a wrong or missing token refused" in t.log_text()
    finally:
        assert t.stop() == 0, t.log_text()[-3000:]
    assert not token_file.exists()  # removed at exit
    assert token not in t.log_text()
