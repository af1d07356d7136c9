"""The README guide "A Hyper-V / failover cluster on three PCs": its storage
box config (config/cluster.toml) loads, is the very text the README shows,
and serves both targets to node1 (its IQN and CHAP) through libiscsi."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pyiscsi_target.config import load_config
from tests.conftest import require
from tests.support.target import free_port, start_target

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "config" / "cluster.toml"
NODE1, NODE2 = "iqn.1991-05.com.microsoft:node1", "iqn.1991-05.com.microsoft:node2"
QUORUM, DATA = "iqn.2026-11.lan.storage:quorum", "iqn.2026-11.lan.storage:data"
SECRET = "Cluster-sec-01"   # what the guide's chap.secret would hold (12-16 characters)


def localized(tmp_path: Path, port: int | None = None, mport: int | None = None) -> Path:
    """config/cluster.toml with its absolute paths (and ports) moved into tmp_path."""
    text = CLUSTER.read_text()
    for real, mine in (("/var/lib/pyiscsi-target", "state"), ("/srv/iscsi", "srv"), ("/etc/pyiscsi-target", "etc")):
        assert f'"{real}' in text
        (tmp_path / mine).mkdir(exist_ok=True)
        text = text.replace(f'"{real}', f'"{tmp_path / mine}')
    if port is not None:
        text = text.replace('listen = ["0.0.0.0:3260"]', f'listen = ["127.0.0.1:{port}"]')
    if mport is not None:
        text = text.replace('listen = "127.0.0.1:9180"', f'listen = "127.0.0.1:{mport}"')
    secret = tmp_path / "etc" / "chap.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    cfg = tmp_path / "target.toml"
    cfg.write_text(text)
    cfg.chmod(0o600)
    return cfg


def test_guide_config_loads(tmp_path):
    cfg = load_config(localized(tmp_path))
    assert not cfg.warnings, cfg.warnings
    assert cfg.server.listen == (("0.0.0.0", 3260),)
    assert cfg.metrics.listen == ("127.0.0.1", 9180)
    assert [t.iqn for t in cfg.targets] == [QUORUM, DATA]
    for t in cfg.targets:
        assert t.allow_initiators == (NODE1, NODE2)
        assert t.chap is not None and t.chap.user == "cluster" and t.chap.secret == SECRET
        (lun,) = t.luns
        assert lun.path.parent == tmp_path / "srv" and lun.cache == "write-back"
    assert cfg.discovery_chap is not None and cfg.discovery_chap.secret == SECRET
    assert cfg.targets[0].luns[0].size == 1 << 30 and cfg.targets[1].luns[0].size == 500 << 30


def test_readme_shows_exactly_this_config():
    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- config/cluster\.toml -->\n```toml\n(.*?)```\n", readme, re.S)
    assert m, "the guide's config block (marked <!-- config/cluster.toml -->) is missing from README.md"
    assert m.group(1) == CLUSTER.read_text(), "README's storage-box config and config/cluster.toml differ"
    guide = readme[readme.index("## A Hyper-V / failover cluster on three PCs"):]
    for step in ("Quick Connect", "Auto Configure", "Disk Management", "Cluster Shared Volumes",
                 "iscsiadm -m discovery -t st -p", "iscsiadm -m node", "Proxmox", "VMware", "3260/tcp"):
        assert step in guide, step


def test_guide_server_serves_node1_with_chap(tmp_path):
    ls = require("iscsi-ls")
    port, mport = free_port(), free_port()
    t = start_target(localized(tmp_path, port, mport), "127.0.0.1", port)
    try:
        def iscsi_ls(name: str, cred: str) -> subprocess.CompletedProcess:
            return subprocess.run([ls, "-s", "-i", name, f"iscsi://{cred}127.0.0.1:{port}"], capture_output=True,
                                  text=True, timeout=60)

        r = iscsi_ls(NODE1, f"cluster%{SECRET}@")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Target:{QUORUM}" in r.stdout and f"Target:{DATA}" in r.stdout, r.stdout
        # both LUNs reached through a CHAP login: their sizes are listed
        assert r.stdout.count("Lun:0") == 2, r.stdout
        # someone else sees nothing; a wrong secret gets no LUN
        other = iscsi_ls("iqn.1991-05.com.microsoft:laptop", f"cluster%{SECRET}@")
        assert QUORUM not in other.stdout and DATA not in other.stdout
        wrong = iscsi_ls(NODE2, "cluster%Wrong-secret-9@")
        assert "Lun:0" not in wrong.stdout
    finally:
        assert t.stop() == 0, t.log_text()[-3000:]
    assert SECRET not in t.log_text()
