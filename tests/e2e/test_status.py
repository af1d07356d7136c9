"""`pyiscsi-target status` against the real server with real clients."""

from __future__ import annotations

import re

import pytest

from tests.e2e.ops_support import LibiscsiSession, cli, pr_out, status, wait_for, write10
from tests.support.initiator import Initiator
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config

SECRET = "Sup3rSecretChap"   # must never show in status output or in the log
MUTUAL = "An0therSecret99"
QSD_NAME = "iqn.2026-11.test:qsd"


@pytest.fixture
def served(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    # CHAP on the quorum target: status says "CHAP yes", never a secret.
    cfg.write_text(cfg.read_text().replace(
        'alias = "quorum"',
        f'alias = "quorum"\n  [target.chap]\n  user = "node"\n  secret = "{SECRET}"\n'
        f'  mutual_user = "storage"\n  mutual_secret = "{MUTUAL}"'))
    cfg.chmod(0o600)
    t = start_target(cfg, "127.0.0.1", port)
    yield t
    rc = t.stop()
    assert rc == 0, t.log_text()[-3000:]


def test_status_shows_libiscsi_session_and_pr_registration(served, tmp_path):
    t = served
    qsd = LibiscsiSession(t.portal, DATA, 0, QSD_NAME, tmp_path)
    ini = Initiator("127.0.0.1", t.port, name="iqn.2026-11.test:node1")
    try:
        st = wait_for(lambda: (s := status(t.config)) and any(x["initiator"] == QSD_NAME for x in s["sessions"]) and s,
                      what="the qemu-storage-daemon (libiscsi) session in status")
        ini.login(DATA)
        ini.clear_unit_attentions()
        assert pr_out(ini, 0, sark=0x1234ABCD).status == 0                # REGISTER
        assert pr_out(ini, 1, key=0x1234ABCD, type_=5).status == 0        # RESERVE, WE registrants only
        assert write10(ini, 0, b"\xa5" * 4096).status == 0

        st = status(t.config)
        sess = {s["initiator"]: s for s in st["sessions"]}
        q = sess[QSD_NAME]
        assert q["target"] == DATA and q["type"] == "Normal"
        assert re.fullmatch(r"[0-9a-f]{12}", q["isid"]) and q["tsih"] > 0
        c = q["connections"][0]
        assert c["peer"].startswith("127.0.0.1:") and c["local"] == f"127.0.0.1:{t.port}"
        assert c["header_digest"] in ("None", "CRC32C") and c["data_digest"] in ("None", "CRC32C")
        assert isinstance(c["in_flight"], int)
        assert {"MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "ImmediateData",
                "InitialR2T"} <= set(q["params"])
        mine = sess["iqn.2026-11.test:node1"]
        assert mine["isid"] == "400001370000" and mine["params"]["MaxBurstLength"] == 262144

        data = next(x for x in st["targets"] if x["iqn"] == DATA)
        assert data["sessions"] == 2 and data["chap"] is False
        lun0 = data["luns"][0]
        assert lun0["size"] == 128 << 20 and lun0["block_size"] == 512 and lun0["cache"] == "none"
        pr = lun0["pr"]
        assert pr["type"] == "WRITE_EXCLUSIVE_REGISTRANTS_ONLY"
        assert pr["holder"] == "iqn.2026-11.test:node1,i,0x400001370000"
        assert [r["key"] for r in pr["registrations"]] == ["0x000000001234abcd"]
        assert lun0["io"]["write_bytes"] == 4096 and lun0["io"]["write_ops"] == 1
        quorum = next(x for x in st["targets"] if x["iqn"] == QUORUM)
        assert quorum["chap"] is True and quorum["alias"] == "quorum"
        assert st["portals"] == [f"127.0.0.1:{t.port}"]
        assert st["logins"]["ok"] >= 2

        human = cli("status", t.config)
        assert human.returncode == 0, human.stderr
        out = human.stdout
        assert QSD_NAME in out and "iqn.2026-11.test:node1" in out
        assert f"TSIH {q['tsih']}" in out and f"ISID {q['isid']}" in out
        assert "0x000000001234abcd" in out and "WRITE_EXCLUSIVE_REGISTRANTS_ONLY held by" in out
        assert "CHAP yes" in out and "MaxBurstLength=" in out
        for text in (out, cli("status", t.config, "--json").stdout, t.log_text()):
            assert SECRET not in text and MUTUAL not in text
    finally:
        ini.close()
        qsd.stop()


def test_status_counts_refused_logins_by_reason(served):
    t = served
    from tests.support.initiator import LoginRefused

    ini = Initiator("127.0.0.1", t.port, name="iqn.2026-11.test:nobody")
    try:
        with pytest.raises(LoginRefused):
            ini.login("iqn.2026-11.org.example:no-such-target")
    finally:
        ini.close()
    st = wait_for(lambda: (s := status(t.config))["logins"]["failed"] and s, what="the refused login counted")
    assert st["logins"]["failed"] == {"not_found": 1}


def test_status_without_a_server_exits_1(tmp_path):
    cfg = write_config(tmp_path, free_port())
    p = cli("status", cfg)
    assert p.returncode == 1
    assert "no server is running" in p.stderr and "admin.sock" in p.stderr


def test_admin_socket_is_private(served):
    import stat as st_

    sock = served.config.parent / "state" / "admin.sock"
    mode = sock.stat().st_mode
    assert st_.S_ISSOCK(mode) and st_.S_IMODE(mode) == 0o600



def test_status_into_a_closed_pipe_is_not_an_error(served):
    """`pyiscsi-target status --json | head`: the reader may leave before
    the status is written; here it closes its end before the child writes."""
    import os
    import subprocess
    import sys

    from tests.e2e.ops_support import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "pyiscsi_target", "status", "--json", str(served.config)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # nobody reads: the first write gets EPIPE
    err = p.stderr.read().decode(errors="replace")
    assert p.wait(60) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
