"""The dashboard in headless Chromium while a client does I/O, and /metrics."""

from __future__ import annotations

import re
import subprocess
import threading
import urllib.request

import pytest

from tests.conftest import require
from tests.e2e.ops_support import pr_out, status, wait_for, write10
from tests.support.initiator import Initiator
from tests.support.target import DATA, free_port, start_target, write_config

WRITER = "iqn.2026-11.test:writer"


def chromium(*args, tmp, timeout=90) -> subprocess.CompletedProcess:
    exe = require("chromium")
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    profile.mkdir()
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(tmp_path):
    port, http = free_port(), free_port()
    cfg = write_config(tmp_path, port)
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{http}"\n')
    t = start_target(cfg, "127.0.0.1", port)
    t.http = f"http://127.0.0.1:{http}/"
    yield t
    assert t.stop() == 0, t.log_text()[-3000:]


class Writer(threading.Thread):
    """Keeps writing 64 KiB blocks to DATA LUN 0 until stopped."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.ini = Initiator("127.0.0.1", port, name=WRITER)
        self.ini.login(DATA)
        self.ini.clear_unit_attentions()
        assert pr_out(self.ini, 0, sark=0xC1A5).status == 0        # a registered key to show
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        lba = 0
        try:
            while not self.stop.is_set():
                assert write10(self.ini, lba, b"\x5a" * 65536).status == 0
                lba = (lba + 128) % (100 << 11)
        except BaseException as e:  # reported by the test
            self.error = e


def test_dashboard_in_headless_chromium_shows_live_numbers(served, tmp_path):
    t = served
    w = Writer(t.port)
    w.start()
    try:
        wait_for(lambda: status(t.config)["throughput"]["write_bps"] > 0, what="write throughput in status")
        before = status(t.config)
        dom = chromium("--virtual-time-budget=4000", "--dump-dom", t.http, tmp=tmp_path)
        after = status(t.config)
        shot = tmp_path / "dashboard.png"
        png = chromium("--virtual-time-budget=4000", "--window-size=1280,900", f"--screenshot={shot}", t.http,
                       tmp=tmp_path)
    finally:
        w.stop.set()
        w.join(10)
        w.ini.close()
    assert w.error is None, w.error
    html = dom.stdout
    assert dom.returncode == 0 and "<table" in html, (dom.returncode, dom.stderr[-2000:])
    assert int(re.search(r'<body data-updates="(\d+)"', html).group(1)) >= 1, html[:2000]
    # total write throughput shown, and > 0 while the client writes
    assert int(re.search(r'id="total-write" data-bps="(\d+)"', html).group(1)) > 0
    # DATA LUN 0's bytes written: between what status said before and after the page load
    row = re.search(rf'<tr data-target="{re.escape(DATA)}" data-lun="0">(.*?)</tr>', html, re.S).group(1)
    shown = int(re.search(r'data-bytes="(\d+)" data-field="write-bytes"', row).group(1))
    lun = lambda st: next(x for x in st["targets"] if x["iqn"] == DATA)["luns"][0]  # noqa: E731
    assert lun(before)["io"]["write_bytes"] <= shown <= lun(after)["io"]["write_bytes"], shown
    assert shown > 0 and shown % 65536 == 0
    assert 'data-field="pr-keys" data-count="1"' in row and "0x000000000000c1a5" in row
    assert 'data-bytes="134217728" data-field="size"' in row
    # the writer's session is listed
    assert re.search(rf'data-field="initiator">{re.escape(WRITER)}<', html)
    assert int(re.search(r'id="session-count" data-count="(\d+)"', html).group(1)) >= 1
    assert png.returncode == 0 and shot.stat().st_size > 10_000, png.stderr[-2000:]


def test_metrics_endpoint_counts_io_latency_sessions_and_logins(served):
    t = served
    ini = Initiator("127.0.0.1", t.port, name=WRITER)
    try:
        ini.login(DATA)
        ini.clear_unit_attentions()
        for i in range(5):
            assert write10(ini, i * 8, b"\x11" * 4096).status == 0
        text = urllib.request.urlopen(t.http + "metrics", timeout=10).read().decode()
    finally:
        ini.close()
    lab = f'lun="0",op="write",target="{DATA}"'

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value(f"pyiscsi_lun_ops_total{{{lab}}}") == 5
    assert value(f"pyiscsi_lun_bytes_total{{{lab}}}") == 5 * 4096
    assert value(f"pyiscsi_lun_latency_seconds_count{{{lab}}}") == 5
    assert value(f'pyiscsi_lun_latency_seconds_bucket{{le="+Inf",{lab}}}') == 5
    assert value(f'pyiscsi_sessions{{target="{DATA}",type="Normal"}}') == 1
    assert value('pyiscsi_logins_total{reason="",result="ok"}') >= 1
    assert value(f'pyiscsi_pr_registrations{{lun="0",target="{DATA}"}}') == 0
    # read-only: nothing but GET/HEAD
    req = urllib.request.Request(t.http + "status.json", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
