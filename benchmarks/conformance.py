#!/usr/bin/env python3
"""libiscsi's iscsi-test-cu against pyiscsi-target and against tgt, in one run.

    python benchmarks/conformance.py            # ours and tgt, every configuration
    python benchmarks/conformance.py --no-tgt   # ours only

For each configuration (see CONFIGS) it starts our server on a fresh image,
runs every iscsi-test-cu test once (family ALL, which holds every suite of the
SCSI, iSCSI and LINUX families) with two initiator names and a second
(multipath) URL, then does the same against tgt on an identical fresh image:
tgtd is started on its own loopback port with its own control socket directory
(a private mount namespace over /var/run/tgtd when unshare works, else a
control port nobody holds), configured with tgtadm, and stopped by its PID.

A test that skips itself (libiscsi logs "[SKIPPED]" and CUnit counts it as
passed) is counted as skipped, never as passed.  A test that never ran (crash,
timeout, suite set-up failure) counts as failed.  The raw logs are kept under
benchmarks/results/<timestamp>/.  The last line is "N passed, N failed,
N skipped" over all of our runs; the exit status is 1 when any of ours failed.

libiscsi 1.19 takes only header_digest from URL arguments, and its
iscsi-test-cu overrides even that with "None,CRC32C" at login; so the digest
and segment-size configurations are set on the target side (our [iscsi] keys,
tgt's target parameters).  libiscsi never offers DataDigest, so DataDigest
cannot be exercised with this tool.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_IQN = "iqn.2026-11.org.example:conformance"
INITIATORS = ("iqn.2026-11.test:cu-1", "iqn.2026-11.test:cu-2")
IMAGE_SIZE = 128 << 20
BLOCK_SIZE = 512
RO_SIZE = 16 << 20  # a write-protected LU for the tests that need one (ReadOnly)
RUN_TIMEOUT = 1200.0

# name -> (our [iscsi] TOML lines, tgt target parameters, extra URL arguments)
CONFIGS: dict[str, tuple[dict[str, str], dict[str, str], dict[str, str]]] = {
    "default": ({}, {}, {}),
    "crc32c": ({"header_digest": '["CRC32C"]'}, {"HeaderDigest": "CRC32C"}, {"header_digest": "crc32c"}),
    "small-bursts": (
        {"max_recv_data_segment_length": '"4KiB"', "max_burst_length": '"16KiB"', "first_burst_length": '"8KiB"'},
        {"MaxRecvDataSegmentLength": "4096", "MaxBurstLength": "16384", "FirstBurstLength": "8192"},
        {},
    ),
}

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


# --------------------------------------------------------------------------
# iscsi-test-cu: the test list and the output parser


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise SystemExit(f"{name} is not installed (Debian: apt-get install libiscsi-bin tgt)")
    return path


def list_tests(family: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """family -> [(suite, test)] from ``iscsi-test-cu --list``."""
    out = subprocess.run([tool("iscsi-test-cu"), "--list"], capture_output=True, text=True, check=True).stdout
    fams: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in out.split():
        parts = line.split(".")
        if len(parts) == 3 and (family is None or parts[0] == family):
            fams[parts[0]].append((parts[1], parts[2]))
    return dict(fams)


@dataclass
class TestResult:
    suite: str
    test: str
    status: str
    detail: str = ""


_EVENT = re.compile(
    r"^Suite: (?P<suite>\S+)"
    r"|^  Test: (?P<test>\S+) \.\.\."
    r"|(?:^|(?<=\.\.\.))(?P<result>passed|FAILED)"
    r"|^WARNING - Suite (?P<phase>initialization|cleanup) failed for '(?P<wsuite>[^']*)'",
    re.M,
)
# "[SKIPPED]" lines, and the few skips libiscsi 1.19 logs without that tag.
_SKIP = re.compile(r"\[SKIPPED\][^\n]*|SWP is not changeable")
_FAILURE = re.compile(r"^\s+\d+\. (\S+:\d+)\s+- (.*)$", re.M)


def parse_output(text: str, expected: list[tuple[str, str]]) -> list[TestResult]:
    """One result per expected (suite, test), from CUnit's verbose output.

    Between "Test: NAME ..." and its "passed"/"FAILED" is the test's own log:
    any "[SKIPPED]" there makes it a skip.  Output after the result belongs to
    the suite's clean-up, not to the test.  Tests without a result (the
    process died, a suite failed to set up) are failures."""
    got: dict[tuple[str, str], TestResult] = {}
    suite = None
    cur: tuple[str, str] | None = None
    cur_start = 0
    for m in _EVENT.finditer(text):
        if m.group("suite"):
            suite, cur = m.group("suite"), None
        elif m.group("test"):
            cur, cur_start = (suite or "?", m.group("test")), m.end()
        elif m.group("result") and cur is not None:
            body = text[cur_start : m.start()]
            if m.group("result") == "FAILED":
                tail = text[m.end() : m.end() + 4000]
                stop = re.search(r"^\S|^  Test: ", tail, re.M)
                where = Counter(f"{a} {b}" for a, b in _FAILURE.findall(tail[: stop.start() if stop else None]))
                detail = "; ".join(f"{w}" + (f" (x{n})" if n > 1 else "") for w, n in list(where.items())[:4])
                if len(where) > 4:
                    detail += f"; and {len(where) - 4} more"
                got[cur] = TestResult(*cur, FAILED, detail)
            elif (s := _SKIP.search(body)) is not None:
                got[cur] = TestResult(*cur, SKIPPED, s.group(0).removeprefix("[SKIPPED]").strip())
            else:
                got[cur] = TestResult(*cur, PASSED)
            cur = None
        elif m.group("phase") == "initialization":
            for s, t in expected:
                if s == m.group("wsuite"):
                    got.setdefault((s, t), TestResult(s, t, FAILED, "suite initialization failed"))
    out = []
    for s, t in expected:
        out.append(got.get((s, t)) or TestResult(s, t, FAILED, "did not run (no result in the log)"))
    return out


def summary_counts(text: str) -> tuple[int, int, int] | None:
    """CUnit's own "tests Total Ran Passed Failed" line: (ran, passed, failed)."""
    m = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
    return (int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else None


@dataclass
class Run:
    target: str
    config: str
    results: list[TestResult]
    log: Path
    seconds: float
    note: str = ""

    def counts(self, suites: set[str] | None = None) -> Counter:
        return Counter(r.status for r in self.results if suites is None or r.suite in suites)


def run_cu(url: str, mp_url: str | None, log: Path, family: str = "ALL", timeout: float = RUN_TIMEOUT,
           only: list[tuple[str, str]] | None = None) -> tuple[list[TestResult], float, str]:
    """Run one family of iscsi-test-cu (or ``only`` these tests of it); keep
    its whole output in ``log``."""
    expected = only if only is not None else list_tests(family)[family]
    select = ",".join(f"{family}.{s}.{t}" for s, t in only) if only is not None else family
    # --allow-sanitize: a target without SANITIZE then says so itself, rather
    # than every SANITIZE test skipping for want of the flag.
    cmd = [tool("iscsi-test-cu"), "--dataloss", "--allow-sanitize", "--verbose", "-t", select,
           "-i", INITIATORS[0], "-I", INITIATORS[1], url] + ([mp_url] if mp_url else [])
    # Unbuffered, so libiscsi's stderr lines stay in order with CUnit's stdout.
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-o0", "-e0"] + cmd
    t0 = time.monotonic()
    note = ""
    with open(log, "wb") as fh:
        fh.write(("+ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            note = f"iscsi-test-cu killed after {timeout:.0f}s"
    secs = time.monotonic() - t0
    text = log.read_text(errors="replace")
    results = parse_output(text, expected)
    cu = summary_counts(text)
    nfail = sum(r.status == FAILED for r in results)
    if cu is not None and cu[2] != sum(r.status == FAILED and "did not run" not in r.detail for r in results):
        note += f" (CUnit reports {cu[2]} failed, parsed {nfail})"
    if cu is None and not note:
        note = f"iscsi-test-cu exited {p.returncode} without a summary"
    return results, secs, note.strip()


# --------------------------------------------------------------------------
# the two targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s; see {log}")


def stop_pid(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Ours:
    name = "ours"

    def __init__(self, workdir: Path, iscsi: dict[str, str]):
        self.dir = workdir
        self.port = free_port()
        iscsi_lines = "\n".join(f"{k} = {v}" for k, v in iscsi.items())
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "target.toml"
        cfg.write_text(
            f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nstate_dir = "state"\n\n'
            f"[iscsi]\n{iscsi_lines}\n\n"
            "[admin]\nenabled = false\n\n"  # no admin socket: deep work dirs exceed the AF_UNIX path limit
            f'[[target]]\niqn = "{TARGET_IQN}"\n  [[target.lun]]\n  id = 0\n'
            f'  path = "luns/disk.img"\n  size = "{IMAGE_SIZE}"\n  block_size = {BLOCK_SIZE}\n'
            f'  [[target.lun]]\n  id = 1\n  path = "luns/readonly.img"\n  size = "{RO_SIZE}"\n'
            f"  block_size = {BLOCK_SIZE}\n  read_only = true\n"
        )
        (workdir / "luns").mkdir(exist_ok=True)
        with open(workdir / "luns" / "readonly.img", "wb") as f:  # a read-only LU is never created
            f.truncate(RO_SIZE)
        self.log = workdir / "server.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "INFO"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)),
            )
        wait_listening(self.port, self.proc, "pyiscsi-target", self.log)
        self.url = f"iscsi://127.0.0.1:{self.port}/{TARGET_IQN}/0"
        self.ro_url = f"iscsi://127.0.0.1:{self.port}/{TARGET_IQN}/1"

    def stop(self) -> str:
        rc = stop_pid(self.proc)
        return "" if rc == 0 else f"server exited {rc}"


class Tgt:
    """tgtd on a loopback port, its control socket out of everyone else's way."""

    name = "tgt"

    def __init__(self, workdir: Path, params: dict[str, str]):
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.port = free_port()
        self.image = workdir / "disk.img"
        self.ro_image = workdir / "readonly.img"
        for img, size in ((self.image, IMAGE_SIZE), (self.ro_image, RO_SIZE)):
            with open(img, "wb") as f:
                f.truncate(size)
        ipc = workdir / "tgtd-ipc"
        ipc.mkdir(exist_ok=True)
        self.log = workdir / "tgtd.log"
        tgtd = [tool("tgtd"), "-f", "-C", "0", "--iscsi", f"portal=127.0.0.1:{self.port}"]
        self.ns = self._namespace_works()
        self.ctl = 0
        if self.ns:
            # A private mount namespace: /var/run/tgtd is our own directory there.
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /var/run/tgtd && exec "$@"', str(ipc)] + tgtd
        else:
            self.ctl = self._free_control_port()
            tgtd[3] = str(self.ctl)
            cmd = tgtd
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
                                         start_new_session=True)
        wait_listening(self.port, self.proc, "tgtd", self.log)
        self._wait_control()
        self.adm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", TARGET_IQN)
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                 "--backing-store", str(self.image), "--blocksize", str(BLOCK_SIZE))
        # Thin provisioning on, as ours (UNMAP, WRITE SAME UNMAP, GET LBA STATUS).
        self.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1",
                 "--params", "thin_provisioning=1")
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "2",
                 "--backing-store", str(self.ro_image), "--blocksize", str(BLOCK_SIZE))
        self.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "2", "--params", "readonly=1")
        for k, v in params.items():
            self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", k, "--value", v)
        self.adm("--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL")
        # tgt's LUN 0 is its controller; the disk is LUN 1.
        self.url = f"iscsi://127.0.0.1:{self.port}/{TARGET_IQN}/1"
        self.ro_url = f"iscsi://127.0.0.1:{self.port}/{TARGET_IQN}/2"

    @staticmethod
    def _namespace_works() -> bool:
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
            return False
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
        return r.returncode == 0 and Path("/var/run/tgtd").is_dir()

    @staticmethod
    def _free_control_port() -> int:
        import fcntl

        run = Path("/var/run/tgtd")
        run.mkdir(parents=True, exist_ok=True)
        for n in range(3000 + os.getpid() % 20000, 65535):
            lock = run / f"socket.{n}.lock"
            if lock.exists():
                with open(lock, "a") as f:
                    try:
                        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.lockf(f, fcntl.LOCK_UN)
                    except OSError:
                        continue
            if not (run / f"socket.{n}").exists():
                return n
        raise RuntimeError("no free tgtd control port")

    def _prefix(self) -> list[str]:
        base = [tool("tgtadm"), "-C", str(self.ctl), "--lld", "iscsi"]
        return (["nsenter", "-t", str(self.proc.pid), "-m"] + base) if self.ns else base

    def adm(self, *args: str) -> str:
        r = subprocess.run(self._prefix() + list(args), capture_output=True, text=True)
        with open(self.dir / "tgtadm.log", "a") as f:
            f.write(f"+ tgtadm {' '.join(args)}\n{r.stdout}{r.stderr}")
        if r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def _wait_control(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(self._prefix() + ["--mode", "target", "--op", "show"], capture_output=True)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"tgtd control socket not ready: {r.stderr!r}")
            time.sleep(0.1)

    def stop(self) -> str:
        # tgtd ignores SIGTERM; it exits on "system delete" once it has no targets.
        subprocess.run(self._prefix() + ["--mode", "target", "--op", "delete", "--force", "--tid", "1"],
                       capture_output=True)
        subprocess.run(self._prefix() + ["--mode", "system", "--op", "delete"], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        rc = stop_pid(self.proc)
        return "" if rc in (0, -signal.SIGTERM) else f"tgtd exited {rc}"


# --------------------------------------------------------------------------
# the run and the table


def run_target(kind: str, config: str, outdir: Path, timeout: float) -> Run:
    ours_iscsi, tgt_params, url_args = CONFIGS[config]
    work = outdir / f"{kind}-{config}"
    t0 = time.monotonic()
    target = Ours(work, ours_iscsi) if kind == "ours" else Tgt(work, tgt_params)
    url = target.url + ("?" + "&".join(f"{k}={v}" for k, v in url_args.items()) if url_args else "")
    try:
        results, _, note = run_cu(url, url, work / "iscsi-test-cu.log", timeout=timeout)
        # Tests that need a write-protected LU run again against one.
        ro = [(r.suite, r.test) for r in results if r.status == SKIPPED and "write-protected" in r.detail]
        if ro:
            ro_results, _, ro_note = run_cu(target.ro_url, None, work / "iscsi-test-cu-readonly.log",
                                            timeout=timeout, only=ro)
            got = {(r.suite, r.test): r for r in ro_results}
            results = [got.get((r.suite, r.test), r) for r in results]
            note = "; ".join(x for x in (note, ro_note) if x)
    finally:
        stop_note = target.stop()
    img = (work / "luns" / "disk.img") if kind == "ours" else target.image
    with open(img, "r+b") as f:  # keep the logs, not 128 MiB of test data
        f.truncate(0)
    return Run(kind, config, results, work / "iscsi-test-cu.log", time.monotonic() - t0,
               "; ".join(x for x in (note, stop_note) if x))


def fmt(c: Counter) -> str:
    return f"{c[PASSED]:4d} {c[FAILED]:4d} {c[SKIPPED]:4d}"


def table(runs: list[Run], families: dict[str, list[tuple[str, str]]]) -> str:
    lines = []
    configs = list(dict.fromkeys(r.config for r in runs))
    by = {(r.target, r.config): r for r in runs}
    suites = list(dict.fromkeys(s for s, _ in families["ALL"]))
    head = "".join(f" | {t + '[' + c + ']':>21s}" for c in configs for t in ("ours", "tgt") if (t, c) in by)
    sub = "".join(" |  pass fail skip" for c in configs for t in ("ours", "tgt") if (t, c) in by)
    lines.append(f"{'suite':<26s}{head}")
    lines.append(f"{'':<26s}{sub}")
    lines.append("-" * len(lines[-1]))
    for s in suites:
        row = f"{s:<26s}"
        for c in configs:
            for t in ("ours", "tgt"):
                if (t, c) in by:
                    row += f" | {fmt(by[t, c].counts({s})):>16s}"
        lines.append(row)
    lines.append("-" * len(lines[1]))
    for fam in ("SCSI", "iSCSI", "LINUX", "ALL"):
        fs = {s for s, _ in families.get(fam, [])}
        row = f"{'family ' + fam:<26s}"
        for c in configs:
            for t in ("ours", "tgt"):
                if (t, c) in by:
                    row += f" | {fmt(by[t, c].counts(fs)):>16s}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-tgt", action="store_true", help="run only against our target")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--timeout", type=float, default=RUN_TIMEOUT, help="seconds per iscsi-test-cu run")
    ap.add_argument("--out", type=Path, default=None, help="log directory (default benchmarks/results/<time>)")
    a = ap.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}")
    outdir = a.out or RESULTS / time.strftime("conformance-%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    families = list_tests()
    runs: list[Run] = []
    for c in configs:
        for kind in ("ours",) + (() if a.no_tgt else ("tgt",)):
            print(f"running iscsi-test-cu against {kind} [{c}] ...", file=sys.stderr, flush=True)
            try:
                r = run_target(kind, c, outdir, a.timeout)
            except Exception as e:  # a target that does not start fails every test
                r = Run(kind, c, [TestResult(s, t, FAILED, f"target did not start: {e}") for s, t in families["ALL"]],
                        outdir / f"{kind}-{c}", 0.0, str(e))
            runs.append(r)
            cnt = r.counts()
            print(f"  {kind}[{c}]: {cnt[PASSED]} passed, {cnt[FAILED]} failed, {cnt[SKIPPED]} skipped "
                  f"in {r.seconds:.0f}s {r.note}", file=sys.stderr, flush=True)
    text = [f"iscsi-test-cu ({len(families['ALL'])} tests, family ALL) -- columns: passed failed skipped", "",
            table(runs, families), ""]
    for r in runs:
        cnt = r.counts()
        text.append(f"{r.target}[{r.config}]: {cnt[PASSED]} passed, {cnt[FAILED]} failed, {cnt[SKIPPED]} skipped"
                    f"  ({r.seconds:.0f}s; log {r.log.relative_to(ROOT) if r.log.is_relative_to(ROOT) else r.log})"
                    + (f"  NOTE: {r.note}" if r.note else ""))
        failed = [x for x in r.results if x.status == FAILED]
        if failed and all(x.detail == failed[0].detail for x in failed) and len(failed) > 3:
            text.append(f"    FAILED all {len(failed)} tests: {failed[0].detail}")
        else:
            for x in failed:
                text.append(f"    FAILED {x.suite}.{x.test}: {x.detail[:160]}")
    skips: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in runs:
        if r.target == "ours":
            for x in r.results:
                if x.status == SKIPPED:
                    skips[(x.suite, x.test)].add(x.detail)
    if skips:
        text.append("")
        text.append("ours, skipped:")
        for (s, t), why in skips.items():
            text.append(f"    {s}.{t}: {' | '.join(sorted(why))}")
    total = Counter()
    for r in runs:
        if r.target == "ours":
            total += r.counts()
    text.append("")
    text.append(f"{total[PASSED]} passed, {total[FAILED]} failed, {total[SKIPPED]} skipped")
    report = "\n".join(text)
    (outdir / "summary.txt").write_text(report + "\n")
    print(report)
    return 1 if total[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
