"""Two gateways (two real `pyiscsi-target serve` processes) exporting one RBD
image under one target name, on the private Ceph cluster; every client is
libiscsi.

* the two-node failover-cluster scenario with node1 through gateway A and
  node2 through gateway B, and the Windows validation replay with each
  node's two MPIO paths going one through each gateway;
* libiscsi's PR suites through gateway A and then through gateway B (their
  second initiator logs in through the same gateway: the suites cannot
  split themselves across portals; the state lives in RADOS either way);
* a gateway killed (SIGKILL) in the middle of writes: every write it
  acknowledged is readable through the other gateway, the registrations
  made through it are still there, and the other gateway carries on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.test_pr_cluster import (K1, K2, NODE1, NODE2, REGISTER_IGNORE, RESERVE, WE_RO, good,
                                       two_node_cluster_scenario, windows_validation_replay)
from tests.e2e.test_pr_iscsi_test_cu import run_pr_suites
from tests.support.libiscsi_client import RESERVATION_CONFLICT, LibIscsi
from tests.support.gateways import Gateway, rbd_lun, write_gateway_config
from tests.support.target import free_port, start_target

EXIT_FENCED = 3  # pyiscsi_target.server.EXIT_FENCED


def checkout_env() -> dict[str, str]:
    """Run this checkout's CLI, whatever an installed copy points at."""
    repo = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))

IQN = "iqn.2026-11.org.example:ceph-shared"


class Gateways:
    def __init__(self, tmp_path: Path, ceph, image: str) -> None:
        self.ceph = ceph
        pa, pb = free_port(), free_port()
        a, b = Gateway("gw-a", 1, pa), Gateway("gw-b", 2, pb)
        lun = rbd_lun(ceph, image)
        self.cfg_a = write_gateway_config(tmp_path / "gw-a", IQN, lun, me=a, peers=(b,), ceph=ceph)
        self.cfg_b = write_gateway_config(tmp_path / "gw-b", IQN, lun, me=b, peers=(a,), ceph=ceph)
        self.a = start_target(self.cfg_a, "127.0.0.1", pa, timeout=60)
        self.b = start_target(self.cfg_b, "127.0.0.1", pb, timeout=60)
        self.expect_gone: list = []  # gateways a test kills or fences

    def connect(self, gw, name: str, qualifier: int = 1) -> LibIscsi:
        return LibIscsi(gw.portal, IQN, name, qualifier=qualifier)

    def stop(self) -> None:
        for gw in (self.a, self.b):
            expected = (0, -signal.SIGKILL, EXIT_FENCED) if gw in self.expect_gone else (0,)
            rc = gw.stop()
            assert rc in expected, f"exit status {rc}\n{gw.log_text()[-4000:]}"


_images = iter(range(10**6))


