"""Start and stop the targets a benchmark compares: ours and tgt, on loopback.

Both export images of the same size on the same filesystem; processes are
stopped by PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its threads, from /proc: seconds in
    user space (for us: Python) and in the kernel (system calls, TCP)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build_client() -> Path:
    """Compile benchmarks/iscsi_bench.c (needs gcc and Debian's libiscsi-dev)."""
    out = RESULTS / "bin" / "iscsi_bench"
    src = HERE / "iscsi_bench.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(out), str(src), "-liscsi"], check=True)
    return out


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen
    extra: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        for fn in self.extra:
            fn()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_ours(workdir: Path, size: str = "1GiB", *, iscsi: str = "", listen: str = "127.0.0.1",
               netns: str | None = None) -> Target:
    port = 3260 if netns else free_port()
    iqn = "iqn.2026-11.org.example:bench"
    cfg = workdir / "ours.toml"
    cfg.write_text(f"""
[server]
listen = ["{listen}:{port}"]
state_dir = "state"
nop_interval = "0s"
[iscsi]
{iscsi}
[[target]]
iqn = "{iqn}"
  [[target.lun]]
  id = 0
  path = "ours.img"
  size = "{size}"
""")
    cmd = [sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "WARNING"]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    log = open(workdir / "ours.log", "ab")
    # Benchmark this checkout, whatever an installed copy elsewhere would be.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    if not netns:
        wait_port(listen, port, proc)
    else:
        time.sleep(2.0)
    return Target("ours", f"iscsi://{listen}:{port}/{iqn}/0", proc)


def start_tgt(workdir: Path, size_bytes: int = 1 << 30, *, listen: str = "127.0.0.1",
              netns: str | None = None) -> Target:
    if shutil.which("tgtd") is None:
        raise RuntimeError("tgtd is not installed (Debian package tgt)")
    port = 3260 if netns else free_port()
    ctl = 2000 + os.getpid() % 5000          # our own management socket: never another tgtd's
    img = workdir / "tgt.img"
    with open(img, "wb") as f:
        f.truncate(size_bytes)
    cmd = ["tgtd", "-f", "-C", str(ctl), "--iscsi", f"portal={listen}:{port}"]
    pre = ["ip", "netns", "exec", netns] if netns else []
    log = open(workdir / "tgt.log", "ab")
    proc = subprocess.Popen(pre + cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    time.sleep(1.0)
    iqn = "iqn.2026-11.org.example:tgt"
    adm = pre + ["tgtadm", "-C", str(ctl), "--lld", "iscsi"]
    subprocess.run(adm + ["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn], check=True)
    subprocess.run(adm + ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(img)],
                   check=True)
    subprocess.run(adm + ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True)
    if not netns:
        wait_port(listen, port, proc)
    return Target("tgt", f"iscsi://{listen}:{port}/{iqn}/1", proc)
