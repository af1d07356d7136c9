"""Our target versus tgt on loopback, interleaved rounds, medians.

    python benchmarks/loopback.py [--seconds 5] [--rounds 3] [--dir /dev/shm]

Both targets export 1 GiB images on tmpfs (so the disk does not dominate: this
measures the targets, not the storage).  The same client, benchmarks/iscsi_bench.c
on libiscsi's async API, runs every workload against ours, then tgt, then ours
again ... (median of the rounds).  Printed as a table and saved under
benchmarks/results/ as CSV and JSON.  Also the server's CPU seconds per GiB
moved (utime+stime of the target process over the run), and per command its
user and system CPU microseconds (for us user = Python; system = syscalls
and the loopback TCP stack).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _targets import RESULTS, build_client, cpu_split, start_ours, start_tgt  # noqa: E402

WORKLOADS = [
    ("256 KiB seq read QD16", "read", 262144, 16),
    ("256 KiB seq write QD16", "write", 262144, 16),
    ("4 KiB rand read QD32", "randread", 4096, 32),
    ("4 KiB rand write QD32", "randwrite", 4096, 32),
    ("4 KiB rand read QD1", "randread", 4096, 1),
]


def run_one(client: Path, target, mode: str, bs: int, qd: int, seconds: float) -> dict:
    user0, sys0 = cpu_split(target.pid)
    p = subprocess.run([str(client), target.url, mode, str(bs), str(qd), str(seconds), "512"],
                       capture_output=True, text=True, timeout=seconds + 60)
    user1, sys1 = cpu_split(target.pid)
    if p.returncode != 0:
        raise RuntimeError(f"{target.name} {mode}: {p.stderr.strip()}")
    r = json.loads(p.stdout)
    gib = r["bytes"] / (1 << 30)
    r["cpu_s_per_gib"] = (user1 - user0 + sys1 - sys0) / gib if gib else 0.0
    # Per command, split: user space (Python, for us) and kernel (syscalls, TCP).
    ops = r["ops"] or 1
    r["user_us_per_op"] = (user1 - user0) / ops * 1e6
    r["sys_us_per_op"] = (sys1 - sys0) / ops * 1e6
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per workload (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images live (default /dev/shm, tmpfs)")
    args = ap.parse_args(argv)
    client = build_client()
    work = Path(tempfile.mkdtemp(prefix="pyiscsi-bench-", dir=args.dir))
    ours = tgt = None
    rows = []
    try:
        ours = start_ours(work)
        tgt = start_tgt(work)
        # Write the whole span once on both, so reads hit allocated data on each.
        for t in (ours, tgt):
            run_one(client, t, "write", 1 << 20, 8, 2.0)
        for name, mode, bs, qd in WORKLOADS:
            res = {"ours": [], "tgt": []}
            for _ in range(args.rounds):
                for t in (ours, tgt):
                    res[t.name].append(run_one(client, t, mode, bs, qd, args.seconds))
            row = {"workload": name}
            for who in ("ours", "tgt"):
                rs = res[who]
                row[f"{who}_iops"] = statistics.median(r["iops"] for r in rs)
                row[f"{who}_mib_s"] = statistics.median(r["mib_s"] for r in rs)
                row[f"{who}_lat_mean_us"] = statistics.median(r["lat_mean_us"] for r in rs)
                row[f"{who}_lat_p99_us"] = statistics.median(r["lat_p99_us"] for r in rs)
                row[f"{who}_cpu_s_per_gib"] = statistics.median(r["cpu_s_per_gib"] for r in rs)
                row[f"{who}_user_us_per_op"] = statistics.median(r["user_us_per_op"] for r in rs)
                row[f"{who}_sys_us_per_op"] = statistics.median(r["sys_us_per_op"] for r in rs)
                row[f"{who}_errors"] = sum(r["errors"] for r in rs)
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    finally:
        for t in (ours, tgt):
            if t is not None:
                t.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"loopback-{stamp}.json").write_text(json.dumps(rows, indent=2))
    with open(RESULTS / f"loopback-{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nsaved benchmarks/results/loopback-{stamp}.{{json,csv}}; images on {args.dir} (tmpfs: the target, not the disk, is measured)")
    return 0


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'workload':<24} {'ours':>12} {'tgt':>12} {'ratio':>6}   {'ours lat':>9} {'tgt lat':>9}"
              f" {'p99 ours':>9} {'p99 tgt':>9}   {'CPU s/GiB ours':>14} {'tgt':>6}"
              f"   {'user/sys us per op ours':>23} {'tgt':>11}")
    big = row["workload"].startswith("256")
    unit = "MiB/s" if big else "IOPS"
    o = row["ours_mib_s"] if big else row["ours_iops"]
    t = row["tgt_mib_s"] if big else row["tgt_iops"]
    print(f"{row['workload']:<24} {o:>8.0f} {unit:<3} {t:>8.0f} {unit:<3} {o / t if t else 0:>5.2f}x"
          f"   {row['ours_lat_mean_us']:>7.0f}us {row['tgt_lat_mean_us']:>7.0f}us"
          f" {row['ours_lat_p99_us']:>7.0f}us {row['tgt_lat_p99_us']:>7.0f}us"
          f"   {row['ours_cpu_s_per_gib']:>14.2f} {row['tgt_cpu_s_per_gib']:>6.2f}"
          f"   {row['ours_user_us_per_op']:>11.1f} / {row['ours_sys_us_per_op']:<9.1f}"
          f" {row['tgt_user_us_per_op']:>5.1f} / {row['tgt_sys_us_per_op']:<5.1f}")


if __name__ == "__main__":
    sys.exit(main())
