"""`pyiscsi-target reload` and SIGHUP against the real server with real clients."""

from __future__ import annotations

import fcntl
import re
import signal
import subprocess


from tests.conftest import require
from tests.e2e.ops_support import capacity, cli, status, wait_for
from tests.support.initiator import Initiator
from tests.support.target import DATA, QUORUM

EXTRA_TARGET = "iqn.2026-11.org.example:extra"
CAPACITY_CHANGED = bytes([0x2A, 0x09])
REPORTED_LUNS_CHANGED = bytes([0x3F, 0x0E])


def ls(t) -> str:
    require("iscsi-ls")
    p = subprocess.run(["iscsi-ls", "-s", f"iscsi://{t.portal}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def add_lun(cfg, lun_id: int, path: str, size: str = "32MiB") -> None:
    cfg.write_text(cfg.read_text() + f'\n  [[target.lun]]\n  id = {lun_id}\n  path = "{path}"\n  size = "{size}"\n')


def session(t, iqn: str, name: str, lun: int = 0) -> Initiator:
    ini = Initiator("127.0.0.1", t.port, name=name)
    ini.login(iqn)
    ini.clear_unit_attentions(lun)
    return ini


def test_reload_adds_lun_that_iscsi_ls_lists_and_leaves_other_targets_alone(target):
    t = target
    quorum = session(t, QUORUM, "iqn.2026-11.test:node1")
    data = session(t, DATA, "iqn.2026-11.test:node2")
    try:
        before = {s["tsih"] for s in status(t.config)["sessions"]}
        add_lun(t.config, 2, "luns/data2.img", "32MiB")   # appended to the last target: DATA
        p = cli("reload", t.config)
        assert p.returncode == 0, p.stderr
        assert f"target {DATA}: LUN 2 added" in p.stdout
        assert re.search(r"Lun:2\s+Type:DIRECT_ACCESS \(Size:31M\)", ls(t))
        # The connected DATA initiator is told to rescan (3F/0E on the LUNs it knew) ...
        assert REPORTED_LUNS_CHANGED in data.clear_unit_attentions(0)
        assert data.clear_unit_attentions(2) == [bytes([0x29, 0x00])]   # a new LU: POWER ON first
        assert capacity(data, 2) == (32 << 20 >> 9, 512)
        # ... the QUORUM session (target unchanged) is untouched: no unit attention, same session.
        assert quorum.clear_unit_attentions(0) == []
        assert before <= {s["tsih"] for s in status(t.config)["sessions"]}
    finally:
        quorum.close()
        data.close()


def test_reload_grows_lun_and_connected_client_sees_capacity_changed(target):
    t = target
    ini = session(t, DATA, "iqn.2026-11.test:node1")
    try:
        assert capacity(ini) == (128 << 20 >> 9, 512)
        ini.clear_unit_attentions(1)
        t.config.write_text(t.config.read_text().replace('size = "128MiB"', 'size = "192MiB"'))
        p = cli("reload", t.config)
        assert p.returncode == 0, p.stderr
        assert "LUN 0 grown from 128MiB to 192MiB" in p.stdout
        assert ini.clear_unit_attentions(0) == [CAPACITY_CHANGED]
        assert capacity(ini) == (192 << 20 >> 9, 512)
        assert ini.clear_unit_attentions(1) == []            # the other LUN did not change
        assert (t.config.parent / "luns" / "data.img").stat().st_size == 192 << 20
        lun0 = next(x for x in status(t.config)["targets"] if x["iqn"] == DATA)["luns"][0]
        assert lun0["size"] == 192 << 20
    finally:
        ini.close()


def test_bad_reload_is_refused_whole_and_old_config_keeps_serving(target):
    t = target
    good = t.config.read_text()
    # 1. invalid file: exit 2 with file:line: key, nothing changes
    t.config.write_text(good + '\n[[target]]\niqn = "iqn.2026-11.org.example:new"\n  [[target.lun]]\n  id = 0\n'
                        '  path = "luns/new.img"\n  size = "8MiB"\n  bogus_key = 1\n')
    p = cli("reload", t.config)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert re.search(rf"{re.escape(str(t.config))}:\d+: target\[2\]\.lun\[0\]\.bogus_key: unknown key", p.stderr), p.stderr
    assert "running configuration stays in force" in p.stderr
    out = ls(t)
    assert "iqn.2026-11.org.example:new" not in out and QUORUM in out and DATA in out
    # 2. valid file, but an image cannot be opened (locked by another process):
    #    the valid half (a new target) is not applied either.
    locked = t.config.parent / "luns" / "locked.img"
    locked.write_bytes(bytes(1 << 20))
    with open(locked, "r+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t.config.write_text(good + f'\n[[target]]\niqn = "{EXTRA_TARGET}"\n  [[target.lun]]\n  id = 0\n'
                            '  path = "luns/extra.img"\n  size = "8MiB"\n'
                            f'\n[[target]]\niqn = "iqn.2026-11.org.example:locked"\n  [[target.lun]]\n  id = 0\n'
                            f'  path = "{locked}"\n')
        p = cli("reload", t.config, "--json")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "in use" in p.stdout
    out = ls(t)
    assert EXTRA_TARGET not in out and re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:127M\)", out)
    st = status(t.config)
    assert st["last_reload"]["ok"] is False and st["reloads"] == {"ok": 0, "refused": 2}
    assert not (t.config.parent / "luns" / "extra.img").exists() or EXTRA_TARGET not in out
    # 3. the old config still reloads fine afterwards
    t.config.write_text(good)
    assert cli("reload", t.config).returncode == 0


def test_sighup_adds_target_and_removal_closes_only_its_sessions(target):
    t = target
    data = session(t, DATA, "iqn.2026-11.test:node1")
    quorum = session(t, QUORUM, "iqn.2026-11.test:node2")
    good = t.config.read_text()
    try:
        t.config.write_text(good + f'\n[[target]]\niqn = "{EXTRA_TARGET}"\n  [[target.lun]]\n  id = 0\n'
                            '  path = "luns/extra.img"\n  size = "16MiB"\n')
        t.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: EXTRA_TARGET in ls(t), what="the new target after SIGHUP")
        assert data.clear_unit_attentions(0) == []           # DATA unchanged: untouched
        # Remove QUORUM: its session is closed, DATA's goes on.
        t.config.write_text(good.replace(f'iqn = "{QUORUM}"', f'iqn = "{EXTRA_TARGET}"')
                            .replace('path = "luns/quorum.img"', 'path = "luns/extra.img"')
                            .replace('size = "64MiB"\n', 'size = "16MiB"\n', 1))
        p = cli("reload", t.config)
        assert p.returncode == 0, p.stderr
        assert f"target {QUORUM} removed (1 session closed)" in p.stdout
        assert quorum.closed_by_target()
        assert QUORUM not in ls(t)
        assert data.command(bytes(6)).status == 0
    finally:
        data.close()
        quorum.close()
