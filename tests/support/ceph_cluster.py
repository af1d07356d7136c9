"""A private, throw-away single-node Ceph cluster for tests and benchmarks.

One monitor and one memstore OSD, bound to 127.0.0.1 on a free port, cephx
with one keyring, everything (config, keyring, data, logs, admin sockets)
inside one short temporary directory: nothing touches /etc/ceph or
/var/lib/ceph, and several clusters can run side by side.  No mgr: librados
and librbd I/O, pool init, watch/notify and locks do not need it (see
shared/reference/ceph-test-cluster.md).  Start-up takes about a second
(``paxos propose interval = 0.05`` and memstore make it fast).

Usage::

    cluster = CephCluster()
    cluster.start()            # raises CephClusterError with the daemon logs on failure
    cluster.create_image("lun0", 64 << 20)
    ...                        # cluster.conf, cluster.keyring, cluster.client, cluster.pool
    cluster.stop()

or ``with CephCluster() as cluster: ...``.  From the command line
(``python -m tests.support.ceph_cluster``) it starts one, prints its config
path and waits for Ctrl-C.

The daemons run in the foreground as children of this process and are
stopped by PID (after checking /proc/PID/comm, so a recycled PID is never
hit).  If this process dies without stopping them, two things make sure
they go too: PR_SET_PDEATHSIG (SIGKILL when the thread that started them
exits) and a small watchdog process in its own session, which notices this
process is gone, kills the daemons and removes the directory.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["CephCluster", "CephClusterError", "ceph_available"]

DAEMONS = ("ceph-mon", "ceph-osd", "monmaptool")
_PR_SET_PDEATHSIG = 1


class CephClusterError(RuntimeError):
    """The cluster could not be started; the message carries the daemon logs."""


def ceph_available() -> str | None:
    """None when the Ceph binaries are installed, else what is missing."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    return ", ".join(missing) or None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cephx_key() -> str:
    """A cephx secret as ceph-authtool --gen-key writes it (no process needed):
    le16 type (1 = AES), le32 seconds, le32 nanoseconds, le16 length, 16 bytes."""
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # pragma: no cover - the watchdog still covers it
        pass


# The watchdog: waits for the owner process to go away (its PID gone or
# reused: the start time in /proc/PID/stat changes), then kills the daemons
# it was told about (only if /proc/PID/comm still names a Ceph daemon) and
# removes the cluster directory.  Stopping the cluster normally kills it.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
owner, start, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def stat_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
while stat_start(owner) == start:
    time.sleep(0.5)
try:
    pids = [int(x) for x in open(os.path.join(d, "pids")).read().split()]
except OSError:
    pids = []
for pid in pids:
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        continue
    if comm.startswith("ceph-"):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
