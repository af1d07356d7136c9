"""Many sessions at once: 1, 4, 16 and 64 concurrent sessions, ours and tgt side by side.

    python benchmarks/scale.py [--sessions 1,4,16,64] [--seconds 8] [--qd 4] [--read-pct 70]
                               [--rounds 1] [--dir /dev/shm]

Needs gcc + libiscsi-dev (the client) and tgt.  On loopback.  Each session is
its own benchmarks/iscsi_bench process with its own initiator name
(iqn.2026-11.org.example:scale-N), doing 4 KiB random I/O, READ_PCT % reads
(default 70/30), QD per session (default 4).  All sessions log in first and
start at the same wall-clock instant; aggregate IOPS = all commands / (last
end - first start).  p99 over every command of every session.  Errors: SCSI
status other than GOOD, plus sessions that failed (login, connection lost,
no result) counted apart; both must be 0.

Two layouts on one target with 4 LUNs (1 GiB images each, on tmpfs so the disk
does not dominate): every session on the first LUN ("1 LUN"), and session i on
LUN i mod 4 ("4 LUNs").  tgt exports the same, LUNs 1-4.  Both targets run for
the whole benchmark; each step runs ours then tgt (then again for --rounds > 1;
medians).  The server's RSS is sampled from /proc/PID/status (VmRSS, every
0.1 s) during each step: peak and before the step; plus VmHWM at the end.
Printed as a table, saved under benchmarks/results/ as CSV and JSON.
"""

from __future__ import annotations

import argparse
import array
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _targets import RESULTS, Target, build_client, free_port, rss_bytes, start_tgt, wait_port  # noqa: E402

LUNS = 4
IMAGE = 1 << 30
SPAN_MIB = 1024
MiB = 1 << 20


def start_ours_luns(work: Path) -> Target:
    """Our target with LUNS LUNs, default [server] and [iscsi] settings (cache off)."""
    port = free_port()
    iqn = "iqn.2026-11.org.example:scale"
    luns = "".join(f"""
  [[target.lun]]
  id = {i}
  path = "ours{i}.img"
  size = "{IMAGE >> 20}MiB"
""" for i in range(LUNS))
    cfg = work / "ours-scale.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
