"""RBD LUNs end to end: `pyiscsi-target serve` with a LUN on a Ceph RBD image
of the private test cluster (tests/support/ceph_cluster.py), driven by
QEMU and libiscsi's tools; two gateways exporting the same image."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.conftest import require
from tests.e2e.ops_support import capacity, cli
from tests.e2e.test_real_initiators import run
from tests.support.initiator import Initiator
from tests.support.gateways import rbd_lun, write_gateway_config
from tests.support.target import free_port, start_target

MiB = 1 << 20
IQN = "iqn.2026-11.org.example:rbd"
CAPACITY_CHANGED = bytes([0x2A, 0x09])


def rbd_config(d: Path, cluster, port: int, image: str, *, extra_lun: str = "") -> Path:
    return write_gateway_config(d, IQN, rbd_lun(cluster, image, extra=extra_lun), port=port, ceph=cluster,
                                name="target.toml")


def qemu_url(port: int, initiator: str) -> str:
    return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={IQN},lun=0,"
            f"initiator-name={initiator}")


def test_two_gateways_one_image_copy_compare_identity_resize(ceph_cluster, tmp_path):
    for tool in ("qemu-img", "iscsi-readcapacity16", "iscsi-inq"):
        require(tool)
    image = f"e2e-{os.getpid()}"
    ceph_cluster.create_image(image, 64 * MiB)
    ports = [free_port(), free_port()]
    cfgs = [rbd_config(tmp_path / f"gw{i}", ceph_cluster, ports[i], image) for i in range(2)]
    gws = []
    try:
        for cfg, port in zip(cfgs, ports):
            gws.append(start_target(cfg, "127.0.0.1", port))
        urls = [f"iscsi://127.0.0.1:{p}/{IQN}/0" for p in ports]

        # The RBD image's size, thin with LBPRZ (discards read back zeros).
        for url in urls:
            out = run("iscsi-readcapacity16", url).stdout
            assert "Total size:67108864" in out and "LBPME:1 LBPRZ:1" in out, out

        # 32 MiB of random data through gateway 0, compared through gateway 1
        # (no cache on either: what one wrote, the other reads).
        src = tmp_path / "src.raw"
        src.write_bytes(os.urandom(32 * MiB))
        run("qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src),
            qemu_url(ports[0], "iqn.2026-11.test:qemu-a"), timeout=300)
        r = run("qemu-img", "compare", "--image-opts", f"driver=file,filename={src}",
                qemu_url(ports[1], "iqn.2026-11.test:qemu-b"), check=False, timeout=300)
        assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr
        # ... and it is in the RBD image itself.
        _, rbd = ceph_cluster.bindings()
        with ceph_cluster.rados().open_ioctx(ceph_cluster.pool) as ioctx, rbd.Image(ioctx, image) as img:
            assert img.read(0, 32 * MiB) == src.read_bytes()
            image_id = img.id()

        # One disk identity on both gateways (their state_dirs differ), from
        # the cluster, not from state_dir/identity.json.
        serials = [run("iscsi-inq", "-e", "1", "-c", "128", u).stdout for u in urls]
        naas = [run("iscsi-inq", "-e", "1", "-c", "131", u).stdout for u in urls]
        assert serials[0] == serials[1] and re.search(r"Unit Serial Number:\[\w{20}\]", serials[0]), serials
        # (iscsi-inq prints the NAA's 16 bytes raw)
        naa = [re.findall(r"Designator Type:\(3\) NAA\s*\nDesignator:\[(.*?)\]\n", n, re.S) for n in naas]
        assert naa[0] == naa[1] and len(naa[0]) == 1 and naa[0][0], naas
        from pyiscsi_target.identity import derive_shared_image_identity

        want = derive_shared_image_identity(ceph_cluster.fsid, ceph_cluster.rados().pool_lookup(ceph_cluster.pool),
                                            image_id)
        assert f"[{want.serial}]" in serials[0]
        assert not (cfgs[0].parent / "state" / "identity.json").exists()

        # rbd resize, then reload on each gateway: the new size, and a
        # connected initiator is told CAPACITY DATA HAS CHANGED.
        ini = Initiator("127.0.0.1", ports[1], name="iqn.2026-11.test:watcher")
        ini.login(IQN)
        try:
            ini.clear_unit_attentions(0)
            ceph_cluster.cli("rbd", "resize", "--size", "96M", f"{ceph_cluster.pool}/{image}")
            for cfg in cfgs:
                p = cli("reload", cfg)
                assert p.returncode == 0, p.stdout + p.stderr
                assert "LUN 0 image grew from 64MiB to 96MiB" in p.stdout, p.stdout
            assert ini.clear_unit_attentions(0) == [CAPACITY_CHANGED]
            assert capacity(ini) == (96 * MiB >> 9, 512)
        finally:
            ini.close()
        for url in urls:
            assert "Total size:100663296" in run("iscsi-readcapacity16", url).stdout
        # A reload with nothing changed changes nothing.
        p = cli("reload", cfgs[0])
        assert p.returncode == 0 and "grew" not in p.stdout, p.stdout
    finally:
        for gw in gws:
            rc = gw.stop()
            assert rc == 0, gw.log_text()[-3000:]
        ceph_cluster.remove_image(image)


def test_missing_image_without_size_fails_start_with_the_reason(ceph_cluster, tmp_path):
    port = free_port()
    cfg = rbd_config(tmp_path, ceph_cluster, port, "no-such-image")
    p = cli("serve", cfg, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "rbd:rbd/no-such-image: image does not exist (add a size to create it)" in p.stderr, p.stderr


def test_size_creates_a_missing_image_layering_only(ceph_cluster, tmp_path):
    require("iscsi-readcapacity16")
    port = free_port()
    image = f"e2e-created-{os.getpid()}"
    cfg = rbd_config(tmp_path, ceph_cluster, port, image)
    cfg.write_text(cfg.read_text().replace(f'path = "rbd:rbd/{image}"', f'path = "rbd:rbd/{image}"\n  size = "16MiB"'))
    t = start_target(cfg, "127.0.0.1", port)
    try:
        assert "Total size:16777216" in run("iscsi-readcapacity16", f"iscsi://127.0.0.1:{port}/{IQN}/0").stdout
    finally:
        assert t.stop() == 0
    _, rbd = ceph_cluster.bindings()
    with ceph_cluster.rados().open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image) as img:
        assert img.features() == rbd.RBD_FEATURE_LAYERING and img.size() == 16 * MiB
    ceph_cluster.remove_image(image)
