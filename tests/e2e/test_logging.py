"""``serve --log-format json`` with real libiscsi clients: one JSON object per
line, one line per login/logout/refusal with initiator name and address, and
no CHAP secret anywhere in a DEBUG log (right, wrong and mutual secrets)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import require
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config

USER, SECRET = "cluster", "Json-secret-01"
TUSER, TSECRET = "storage", "Json-mutual-02"
NODE1 = "iqn.1991-05.com.microsoft:node1"
STRANGER = "iqn.2026-11.test:stranger"


def _inq(url: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("iscsi-inq"), "-i", name, url], capture_output=True, text=True, timeout=60)


def test_json_log_lines_logins_refusals_no_secret(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    text = cfg.read_text()
    q = f'iqn = "{QUORUM}"\nalias = "quorum"\n'
    text = text.replace(q, q + f'[target.chap]\nuser = "{USER}"\nsecret = "{SECRET}"\n'
                              f'mutual_user = "{TUSER}"\nmutual_secret = "{TSECRET}"\n')
    d = f'iqn = "{DATA}"\n'
    text = text.replace(d, d + f'allow_initiators = ["{NODE1}"]\n')
    cfg.write_text(text)
    os.chmod(cfg, 0o600)
    t = start_target(cfg, "127.0.0.1", port, args=("--log-format", "json"))
    try:
        ok = _inq(f"iscsi://{USER}%{SECRET}@{t.portal}/{QUORUM}/0", NODE1)
        assert ok.returncode == 0, ok.stderr
        bad = _inq(f"iscsi://{USER}%Wrong-secret-03@{t.portal}/{QUORUM}/0", NODE1)
        assert bad.returncode != 0
        acl = _inq(f"iscsi://{t.portal}/{DATA}/0", STRANGER)
        assert acl.returncode != 0
    finally:
        assert t.stop() == 0, t.log_text()[-3000:]

    log = t.log_text()
    for s in (SECRET, TSECRET, "Wrong-secret-03"):
        assert s not in log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]   # every line is one object
    assert records
    for r in records:
        assert {"time", "level", "logger", "message"} <= set(r), r
        assert r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    by_event: dict[str, list[dict]] = {}
    for r in records:
        by_event.setdefault(r.get("event", ""), []).append(r)

    logins = [r for r in by_event.get("login", []) if r.get("target") == QUORUM]
    assert len(logins) == 1, by_event.get("login")
    li = logins[0]
    assert li["initiator"] == NODE1 and li["address"].startswith("127.0.0.1:") and li["level"] == "INFO"
    assert li["isid"] and li["tsih"] > 0 and NODE1 in li["message"]

    assert [r for r in by_event.get("logout", []) if r["initiator"] == NODE1 and r["address"].startswith("127.0.0.1:")]

    refused = by_event.get("login_refused", [])
    assert len(refused) == 2, refused
    chap = [r for r in refused if r["status"] == "0x0201"]   # authentication failure
    assert len(chap) == 1 and chap[0]["initiator"] == NODE1 and chap[0]["address"].startswith("127.0.0.1:")
    denied = [r for r in refused if r["status"] == "0x0202"]  # not in the ACL
    assert len(denied) == 1 and denied[0]["initiator"] == STRANGER and denied[0]["level"] == "WARNING"


def test_text_log_is_default(tmp_path):
    port = free_port()
    t = start_target(write_config(tmp_path, port), "127.0.0.1", port)
    try:
        r = _inq(f"iscsi://{t.portal}/{DATA}/0", NODE1)
        assert r.returncode == 0, r.stderr
    finally:
        assert t.stop() == 0
    lines = [line for line in t.log_text().splitlines() if " login: " in line]
    assert lines and NODE1 in lines[0] and "127.0.0.1:" in lines[0] and not lines[0].startswith("{")
