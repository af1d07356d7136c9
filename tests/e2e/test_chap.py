"""CHAP and ACLs with real clients: libiscsi's iscsi-inq / iscsi-ls against the live server.

libiscsi 1.19: ``iscsi://user%secret@host:port/iqn/lun`` sends the one-way
CHAP credentials (it offers AuthMethod=CHAP,None and CHAP_A=5); the URL
arguments ``target_user``/``target_password`` make it demand mutual CHAP and
check the target's CHAP_N and CHAP_R.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require
from tests.support.initiator import Initiator, LoginRefused
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config

USER, SECRET = "cluster", "quorum-secret1"            # 14 bytes
TUSER, TSECRET = "quorum-target", "target-secret2"    # mutual
NODE1 = "iqn.2026-11.test:node1"


def _config(tmp_path, port, quorum_extra: str, top: str = "") -> object:
    cfg = write_config(tmp_path, port)
    text = cfg.read_text()
    anchor = f'iqn = "{QUORUM}"\nalias = "quorum"\n'
    assert anchor in text
    text = text.replace(anchor, anchor + quorum_extra + "\n")
    cfg.write_text(top + "\n" + text)
    os.chmod(cfg, 0o600)
    return cfg


@pytest.fixture
def chap_target(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, port, f"""
[target.chap]
user = "{USER}"
secret = "{SECRET}"
mutual_user = "{TUSER}"
mutual_secret = "{TSECRET}"
""")
    t = start_target(cfg, "127.0.0.1", port)
    yield t
    assert t.stop() == 0, t.log_text()[-3000:]


def inq(url: str, name: str = NODE1, env=None):
    return subprocess.run([require("iscsi-inq"), "-i", name, url], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_libiscsi_chap_one_way_and_mutual(chap_target):
    t = chap_target
    base = f"iscsi://{USER}%{SECRET}@{t.portal}/{QUORUM}/0"
    # one-way: right secret
    r = inq(base)
    assert r.returncode == 0, r.stderr
    assert "PYISCSI" in r.stdout
    # wrong secret: refused
    r = inq(f"iscsi://{USER}%wrong-secret-00@{t.portal}/{QUORUM}/0")
    assert r.returncode != 0
    # no credentials: refused (AuthMethod=None not allowed on this target)
    r = inq(f"iscsi://{t.portal}/{QUORUM}/0")
    assert r.returncode != 0
    # mutual: the target proves itself with the mutual secret
    r = inq(base + f"?target_user={TUSER}&target_password={TSECRET}")
    assert r.returncode == 0, r.stderr
    # mutual, but the initiator expects another target secret: libiscsi refuses the target
    r = inq(base + f"?target_user={TUSER}&target_password=not-the-target1")
    assert r.returncode != 0
    assert "Invalid CHAP_R response from the target" in r.stderr
    # the same through libiscsi's environment variables
    r = inq(f"iscsi://{t.portal}/{QUORUM}/0", env={
        "LIBISCSI_CHAP_USERNAME": USER, "LIBISCSI_CHAP_PASSWORD": SECRET,
        "LIBISCSI_CHAP_TARGET_USERNAME": TUSER, "LIBISCSI_CHAP_TARGET_PASSWORD": TSECRET})
    assert r.returncode == 0, r.stderr
    # the other target has no CHAP: plain login still works
    r = inq(f"iscsi://{t.portal}/{DATA}/0")
    assert r.returncode == 0, r.stderr

    log = t.log_text()
    refused = [l for l in log.splitlines() if "login refused" in l]
    assert len(refused) >= 2
    assert any("(status 0x0201)" in l and NODE1 in l and "127.0.0.1:" in l for l in refused)
    # no secret anywhere in the log, DEBUG level included
    for s in (SECRET, TSECRET, "wrong-secret-00", "not-the-target1"):
        assert s not in log


def test_reflected_challenge_refused_live(chap_target):
    """No real client reflects a challenge: our own initiator does."""
    from pyiscsi_target.iscsi import keys
    from pyiscsi_target.iscsi.chap import chap_response
    from pyiscsi_target.iscsi.pdu import F_TRANSIT, LoginRequest
    t = chap_target
    ini = Initiator(t.host, t.port, name=NODE1)
    try:
        def step(pairs, flags=F_TRANSIT | 0x01):
            ini.send(LoginRequest(flags=flags, isid=ini.isid, itt=1, cid=1, cmdsn=1), keys.encode_text(pairs))
            rec = ini.recv()
            return rec.bhs, dict(keys.decode_text(rec.data))
        step([("InitiatorName", NODE1), ("TargetName", QUORUM), ("AuthMethod", "CHAP")])
        _, a = step([("CHAP_A", "7")])
        assert a["CHAP_A"] == "7"
        c = keys.parse_binary(a["CHAP_C"])
        r = chap_response(7, int(a["CHAP_I"]), SECRET.encode(), c)
        rsp, _ = step([("CHAP_N", USER), ("CHAP_R", "0x" + r.hex()), ("CHAP_I", a["CHAP_I"]),
                       ("CHAP_C", a["CHAP_C"])])
        assert (rsp.status_class, rsp.status_detail) == (2, 1)
        assert ini.closed_by_target()
    finally:
        ini.close()
    assert "reflected" in t.log_text()


def test_acl_refuses_and_hides_target_from_discovery(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, port, f'allow_initiators = ["{NODE1}", "iqn.2026-11.test:cluster-*"]\n'
                                  'allow_networks = ["127.0.0.0/8", "::1/128"]\n')
    t = start_target(cfg, "127.0.0.1", port)
    try:
        ls = require("iscsi-ls")
        r = subprocess.run([ls, "-i", NODE1, f"iscsi://{t.portal}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and QUORUM in r.stdout and DATA in r.stdout, r.stdout + r.stderr
        r = subprocess.run([ls, "-i", "iqn.2026-11.test:cluster-b", f"iscsi://{t.portal}"],
                           capture_output=True, text=True, timeout=60)
        assert QUORUM in r.stdout
        outsider = "iqn.2026-11.test:outsider"
        r = subprocess.run([ls, "-i", outsider, f"iscsi://{t.portal}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and QUORUM not in r.stdout and DATA in r.stdout, r.stdout + r.stderr
        # ... and cannot log in: authorization failure 0x0202, one log line with name and address
        assert inq(f"iscsi://{t.portal}/{QUORUM}/0", name=outsider).returncode != 0
        assert inq(f"iscsi://{t.portal}/{QUORUM}/0", name=NODE1).returncode == 0
        ini = Initiator(t.host, t.port, name=outsider)
        with pytest.raises(LoginRefused) as ei:
            ini.login(QUORUM)
        assert (ei.value.status_class, ei.value.status_detail) == (2, 2)
        ini.close()
    finally:
        assert t.stop() == 0
    lines = [l for l in t.log_text().splitlines() if "login refused" in l]
    assert lines and all(outsider in l and "127.0.0.1:" in l and "0x0202" in l for l in lines)


def test_address_outside_acl_is_refused(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, port, 'allow_networks = ["192.0.2.0/24"]\n')
    t = start_target(cfg, "127.0.0.1", port)
    try:
        r = subprocess.run([require("iscsi-ls"), "-i", NODE1, f"iscsi://{t.portal}"], capture_output=True,
                           text=True, timeout=60)
        assert QUORUM not in r.stdout and DATA in r.stdout
        assert inq(f"iscsi://{t.portal}/{QUORUM}/0").returncode != 0
    finally:
        assert t.stop() == 0
    assert "source address not in the target's allowed networks" in t.log_text()


def test_discovery_chap_with_iscsi_ls(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text() + '\n[discovery.chap]\nuser = "disc"\nsecret = "discovery-sec1"\n')
    os.chmod(cfg, 0o600)
    t = start_target(cfg, "127.0.0.1", port)
    try:
        ls = require("iscsi-ls")
        r = subprocess.run([ls, "-i", NODE1, f"iscsi://disc%discovery-sec1@{t.portal}"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and QUORUM in r.stdout, r.stdout + r.stderr
        r = subprocess.run([ls, "-i", NODE1, f"iscsi://disc%wrong-secret-1@{t.portal}"], capture_output=True,
                           text=True, timeout=60)
        assert QUORUM not in r.stdout
        r = subprocess.run([ls, "-i", NODE1, f"iscsi://{t.portal}"], capture_output=True, text=True, timeout=60)
        assert QUORUM not in r.stdout
    finally:
        assert t.stop() == 0
    assert "discovery-sec1" not in t.log_text() and "wrong-secret-1" not in t.log_text()


def test_lun_masking_with_libiscsi(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    text = cfg.read_text()
    anchor = '  path = "luns/data4k.img"\n'
    cfg.write_text(text.replace(anchor, anchor + f'  initiators = ["{NODE1}"]\n'))
    t = start_target(cfg, "127.0.0.1", port)
    try:
        ls = require("iscsi-ls")
        seen = {}
        for name in (NODE1, "iqn.2026-11.test:node2"):
            r = subprocess.run([ls, "-s", "-i", name, f"iscsi://{t.portal}"], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            seen[name] = r.stdout.count("Lun:")
        # data has LUNs 0 and 1, quorum LUN 0; LUN 1 of data only for node1
        assert seen == {NODE1: 3, "iqn.2026-11.test:node2": 2}, seen
        assert inq(f"iscsi://{t.portal}/{DATA}/1", name="iqn.2026-11.test:node2").returncode != 0
        assert inq(f"iscsi://{t.portal}/{DATA}/1", name=NODE1).returncode == 0
    finally:
        assert t.stop() == 0
