"""The pyiscsi-target command, run as a real process (python -m pyiscsi_target)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pyiscsi_target", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(tmp_path: Path, port: int = 3260, extra_lun: str = "") -> Path:
    text = (REPO / "config" / "example.toml").read_text()
    text = text.replace('listen = ["0.0.0.0:3260", "[::]:3260"]', f'listen = ["127.0.0.1:{port}"]')
    text += extra_lun
    # The example lives in config/ and points at ../luns and ../state.
    (tmp_path / "config").mkdir(exist_ok=True)
    p = tmp_path / "config" / "cluster.toml"
    p.write_text(text)
    return p


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("serve", "check-config", "create-lun"):
        assert cmd in r.stdout
    r = run("serve", "--help")
    assert r.returncode == 0 and "--log-level" in r.stdout and "SIGTERM" in r.stdout
    r = run("create-lun", "--help")
    assert r.returncode == 0 and "--preallocate" in r.stdout and "--force" in r.stdout


def test_no_command_is_a_usage_error():
    r = run()
    assert r.returncode == 2 and "COMMAND" in r.stderr


def test_check_config_example():
    r = run("check-config", str(REPO / "config" / "example.toml"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "iqn.2026-11.org.example:quorum" in out and "iqn.2026-11.org.example:data" in out
    assert re.search(r"LUN 0: .*quorum\.img\s+1GiB", out)
    assert re.search(r"LUN 0: .*data\.img\s+16GiB", out)
    assert "0.0.0.0:3260" in out and "[::]:3260" in out


def test_check_config_creates_nothing(tmp_path):
    cfg = make_config(tmp_path)
    r = run("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "sparse, will be created" in r.stdout
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["config", "config/cluster.toml"]


def test_check_config_error_names_file_line_key(tmp_path):
    cfg = make_config(tmp_path)
    text = cfg.read_text().replace('size = "16GiB"', 'size = "16GB"')
    cfg.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"16GB"' in l)
    r = run("check-config", "cluster.toml", cwd=tmp_path / "config")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip() == f'cluster.toml:{line}: target[1].lun[0].size: "16GB" is not a size; use e.g. 16GiB'


def test_check_config_syntax_error_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[server]\nlisten = [\n")
    r = run("check-config", str(p))
    assert r.returncode == 2 and r.stderr.startswith(f"{p}:") and "TOML syntax error" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("check-config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_create_lun_sparse_and_refuses_overwrite(tmp_path):
    img = tmp_path / "luns" / "data.img"
    r = run("create-lun", str(img), "--size", "64MiB")
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == 64 * MiB and img.stat().st_blocks * 512 < MiB
    assert "64MiB" in r.stdout and "sparse" in r.stdout
    img.write_bytes(b"precious")
    r = run("create-lun", str(img), "--size", "64MiB")
    assert r.returncode == 1 and "--force" in r.stderr
    assert img.read_bytes() == b"precious"
    r = run("create-lun", str(img), "--size", "2MiB", "--force", "--preallocate", "--block-size", "4096")
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == 2 * MiB and img.stat().st_blocks * 512 >= 2 * MiB


@pytest.mark.parametrize(
    "args, words",
    [(["--size", "1GB"], "use e.g. 1GiB"), (["--size", "1000"], "multiple of the block size"),
     (["--size", "1MiB", "--block-size", "1024"], "invalid choice")],
)
def test_create_lun_bad_arguments(tmp_path, args, words):
    r = run("create-lun", str(tmp_path / "x.img"), *args)
    assert r.returncode == 2 and words in r.stderr
    assert not (tmp_path / "x.img").exists()


def test_serve_bad_config_exits_2(tmp_path):
    cfg = make_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("max_sessions = 64", "max_session = 64"))
    r = run("serve", str(cfg))
    assert r.returncode == 2
    assert re.match(rf"{re.escape(str(cfg))}:\d+: server.max_session: unknown key .*did you mean \"max_sessions\"", r.stderr)


def test_serve_lun_failure_exits_2(tmp_path):
    cfg = make_config(tmp_path, free_port())
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "identity.json").write_text("garbage")
    r = run("serve", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "identity" in r.stderr and "iqn.2026-11.org.example:quorum" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_and_stops_cleanly(tmp_path, sig):
    port = free_port()
    cfg = make_config(tmp_path, port)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "info"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not listen"
                time.sleep(0.05)
        if shutil.which("iscsi-ls"):
            ls = subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{port}"], capture_output=True, text=True, timeout=20)
            assert "iqn.2026-11.org.example:quorum" in ls.stdout and "iqn.2026-11.org.example:data" in ls.stdout
        proc.send_signal(sig)
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 0, err
    assert (tmp_path / "luns" / "quorum.img").stat().st_size == 1 << 30
    assert (tmp_path / "luns" / "data.img").stat().st_size == 16 << 30
    assert (tmp_path / "state" / "identity.json").exists()
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines
    for line in lines:  # one line per event: timestamp, level, logger
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+pyiscsi_target[\w.]*: ", line), line


def test_create_lun_preallocate_shows_progress_with_rate_and_eta(tmp_path):
    img = tmp_path / "pre.img"
    r = run("create-lun", str(img), "--size", "600MiB", "--preallocate")
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stderr.replace("\r", "\n").splitlines() if f.strip()]
    assert frames[0].endswith("ETA 0s") or "  0%" in frames[0]
    assert "100%" in frames[-1] and "600.0 MiB / 600.0 MiB" in frames[-1] and "/s  ETA" in frames[-1]
    assert len(frames) >= 4                       # 256 MiB chunks: 0 %, 2 steps, 100 %
    assert img.stat().st_blocks * 512 >= 600 << 20  # really allocated