def pattern(lba: int) -> int:
    return (lba // 8) % 250 + 1


@pytest.fixture
def gateways(tmp_path, ceph_cluster):
    image = f"shared{next(_images)}-{os.getpid()}"
    ceph_cluster.create_image(image, 64 << 20)
    g = Gateways(tmp_path, ceph_cluster, image)
    try:
        yield g
    finally:
        g.stop()
        ceph_cluster.remove_image(image)


def test_both_gateways_show_one_lu_and_two_port_groups(gateways):
    """Same VPD 80h/83h identity through both gateways (MPIO merges the paths
    into one disk), and each gateway reports itself and its peer."""
    def inq(gw, page):
        return subprocess.run([require("iscsi-inq"), "-e", "1", "-c", str(page), gw.url(IQN, 0)],
                              capture_output=True, text=True, errors="replace", timeout=30, check=True).stdout

    serial_a, serial_b = inq(gateways.a, 128), inq(gateways.b, 128)
    assert "Unit Serial Number" in serial_a and serial_a == serial_b
    ids_a, ids_b = inq(gateways.a, 131), inq(gateways.b, 131)
    naa = lambda out: re.findall(r"Designator.*NAA.*|^\s*NAA.*", out, re.M)  # noqa: E731
    assert naa(ids_a) and naa(ids_a) == naa(ids_b)
    assert ids_a != ids_b  # the target port designators differ: two ports of one LU


def test_two_node_cluster_scenario_across_gateways(gateways):
    two_node_cluster_scenario(lambda name, q=1: gateways.connect(gateways.a, name, q),
                              lambda name, q=1: gateways.connect(gateways.b, name, q))


def test_windows_validation_replay_one_path_through_each_gateway(gateways):
    windows_validation_replay(lambda name, q: gateways.connect(gateways.a, name, q),
                              lambda name, q: gateways.connect(gateways.b, name, q))


@pytest.mark.parametrize("which", ["a", "b"])
def test_libiscsi_pr_suites_through_a_gateway(gateways, which):
    run_pr_suites(getattr(gateways, which).url(IQN, 0), label=f"gateway {which}: ")


def test_gateway_killed_mid_write_other_carries_on(gateways):
    n1 = gateways.connect(gateways.a, NODE1)
    n2 = gateways.connect(gateways.b, NODE2)
    acked: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[str] = []
    try:
        n1.unit_attentions()
        n2.unit_attentions()
        good(n1.prout(REGISTER_IGNORE, sark=K1))
        good(n2.prout(REGISTER_IGNORE, sark=K2))
        good(n1.prout(RESERVE, rk=K1, type_=WE_RO))

        def writer() -> None:
            # node1 writes 4 KiB blocks through gateway A until A dies; what
            # came back GOOD is acknowledged and must never be lost.
            lba = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and lba < 100_000:
                data = bytes([pattern(lba)]) * 4096
                try:
                    r = n1.write16(lba, data)
                except Exception as e:  # the connection broke: A is gone
                    errors.append(repr(e))
                    return
                if r.status != 0:
                    errors.append(f"status {r.status}")
                    return
                acked[lba] = data
                lba += 8

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 200 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        assert len(acked) >= 200, errors
        gateways.expect_gone.append(gateways.a)
        gateways.a.proc.send_signal(signal.SIGKILL)  # mid-write
        gateways.a.proc.wait(10)
        stop.set()
        t.join(30)
        assert not t.is_alive()
        # Gateway B carries on: the registrations made through A are there
        # (RADOS), node1 still holds the reservation, node2 reads every
        # acknowledged block and can fence node1 and take over.
        assert sorted(n2.read_keys()[1]) == sorted([K1, K2])
        assert n2.read_reservation()[1:] == (K1, WE_RO)
        # qemu-io (another real initiator) checks each acknowledged block's
        # pattern through gateway B.
        checks = [a for lba in acked for a in ("-c", f"read -P {pattern(lba)} {lba * 512} 4k")]
        url = gateways.b.url(IQN, 0)
        portal, target = url.removeprefix("iscsi://").split("/")[:2]
        p = subprocess.run([require("qemu-io"), "--image-opts", "-r",
                            f"driver=iscsi,transport=tcp,portal={portal},target={target},lun=0,"
                            "initiator-name=iqn.2026-11.test:checker", *checks],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "verification failed" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
        assert p.stdout.count("read 4096/4096 bytes") == len(acked), p.stdout[-2000:]
        good(n2.prout(4, rk=K2, sark=K1, type_=WE_RO))  # PREEMPT node1
        good(n2.write16(0, b"\x77" * 512))
        with gateways.connect(gateways.b, "iqn.1991-05.com.microsoft:node3") as o:
            o.unit_attentions()
            assert o.write16(0, b"\0" * 512).status == RESERVATION_CONFLICT
        print(f"{len(acked)} writes acknowledged through gateway A before SIGKILL; all read back through B")
    finally:
        stop.set()
        n1.drop()
        n2.drop()


def test_stalled_gateway_is_fenced_and_exits(gateways):
    """A gateway that stops answering (SIGSTOP: alive but cut off) would go
    on enforcing a stale reservation.  The first change made elsewhere waits
    for it for the notify timeout, then blocklists its cluster client; when
    it runs again it finds itself fenced and exits with status 3 (systemd
    restarts it as a new instance), and gateway A carries on."""
    n1 = gateways.connect(gateways.a, NODE1)
    n2 = gateways.connect(gateways.b, NODE2)
    try:
        n1.unit_attentions()
        n2.unit_attentions()
        good(n1.prout(REGISTER_IGNORE, sark=K1))
        good(n2.prout(REGISTER_IGNORE, sark=K2))
        good(n2.prout(RESERVE, rk=K2, type_=WE_RO))
        n2.drop()
        gateways.expect_gone.append(gateways.b)
        os.kill(gateways.b.proc.pid, signal.SIGSTOP)
        try:
            good(n1.prout(4, rk=K1, sark=K2, type_=WE_RO))  # PREEMPT node2 through A
        finally:
            os.kill(gateways.b.proc.pid, signal.SIGCONT)
        assert gateways.b.proc.wait(60) == EXIT_FENCED, gateways.b.log_text()[-3000:]
        assert "fenced" in gateways.a.log_text() and "fenced" in gateways.b.log_text()
        # The operator sees it in `status` of the gateway that fenced.
        st = subprocess.run([sys.executable, "-m", "pyiscsi_target", "status", str(gateways.cfg_a)],
                            capture_output=True, text=True, timeout=30, env=checkout_env())
        assert st.returncode == 0, st.stderr
        assert re.search(r"reservations shared in RADOS rbd/pyiscsi\.reservations\.\w+ \(version \d+, "
                         r"0 other gateways\); fenced: instance \d+ at 127\.0\.0\.1:", st.stdout), st.stdout
        assert n1.read_reservation()[1:] == (K1, WE_RO)
        good(n1.write16(0, b"\x11" * 512))
        good(n1.prout(RESERVE, rk=K1, type_=WE_RO))  # changes go on without B
    finally:
        n1.drop()
        n2.drop()
