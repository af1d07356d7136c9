"""The README section "Two gateways in front of a Ceph cluster": its two
configs (config/ceph-gateway-a.toml, -b.toml) mirror each other, the README
shows gateway A's file word for word, and both, pointed at the test cluster
and loopback instead of 10.0.0.11/12, serve together: discovery through
either gateway finds both portals, and both present the same disks."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from pyiscsi_target.config import load_config
from tests.conftest import require
from tests.support.target import free_port, start_target

REPO = Path(__file__).resolve().parents[2]
GW_A, GW_B = REPO / "config" / "ceph-gateway-a.toml", REPO / "config" / "ceph-gateway-b.toml"
ADDR_A, ADDR_B = "10.0.0.11:3260", "10.0.0.12:3260"
NODE1 = "iqn.1991-05.com.microsoft:node1"


def localized(src: Path, dirpath: Path, conf: Path, keyring: Path, client: str, pool: str,
              ports: dict[str, str], suffix: str) -> Path:
    text = src.read_text()
    for real, mine in (("/etc/ceph/ceph.conf", str(conf)),
                       ("/etc/ceph/ceph.client.iscsi.keyring", str(keyring)),
                       ('client = "iscsi"', f'client = "{client}"'),
                       ("/var/lib/pyiscsi-target", str(dirpath / "state")),
                       ("rbd:rbd/quorum", f"rbd:{pool}/guide-quorum-{suffix}"),
                       ("rbd:rbd/vmstore", f"rbd:{pool}/guide-vmstore-{suffix}"),
                       # Removing a thin 2 TiB image visits all its 512 Ki objects.
                       ('size = "2TiB"', 'size = "64MiB"'),
                       *ports.items()):
        assert real in text, real
        text = text.replace(real, mine)
    dirpath.mkdir(parents=True, exist_ok=True)
    cfg = dirpath / "gateway.toml"
    cfg.write_text(text)
    return cfg


def test_the_two_configs_mirror_each_other(tmp_path):
    conf, keyring = tmp_path / "ceph.conf", tmp_path / "keyring"
    conf.write_text("")
    keyring.write_text("")
    # Ports as in the files (only the Ceph paths point at placeholder files).
    same = {ADDR_A: ADDR_A, ADDR_B: ADDR_B}
    a, b = (load_config(localized(src, tmp_path / name, conf, keyring, "iscsi", "rbd", same, "x"))
            for src, name in ((GW_A, "a"), (GW_B, "b")))
    assert [t.iqn for t in a.targets] == [t.iqn for t in b.targets]
    assert [[lun.path for lun in t.luns] for t in a.targets] == [[lun.path for lun in t.luns] for t in b.targets]
    for me, other in ((a, b), (b, a)):
        (peer,) = me.gateway.peers
        assert (peer.name, peer.port_group, peer.state) == (other.gateway.name, other.gateway.port_group,
                                                            other.gateway.state)
        assert [f"{h}:{p}" for h, p in peer.portals] == [f"{h}:{p}" for h, p in other.server.listen]
    assert a.gateway.port_group != b.gateway.port_group


def test_readme_shows_gateway_a_config():
    readme = (REPO / "README.md").read_text()
    m = re.search(r"Gateway A \(`config/ceph-gateway-a.toml`\):\n\n( *)```toml\n(.*?)\n *```", readme, re.S)
    assert m, "the README lost its gateway A config block"
    indent = m.group(1)
    shown = "\n".join(line.removeprefix(indent) for line in m.group(2).splitlines())
    assert shown == GW_A.read_text().strip()


def test_both_guide_gateways_serve_together(tmp_path, ceph_cluster):
    pa, pb = free_port(), free_port()
    ports = {ADDR_A: f"127.0.0.1:{pa}", ADDR_B: f"127.0.0.1:{pb}"}
    suffix = str(os.getpid())
    gws = []
    try:
        for src, port, name in ((GW_A, pa, "a"), (GW_B, pb, "b")):
            cfg = localized(src, tmp_path / name, ceph_cluster.conf, ceph_cluster.keyring, ceph_cluster.client,
                            ceph_cluster.pool, ports, suffix)
            gws.append(start_target(cfg, "127.0.0.1", port, timeout=60))
        for gw in gws:
            out = subprocess.run([require("iscsi-ls"), "-i", NODE1, f"iscsi://{gw.portal}"], capture_output=True,
                                 text=True, errors="replace", timeout=30, check=True).stdout
            for iqn in ("iqn.2026-11.lan.storage:ceph-quorum", "iqn.2026-11.lan.storage:ceph-data"):
                assert f"Target:{iqn} Portal:127.0.0.1:{pa},1" in out, out
                assert f"Target:{iqn} Portal:127.0.0.1:{pb},2" in out, out
        serials = []
        for gw in gws:
            out = subprocess.run([require("iscsi-inq"), "-i", NODE1, "-e", "1", "-c", "128",
                                  gw.url("iqn.2026-11.lan.storage:ceph-data", 0)], capture_output=True, text=True,
                                 errors="replace", timeout=30, check=True).stdout
            serials.append(re.search(r"Unit Serial Number:\[(\w+)\]", out).group(1))
        assert serials[0] == serials[1]
    finally:
        for gw in gws:
            assert gw.stop() == 0, gw.log_text()[-3000:]
        for image in ("quorum", "vmstore"):
            ceph_cluster.remove_image(f"guide-{image}-{suffix}")
