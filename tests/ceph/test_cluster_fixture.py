"""The Ceph test cluster fixture itself: it starts, and an image created with
its helper takes I/O through the Python bindings (layering only)."""

import os

from pyiscsi_target.storage.ceph_bindings import import_rados_rbd


def test_cluster_image_io(ceph_cluster):
    rados, rbd = import_rados_rbd()
    assert ceph_cluster.conf.exists() and ceph_cluster.keyring.exists()
    assert len(str(ceph_cluster.dir)) < 40  # admin sockets live there (sun_path limit)
    spec = ceph_cluster.create_image("fixture-smoke", 8 << 20)
    assert spec == "rbd/fixture-smoke"
    # A client of our own, configured only from what the fixture exposes.
    r = rados.Rados(conffile=str(ceph_cluster.conf), rados_id=ceph_cluster.client,
                    conf={"keyring": str(ceph_cluster.keyring)})
    r.connect(timeout=10)
    try:
        assert r.get_fsid() == ceph_cluster.fsid
        with r.open_ioctx(ceph_cluster.pool) as ioctx:
            with rbd.Image(ioctx, "fixture-smoke") as img:
                assert img.size() == 8 << 20
                assert img.features() == rbd.RBD_FEATURE_LAYERING
                data = os.urandom(65536)
                img.write(data, 4096)
                img.flush()
                assert img.read(4096, 65536) == data
                assert img.read(0, 4096) == bytes(4096)
        ceph_cluster.remove_image("fixture-smoke")
    finally:
        r.shutdown()


def test_cluster_cli(ceph_cluster):
    """The rbd CLI works against it (used by tests to resize images)."""
    ceph_cluster.create_image("fixture-cli", 4 << 20)
    ceph_cluster.cli("rbd", "resize", "--size", "8M", "rbd/fixture-cli")
    out = ceph_cluster.cli("rbd", "info", "--format", "json", "rbd/fixture-cli").stdout
    import json

    assert json.loads(out)["size"] == 8 << 20
    ceph_cluster.remove_image("fixture-cli")
