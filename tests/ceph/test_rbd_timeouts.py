"""An RBD LUN whose OSDs stop answering: with [ceph] op_timeout the command
ends in NOT READY, ASYMMETRIC ACCESS STATE TRANSITION (a multipath initiator
retries, on another gateway if it has one) instead of never ending; once
the OSD answers again the same session carries on."""

from __future__ import annotations

import os
import signal
import time

from tests.support.gateways import rbd_lun, write_gateway_config
from tests.support.libiscsi_client import CHECK_CONDITION, GOOD, LibIscsi
from tests.support.target import free_port, start_target

IQN = "iqn.2026-11.org.example:rbd-timeout"


def test_unanswered_osd_gives_not_ready_transition_then_recovers(tmp_path, ceph_cluster):
    image = f"timeout-{os.getpid()}"
    ceph_cluster.create_image(image, 16 << 20)
    port = free_port()
    cfg = write_gateway_config(tmp_path, IQN, rbd_lun(ceph_cluster, image), port=port, ceph=ceph_cluster)
    cfg.write_text(cfg.read_text().replace("[ceph]\n", '[ceph]\nop_timeout = "2s"\n'))
    t = start_target(cfg, "127.0.0.1", port, timeout=60)
    c = LibIscsi(t.portal, IQN, "iqn.2026-11.test:timeout")
    osd = ceph_cluster.daemon_pid("osd")
    try:
        c.unit_attentions()
        assert c.write16(0, b"\x5a" * 4096).status == GOOD
        os.kill(osd, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = c.write16(8, b"\xa5" * 4096)
            waited = time.monotonic() - t0
        finally:
            os.kill(osd, signal.SIGCONT)
        assert r.status == CHECK_CONDITION and r.sense == (0x02, 0x04, 0x0A), r
        print(f"write with the OSD stopped ended after {waited:.1f} s: NOT READY 04/0A")
        # The OSD is back: the same session writes and reads again.
        deadline = time.monotonic() + 60
        while (r := c.write16(8, b"\xa5" * 4096)).status != GOOD and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.status == GOOD, r
        assert c.read16(0, 16).status == GOOD
    finally:
        c.drop()
        assert t.stop() == 0, t.log_text()[-3000:]
        ceph_cluster.remove_image(image)
