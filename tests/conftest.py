import shutil

import pytest

from tests.support.target import free_port, start_target, write_config


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (.ci/run installs it); refusing to skip a real-client test")
    return path


@pytest.fixture
def target(tmp_path):
    """The real server process, on a loopback port, with two targets (quorum, data)."""
    port = free_port()
    cfg = write_config(tmp_path, port)
    t = start_target(cfg, "127.0.0.1", port)
    yield t
    rc = t.stop()
    assert rc == 0, f"server exit status {rc}\n{t.log_text()[-4000:]}"


@pytest.fixture(scope="session")
def ceph_cluster():
    """A private single-node Ceph cluster (one mon, one memstore OSD, loopback,
    cephx) for the whole test session, with an initialised "rbd" pool.  See
    tests/support/ceph_cluster.py; .ci/run installs the Debian packages, so a
    missing Ceph fails instead of skipping."""
    from tests.support.ceph_cluster import CephCluster, ceph_available

    missing = ceph_available()
    if missing:
        pytest.fail(f"Ceph is not installed ({missing} missing); .ci/run installs "
                    "ceph-mon ceph-osd ceph-common python3-rados python3-rbd")
    cluster = CephCluster()
    cluster.start()
    yield cluster
    cluster.stop()
