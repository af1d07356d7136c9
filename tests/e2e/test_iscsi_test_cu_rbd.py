"""libiscsi's conformance suite, iscsi-test-cu (family ALL), against a LUN on
a Ceph RBD image of the private test cluster.

The same rules as tests/e2e/test_iscsi_test_cu.py (zero failures; a skip only
for a feature the README lists as unsupported), in the default configuration
only (the fabric is the same as for image files; the other configurations
exercise the fabric).  What differs on RBD is the medium: UNMAP and WRITE
SAME(UNMAP) must read back zeros (LBPRZ) also for ranges that cover part of
a RADOS object, GET LBA STATUS comes from librbd's diff, WCE=0 (no rbd cache),
and every write is acknowledged by the OSDs.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import conformance as cu
from tests.conftest import require
from tests.e2e.test_iscsi_test_cu import ALLOWED_SKIPS, MIN_PASSED
from tests.support.target import free_port, start_target

IMAGE_SIZE = cu.IMAGE_SIZE
RO_SIZE = cu.RO_SIZE


def _allowed(r: cu.TestResult) -> bool:
    return r.suite in ALLOWED_SKIPS or f"{r.suite}.{r.test}" in ALLOWED_SKIPS


@pytest.mark.timeout(900)
def test_iscsi_test_cu_rbd_zero_failures(ceph_cluster, tmp_path):
    require("iscsi-test-cu")
    disk, ro = f"cu-{os.getpid()}", f"cu-ro-{os.getpid()}"
    ceph_cluster.create_image(disk, IMAGE_SIZE)
    ceph_cluster.create_image(ro, RO_SIZE)  # a read-only LU is never created
    port = free_port()
    cfg = tmp_path / "target.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[admin]
enabled = false
[ceph]
conf = "{ceph_cluster.conf}"
keyring = "{ceph_cluster.keyring}"
client = "{ceph_cluster.client}"
[[target]]
iqn = "{cu.TARGET_IQN}"
  [[target.lun]]
  id = 0
  path = "rbd:{ceph_cluster.pool}/{disk}"
  block_size = {cu.BLOCK_SIZE}
  [[target.lun]]
  id = 1
  path = "rbd:{ceph_cluster.pool}/{ro}"
  block_size = {cu.BLOCK_SIZE}
  read_only = true
""")
    t = start_target(cfg, "127.0.0.1", port, args=("--log-level", "INFO"))
    url = f"iscsi://127.0.0.1:{port}/{cu.TARGET_IQN}/0"
    try:
        results, secs, note = cu.run_cu(url, url, tmp_path / "iscsi-test-cu.log", timeout=600)
        ro_tests = [(r.suite, r.test) for r in results if r.status == cu.SKIPPED and "write-protected" in r.detail]
        if ro_tests:
            ro_results, _, ro_note = cu.run_cu(f"iscsi://127.0.0.1:{port}/{cu.TARGET_IQN}/1", None,
                                               tmp_path / "iscsi-test-cu-readonly.log", timeout=600, only=ro_tests)
            got = {(r.suite, r.test): r for r in ro_results}
            results = [got.get((r.suite, r.test), r) for r in results]
            note = "; ".join(x for x in (note, ro_note) if x)
    finally:
        rc = t.stop()
        for image in (disk, ro):
            ceph_cluster.remove_image(image)
    counts = cu.Run("ours", "rbd", results, tmp_path / "iscsi-test-cu.log", secs, note).counts()
    print(f"iscsi-test-cu [rbd]: {counts[cu.PASSED]} passed, {counts[cu.FAILED]} failed, "
          f"{counts[cu.SKIPPED]} skipped in {secs:.0f}s")
    log = (tmp_path / "iscsi-test-cu.log").read_text(errors="replace")
    failed = [f"{r.suite}.{r.test}: {r.detail}" for r in results if r.status == cu.FAILED]
    assert not failed, "\n".join(failed) + "\n" + log[-4000:]
    assert not note, note
    assert rc == 0, t.log_text()[-4000:]
    stray = [f"{r.suite}.{r.test}: {r.detail}" for r in results if r.status == cu.SKIPPED and not _allowed(r)]
    assert not stray, "skipped, and not a documented unsupported feature:\n" + "\n".join(stray)
    assert counts[cu.PASSED] >= MIN_PASSED, counts
    assert {(r.suite, r.status) for r in results if r.suite == "ReadOnly"} == {("ReadOnly", cu.PASSED)}
