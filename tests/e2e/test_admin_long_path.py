"""The admin socket works under a state_dir deeper than sockaddr_un allows."""

from __future__ import annotations

from tests.e2e.ops_support import cli
from tests.support.target import free_port, start_target, write_config


def test_status_with_a_state_dir_path_longer_than_sun_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    port = free_port()
    cfg = write_config(deep, port)
    assert len(str(deep / "state" / "admin.sock")) > 108
    t = start_target(cfg, "127.0.0.1", port)
    try:
        p = cli("status", cfg)
        assert p.returncode == 0, p.stderr
        assert "iqn.2026-11.org.example:data" in p.stdout
    finally:
        assert t.stop() == 0