nop_interval = "0s"
[[target]]
iqn = "{iqn}"
{luns}""")
    log = open(work / "ours.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work)
    wait_port("127.0.0.1", port, proc)
    return Target("ours", f"iscsi://127.0.0.1:{port}/{iqn}/", proc)


def start_tgt_luns(work: Path) -> Target:
    t = start_tgt(work, IMAGE)                    # LUN 1 on tgt.img
    ctl = 2000 + os.getpid() % 5000               # the management port _targets.start_tgt chose
    adm = ["tgtadm", "-C", str(ctl), "--lld", "iscsi"]
    try:
        for lun in range(2, LUNS + 1):
            img = work / f"tgt{lun}.img"
            with open(img, "wb") as f:
                f.truncate(IMAGE)
            subprocess.run(adm + ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun),
                                  "-b", str(img)], check=True, timeout=30)
    except BaseException:
        t.stop()
        raise
    t.url = t.url.rsplit("/", 1)[0] + "/"
    return t


def lun_ids(target: Target) -> list[int]:
    return list(range(LUNS)) if target.name == "ours" else list(range(1, LUNS + 1))


def run_step(client: Path, target: Target, luns: list[int], n: int, args, work: Path) -> dict:
    """n sessions at once; aggregate figures and the server's RSS during the step."""
    latdir = work / "lat"
    latdir.mkdir(exist_ok=True)
    for f in latdir.iterdir():
        f.unlink()
    start_at = time.time() + 1.5 + 0.06 * n          # room for every login first
    rss_before = rss_bytes(target.pid)
    procs = []
    try:
        for i in range(n):
            env = dict(os.environ, ISCSI_BENCH_START_AT=f"{start_at:.6f}", ISCSI_BENCH_LAT_OUT=str(latdir / f"{i}.lat"))
            cmd = [str(client), f"{target.url}{luns[i % len(luns)]}", f"randrw:{args.read_pct}", "4096",
                   str(args.qd), str(args.seconds), str(SPAN_MIB), "none", f"iqn.2026-11.org.example:scale-{i}"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        peak = rss_before
        deadline = start_at + args.seconds + 60
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            peak = max(peak, rss_bytes(target.pid))
            time.sleep(0.1)
    finally:
        for p in procs:                               # by PID; only stragglers past the deadline
            if p.poll() is None:
                p.kill()
    results, failures = [], []
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=30)
        try:
            results.append(json.loads(out))
        except ValueError:
            failures.append(f"session {i}: rc {p.returncode}: {err.strip()[:200]}")
    lat = array.array("d")
    for f in latdir.iterdir():
        with open(f, "rb") as fh:
            lat.frombytes(fh.read())
    lats = sorted(lat)
    ops = sum(r["ops"] for r in results)
    if results:
        t0 = min(r["start_epoch"] for r in results)
        t1 = max(r["start_epoch"] + r["seconds"] for r in results)
        late = max(r["start_epoch"] for r in results) - start_at
    else:
        t0, t1, late = 0.0, 1.0, 0.0
    window = max(t1 - t0, 1e-9)
    return {
        "iops": ops / window,
        "mib_s": ops * 4096 / window / MiB,
        "lat_mean_us": (sum(lats) / len(lats) * 1e6) if lats else 0.0,
        "lat_p99_us": lats[int(len(lats) * 0.99)] * 1e6 if lats else 0.0,
        "errors": sum(r["errors"] for r in results),
        "failed_sessions": len(failures),
        "failures": failures,
        "reads": sum(r.get("reads", 0) for r in results),
        "writes": sum(r.get("writes", 0) for r in results),
        "rss_before_mib": rss_before / MiB,
        "rss_peak_mib": peak / MiB,
        "late_start_s": max(late, 0.0),
        "window_s": window,
    }


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,4,16,64", help="session counts (default 1,4,16,64)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each step (default 8)")
    ap.add_argument("--qd", type=int, default=4, help="commands in flight per session (default 4)")
    ap.add_argument("--read-pct", type=int, default=70, help="percent reads in the mix (default 70)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each step, ours then tgt (default 1)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images live (default /dev/shm, tmpfs)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.sessions.split(",")]
    # Serve this checkout's code, not whatever copy of the package happens to be installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    client = build_client()
    work = Path(tempfile.mkdtemp(prefix="pyiscsi-scale-", dir=args.dir))
    ours = tgt = None
    rows = []
    hwm = {}
    try:
        ours = start_ours_luns(work)
        tgt = start_tgt_luns(work)
        print(f"4 KiB random {args.read_pct}/{100 - args.read_pct} read/write, QD{args.qd} per session, "
              f"{args.seconds:g} s per step; images on {args.dir} (tmpfs); loopback")
        for layout in ("1 LUN", "4 LUNs"):
            for n in levels:
                res = {"ours": [], "tgt": []}
                for _ in range(args.rounds):
                    for t in (ours, tgt):
                        luns = lun_ids(t)[:1] if layout == "1 LUN" else lun_ids(t)
                        res[t.name].append(run_step(client, t, luns, n, args, work))
                row = {"layout": layout, "sessions": n}
                for who, rs in res.items():
                    for k in ("iops", "mib_s", "lat_mean_us", "lat_p99_us", "rss_peak_mib", "rss_before_mib",
                              "late_start_s"):
                        row[f"{who}_{k}"] = statistics.median(r[k] for r in rs)
                    row[f"{who}_errors"] = sum(r["errors"] for r in rs)
                    row[f"{who}_failed_sessions"] = sum(r["failed_sessions"] for r in rs)
                    row[f"{who}_failures"] = [f for r in rs for f in r["failures"]][:5]
                rows.append(row)
                print_row(row, header=len(rows) == 1)
                for who in ("ours", "tgt"):
                    for f in row[f"{who}_failures"]:
                        print(f"    {who}: {f}")
        for t in (ours, tgt):
            hwm[t.name] = vm_hwm(t.pid) / MiB
        print(f"\nserver VmHWM (peak RSS since start): ours {hwm['ours']:.1f} MiB, tgt {hwm['tgt']:.1f} MiB")
    finally:
        for t in (ours, tgt):
            if t is not None:
                t.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"seconds": args.seconds, "qd": args.qd, "read_pct": args.read_pct, "rounds": args.rounds,
            "vm_hwm_mib": hwm}
    (RESULTS / f"scale-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(RESULTS / f"scale-{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if not k.endswith("failures")], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"saved benchmarks/results/scale-{stamp}.{{json,csv}}")
    return 0


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"\n{'layout':<7} {'sess':>4} {'IOPS ours':>10} {'tgt':>8} {'ratio':>6} {'MiB/s ours':>10} {'tgt':>6}"
              f" {'p99 ours':>9} {'tgt':>8} {'errors ours/tgt':>15} {'failed':>7}"
              f" {'RSS peak ours':>13} {'tgt':>8}")
    o, t = row["ours_iops"], row["tgt_iops"]
    print(f"{row['layout']:<7} {row['sessions']:>4} {o:>10.0f} {t:>8.0f} {o / t if t else 0:>5.2f}x"
          f" {row['ours_mib_s']:>10.1f} {row['tgt_mib_s']:>6.1f}"
          f" {row['ours_lat_p99_us'] / 1000:>7.2f}ms {row['tgt_lat_p99_us'] / 1000:>6.2f}ms"
          f" {row['ours_errors']:>7}/{row['tgt_errors']:<7} {row['ours_failed_sessions']:>3}/{row['tgt_failed_sessions']:<3}"
          f" {row['ours_rss_peak_mib']:>9.1f}MiB {row['tgt_rss_peak_mib']:>5.1f}MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
