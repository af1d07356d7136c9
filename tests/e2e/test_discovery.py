"""SendTargets over real clients: the address the initiator used, never a wildcard."""

from __future__ import annotations

import subprocess

from tests.conftest import require
from tests.support.initiator import Initiator
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config


def _ls(url: str) -> str:
    p = subprocess.run([require("iscsi-ls"), url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_wildcard_portals_advertise_the_address_connected_to(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port, listen=[f"0.0.0.0:{port}", f"[::]:{port}"])
    t = start_target(cfg, "127.0.0.1", port)
    try:
        v4 = _ls(f"iscsi://127.0.0.1:{port}")
        assert f"Target:{QUORUM} Portal:127.0.0.1:{port},1" in v4
        assert f"Target:{DATA} Portal:127.0.0.1:{port},1" in v4
        assert "0.0.0.0" not in v4
        v6 = _ls(f"iscsi://[::1]:{port}")
        assert f"Target:{DATA} Portal:[::1]:{port},1" in v6, v6
        assert "[::]" not in v6
        # A second loopback address on the same wildcard socket is reported as such.
        other = _ls(f"iscsi://127.0.0.2:{port}")
        assert f"Portal:127.0.0.2:{port},1" in other, other
    finally:
        assert t.stop() == 0


def test_send_targets_by_name_and_in_a_normal_session(target):
    ini = Initiator(target.host, target.port, isid=bytes.fromhex("400001370010"))
    ini.login(None, session_type="Discovery")
    assert ini.text([("SendTargets", QUORUM)]) == [("TargetName", QUORUM),
                                                   ("TargetAddress", f"{target.host}:{target.port},1")]
    assert ini.text([("SendTargets", "iqn.2026-11.org.example:none")]) == []
    everything = ini.text([("SendTargets", "All")])
    assert [v for k, v in everything if k == "TargetName"] == sorted([QUORUM, DATA])
    assert ini.logout() == 0
    ini.close()
    # In a normal session SendTargets reports the session's own target only.
    ini = Initiator(target.host, target.port, isid=bytes.fromhex("400001370011"))
    ini.login(DATA)
    assert ini.text([("SendTargets", "All")]) == [("TargetName", DATA),
                                                  ("TargetAddress", f"{target.host}:{target.port},1")]
    ini.close()
