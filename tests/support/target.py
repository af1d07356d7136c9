"""Start the real server process on a loopback port for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

QUORUM = "iqn.2026-11.org.example:quorum"
DATA = "iqn.2026-11.org.example:data"


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(dirpath: Path, port: int, *, extra_server: str = "", iscsi: str = "",
                 data_size: str = "128MiB", quorum_size: str = "64MiB", listen=None) -> Path:
    listen = listen or [f"127.0.0.1:{port}"]
    lst = ", ".join(f'"{x}"' for x in listen)
    cfg = dirpath / "target.toml"
    cfg.write_text(f"""
[server]
listen = [{lst}]
state_dir = "state"
{extra_server}

[iscsi]
{iscsi}

[[target]]
iqn = "{QUORUM}"
alias = "quorum"
  [[target.lun]]
  id = 0
  path = "luns/quorum.img"
  size = "{quorum_size}"

[[target]]
iqn = "{DATA}"
  [[target.lun]]
  id = 0
  path = "luns/data.img"
  size = "{data_size}"
  [[target.lun]]
  id = 1
  path = "luns/data4k.img"
  size = "64MiB"
  block_size = 4096
""")
    return cfg


@dataclass
class RunningTarget:
    config: Path
    host: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def portal(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, iqn: str = DATA, lun: int = 0, **params) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"iscsi://{self.portal}/{iqn}/{lun}" + (f"?{q}" if q else "")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_target(config: Path, host: str, port: int, *, log_name: str = "server.log",
                 timeout: float = 20.0, args: tuple[str, ...] = ()) -> RunningTarget:
    log = config.parent / log_name
    fh = open(log, "ab")
    # Run the checkout under test, whatever an editable install elsewhere points at.
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "pyiscsi_target", "serve", str(config), "--log-level", "DEBUG", *args],
                            stdout=fh, stderr=subprocess.STDOUT, cwd=config.parent, env=env)
    fh.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return RunningTarget(config, host, port, proc, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not listen within {timeout}s:\n{log.read_text()}")
