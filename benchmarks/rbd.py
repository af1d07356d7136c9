"""RBD-backed LUNs through one and two gateways, next to the file backend.

    python benchmarks/rbd.py [--seconds 4] [--rounds 3] [--dir /dev/shm]

Starts a private single-node Ceph cluster (tests/support/ceph_cluster.py:
one mon, one OSD on memstore, loopback only), then in one run:

* ``file``   -- our target exporting a 512 MiB image file on tmpfs;
* ``rbd x1`` -- one gateway exporting a 512 MiB RBD image;
* ``rbd x2`` -- two gateways exporting that same image (ALUA groups 1 and 2,
  reservations shared in RADOS), one client per gateway running at once;
  the figure is their sum.

The client is benchmarks/iscsi_bench.c (libiscsi's async API), the same for
every column; rounds are interleaved (file, x1, x2, file, ...) and the
median is printed, saved under benchmarks/results/ as CSV and JSON.  The OSD
keeps its data in RAM (memstore), like the tmpfs file: this measures the
gateways and librbd, not disks.  Everything runs on this one machine (two
cores here), so the two gateways, the OSD and the clients share the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _targets import RESULTS, Target, build_client, cpu_seconds, free_port, start_ours, wait_port  # noqa: E402

from tests.support.gateways import Gateway, rbd_lun, write_gateway_config  # noqa: E402

IQN = "iqn.2026-11.org.example:rbd-bench"
IMAGE_SIZE = 512 << 20
WORKLOADS = [
    ("256 KiB seq read QD16", "read", 262144, 16),
    ("256 KiB seq write QD16", "write", 262144, 16),
    ("4 KiB rand read QD32", "randread", 4096, 32),
    ("4 KiB rand write QD32", "randwrite", 4096, 32),
]


def start_gateway(work: Path, ceph, image: str, group: int, port: int, peer: tuple[int, int]) -> Target:
    me, other = Gateway(f"gw{group}", group, port), Gateway(f"gw{peer[0]}", peer[0], peer[1])
    cfg = write_gateway_config(work / f"gw{group}", IQN, rbd_lun(ceph, image), me=me, peers=(other,), ceph=ceph,
                               server_extra='nop_interval = "0s"')
    d = cfg.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    log = open(d / "gateway.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=d, env=env)
    wait_port("127.0.0.1", port, proc, timeout=60)
    return Target(f"gw{group}", f"iscsi://127.0.0.1:{port}/{IQN}/0", proc)


def run_clients(client: Path, targets: list[Target], mode: str, bs: int, qd: int, seconds: float) -> dict:
    """One client per target, all at once; their sums."""
    results: list[dict | Exception] = [None] * len(targets)  # type: ignore[list-item]

    def one(i: int, t: Target) -> None:
        p = subprocess.run([str(client), t.url, mode, str(bs), str(qd), str(seconds), "512"],
                           capture_output=True, text=True, timeout=seconds + 60)
        results[i] = json.loads(p.stdout) if p.returncode == 0 else RuntimeError(f"{t.name} {mode}: {p.stderr}")

    cpu0 = sum(cpu_seconds(t.pid) for t in targets)
    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(targets)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cpu1 = sum(cpu_seconds(t.pid) for t in targets)
    for r in results:
        if isinstance(r, Exception):
            raise r
    total_bytes = sum(r["bytes"] for r in results)
    return {
        "mib_s": sum(r["mib_s"] for r in results),
        "iops": sum(r["iops"] for r in results),
        "mean_lat_us": statistics.mean(r["lat_mean_us"] for r in results),
        "errors": sum(r.get("errors", 0) for r in results),
        "cpu_s_per_gib": (cpu1 - cpu0) / (total_bytes / (1 << 30)) if total_bytes else 0.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each run (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per workload (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the file image lives (default /dev/shm, tmpfs)")
    args = ap.parse_args(argv)
    from tests.support.ceph_cluster import CephCluster

    client = build_client()
    work = Path(tempfile.mkdtemp(prefix="pyiscsi-rbd-bench-", dir=args.dir))
    ceph = CephCluster(memstore_bytes=3 << 30)
    started: list[Target] = []
    rows = []
    try:
        ceph.start()
        print(f"Ceph cluster up in {ceph.startup_seconds:.1f} s", flush=True)
        ceph.create_image("bench", IMAGE_SIZE)
        fileb = start_ours(work, "512MiB")
        started.append(fileb)
        pa, pb = free_port(), free_port()
        gw_a = start_gateway(work, ceph, "bench", 1, pa, (2, pb))
        started.append(gw_a)
        gw_b = start_gateway(work, ceph, "bench", 2, pb, (1, pa))
        started.append(gw_b)
        # Fill both so reads read data (and RBD objects exist).
        for t in (fileb, gw_a):
            run_clients(client, [t], "write", 1 << 20, 8, 2.0)
        columns = [("file", [fileb]), ("rbd x1", [gw_a]), ("rbd x2", [gw_a, gw_b])]
        for label, mode, bs, qd in WORKLOADS:
            samples: dict[str, list[dict]] = {c: [] for c, _ in columns}
            for _ in range(args.rounds):
                for c, targets in columns:
                    samples[c].append(run_clients(client, targets, mode, bs, qd, args.seconds))
            row = {"workload": label}
            for c, _ in columns:
                med = sorted(samples[c], key=lambda r: r["mib_s"])[len(samples[c]) // 2]
                row[f"{c} MiB/s"] = round(med["mib_s"], 1)
                row[f"{c} IOPS"] = round(med["iops"])
                row[f"{c} lat us"] = round(med["mean_lat_us"])
                row[f"{c} errors"] = sum(s["errors"] for s in samples[c])
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    finally:
        for t in reversed(started):
            t.stop()
        ceph.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "rbd.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (RESULTS / "rbd.json").write_text(json.dumps(rows, indent=1))
    print(f"saved {RESULTS / 'rbd.csv'} and rbd.json")
    return 0


def print_row(row: dict, header: bool) -> None:
    cols = ["file", "rbd x1", "rbd x2"]
    if header:
        print(f"| {'workload':24} | " + " | ".join(f"{c + ' MiB/s':>13} | {c + ' IOPS':>12}" for c in cols)
              + " | errors |")
        print("|" + "-" * 26 + "|" + "|".join("-" * 15 + "|" + "-" * 14 for _ in cols) + "|--------|")
    errs = sum(row[f"{c} errors"] for c in cols)
    print(f"| {row['workload']:24} | " + " | ".join(f"{row[c + ' MiB/s']:>13} | {row[c + ' IOPS']:>12}" for c in cols)
          + f" | {errs:>6} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