time.sleep(0.2)
shutil.rmtree(d, ignore_errors=True)
"""


class CephCluster:
    """A single-node cluster in a temporary directory (see the module doc)."""

    def __init__(self, *, pool: str = "rbd", memstore_bytes: int = 4 << 30, start_timeout: float = 60.0,
                 base_dir: str | None = None) -> None:
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.start_timeout = start_timeout
        self._base_dir = base_dir
        self.dir: Path | None = None
        self.port = 0
        self.fsid = ""
        self.client = "admin"  # the client id: the entity is client.admin
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._watchdog: subprocess.Popen | None = None
        self._rados = None

    # -- what clients need ---------------------------------------------------------

    @property
    def conf(self) -> Path:
        assert self.dir is not None
        return self.dir / "ceph.conf"

    @property
    def keyring(self) -> Path:
        assert self.dir is not None
        return self.dir / "keyring"

    @property
    def client_name(self) -> str:
        return f"client.{self.client}"

    def env(self) -> dict[str, str]:
        """Environment for the ``ceph``/``rbd``/``rados`` CLIs (and librados
        users that read CEPH_CONF)."""
        env = dict(os.environ)
        env["CEPH_CONF"] = str(self.conf)
        env["CEPH_KEYRING"] = str(self.keyring)
        return env

    def cli(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Ceph CLI (``rbd``, ``ceph``, ``rados``) against this cluster."""
        tool, rest = args[0], list(args[1:])
        cmd = [tool, "-c", str(self.conf), "--keyring", str(self.keyring), "--id", self.client, *rest]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and r.returncode != 0:
            raise CephClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    # -- life cycle ----------------------------------------------------------------

    def __enter__(self) -> "CephCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "CephCluster":
        missing = ceph_available()
        if missing:
            raise CephClusterError(f"Ceph is not installed ({missing} missing): "
                                   "apt-get install ceph-mon ceph-osd ceph-common python3-rados python3-rbd")
        t0 = time.monotonic()
        # Short path: admin sockets live here and sun_path holds 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ceph-", dir=self._base_dir or "/tmp"))
        deadline = t0 + self.start_timeout
        try:
            self._start_watchdog()
            self._write_config()
            self._mkfs_mon()
            self._spawn("mon", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
            self._wait_port(deadline)
            r = self._connect(deadline)
            osd_uuid = str(uuid.uuid4())
            (self.dir / "osd" / "osd.0").mkdir()  # memstore's mkfs does not create it
            self._mon_command(r, {"prefix": "osd new", "uuid": osd_uuid, "id": 0}, deadline)
            self._run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], deadline)
            self._spawn("osd", ["ceph-osd", "-f", "-c", str(self.conf), "-i", "0"])
            self._mon_command(r, {"prefix": "osd pool create", "pool": self.pool, "pg_num": 8, "pgp_num": 8,
                                  "pool_type": "replicated"}, deadline)
            self._mon_command(r, {"prefix": "osd pool application enable", "pool": self.pool, "app": "rbd"},
                              deadline)
            # rbd pool init waits (in librados) until the OSD is up and the PGs
            # are active: the cluster accepts I/O once it returns.
            _, rbd = self.bindings()
            with r.open_ioctx(self.pool) as ioctx:
                self._bounded(deadline, "rbd pool init", lambda: rbd.RBD().pool_init(ioctx, True))
        except BaseException as e:
            logs = self.logs()
            self.stop()
            if isinstance(e, CephClusterError):
                raise CephClusterError(f"{e}\n{logs}") from None
            raise CephClusterError(f"Ceph test cluster did not start: {e!r}\n{logs}") from e
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the daemons (by PID) and remove the directory.  Idempotent."""
        if self._rados is not None:
            try:
                self._rados.shutdown()
            except Exception:
                pass
            self._rados = None
        for name in ("osd", "mon"):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            if _comm(p.pid).startswith("ceph-"):
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        if self._watchdog is not None:
            if self._watchdog.poll() is None and _comm(self._watchdog.pid).startswith("python"):
                self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- helpers for tests ---------------------------------------------------------

    def daemon_pid(self, name: str) -> int:
        """PID of a daemon this cluster started ("mon" or "osd"), e.g. to
        SIGSTOP the OSD in a test of what happens when it stops answering."""
        return self._procs[name].pid

    def bindings(self):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from pyiscsi_target.storage.ceph_bindings import import_rados_rbd

        return import_rados_rbd()

    def rados(self):
        """A connected ``rados.Rados`` of this (test) process, shared."""
        if self._rados is None:
            self._rados = self._connect(time.monotonic() + self.start_timeout)
        return self._rados

    def create_image(self, name: str, size: int, *, pool: str | None = None) -> str:
        """Create an RBD image with the layering feature only (no exclusive-lock:
        several gateways write one image; see the module doc of the backend).
        Returns "pool/name"."""
        rados, rbd = self.bindings()
        with self.rados().open_ioctx(pool or self.pool) as ioctx:
            rbd.RBD().create(ioctx, name, size, old_format=False, features=rbd.RBD_FEATURE_LAYERING)
        return f"{pool or self.pool}/{name}"

    def remove_image(self, name: str, *, pool: str | None = None) -> None:
        _, rbd = self.bindings()
        with self.rados().open_ioctx(pool or self.pool) as ioctx:
            rbd.RBD().remove(ioctx, name)

    def resize_image(self, name: str, size: int, *, pool: str | None = None) -> None:
        _, rbd = self.bindings()
        with self.rados().open_ioctx(pool or self.pool) as ioctx:
            with rbd.Image(ioctx, name) as img:
                img.resize(size)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every daemon log (for failure messages)."""
        if self.dir is None:
            return ""
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            out.append(f"--- {f.name} (last {len(lines)} lines) ---\n" + "\n".join(lines))
        return "\n".join(out)

    # -- internals -----------------------------------------------------------------

    def _write_config(self) -> None:
        d = self.dir
        assert d is not None
        for sub in ("run", "log", "crash", "mon", "osd"):
            (d / sub).mkdir()
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        keys = {"mon.": _cephx_key(), "client.admin": _cephx_key(), "osd.0": _cephx_key()}
        caps = {
            "mon.": {"mon": "allow *"},
            "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
            "osd.0": {"mon": "allow profile osd", "osd": "allow *", "mgr": "allow profile osd"},
        }
        ring = []
        for entity, key in keys.items():
            ring.append(f"[{entity}]\n\tkey = {key}")
            ring.extend(f'\tcaps {k} = "{v}"' for k, v in caps[entity].items())
        self.keyring.write_text("\n".join(ring) + "\n")
        os.chmod(self.keyring, 0o600)
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {d}/run
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# start-up in ~1 s instead of ~6.5 s: the monitor commits maps at once
paxos propose interval = 0.05
paxos min wait = 0.01
[mon]
mon data = {d}/mon/$name
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
[osd]
osd data = {d}/osd/$name
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd op num shards = 2
osd op num threads per shard = 1
[client]
# clients (the target under test, rbd CLI) log nowhere and keep no admin socket
log file =
admin socket =
""")

    def _mkfs_mon(self) -> None:
        d = self.dir
        assert d is not None
        deadline = time.monotonic() + self.start_timeout
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{self.port}]", str(d / "monmap")], deadline)
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
                   "--keyring", str(self.keyring)], deadline)

    def _run(self, cmd: list[str], deadline: float) -> None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()),
                               preexec_fn=_pdeathsig, cwd=self.dir)
        except subprocess.TimeoutExpired:
            raise CephClusterError(f"{' '.join(cmd)} timed out") from None
        if r.returncode != 0:
            raise CephClusterError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        d = self.dir
        assert d is not None
        out = open(d / "log" / f"{name}.stdout", "wb")
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=_pdeathsig, cwd=d)
        finally:
            out.close()
        self._procs[name] = p
        with open(d / "pids", "a") as f:
            f.write(f"{p.pid}\n")

    def _start_watchdog(self) -> None:
        me = os.getpid()
        with open(f"/proc/{me}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(me), start, str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives a signal sent to our process group
        )

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise CephClusterError(f"ceph-{name} exited with status {p.returncode}")

    def _wait_port(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CephClusterError(f"ceph-mon is not listening on 127.0.0.1:{self.port} "
                                       f"after {self.start_timeout:g} s")
            time.sleep(0.02)

    def _connect(self, deadline: float):
        rados, _ = self.bindings()
        timeout = max(1, int(deadline - time.monotonic()))
        r = rados.Rados(conffile=str(self.conf), rados_id=self.client,
                        conf={"keyring": str(self.keyring), "client_mount_timeout": str(timeout),
                              "rados_mon_op_timeout": str(timeout), "rados_osd_op_timeout": str(timeout)})
        r.connect(timeout=timeout)
        return r

    def _bounded(self, deadline: float, what: str, fn):
        """Call a blocking librados function; fail if a daemon died meanwhile
        (the call itself is bounded by the op timeouts set in _connect)."""
        self._check_alive()
        try:
            return fn()
        except Exception as e:
            self._check_alive()
            raise CephClusterError(f"{what} failed: {e!r}") from e

    def _mon_command(self, r, cmd: dict, deadline: float) -> None:
        ret, out, err = self._bounded(deadline, cmd["prefix"], lambda: r.mon_command(json.dumps(cmd), b""))
        if ret != 0:
            raise CephClusterError(f"mon command {cmd} failed ({ret}): {err}")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stop_signal(signum, frame):  # pragma: no cover - manual use
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover - manual use
    # Explicit handlers: a background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, _stop_signal)
    signal.signal(signal.SIGTERM, _stop_signal)
    with CephCluster() as c:
        print(f"cluster up in {c.startup_seconds:.2f} s: CEPH_CONF={c.conf} CEPH_KEYRING={c.keyring} "
              f"client={c.client_name} pool={c.pool} fsid={c.fsid}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
