"""The cache on an emulated slow disk: none / write-through / write-back / journal.

The slow disk: a raw image behind ``qemu-storage-daemon`` with a throttle
group (default 150 IOPS and 100 MB/s, like one HDD), exported as a FUSE file
(needs /dev/fuse; Debian: qemu-system-common).  The LUN's image *is* that
FUSE file, so every write that reaches the "disk" pays the HDD's price.  The
journal lives on the local (fast) disk.

Load: benchmarks/iscsi_bench.c (libiscsi async, one process, fixed time):
4 KiB random write QD32, 64 KiB sequential write QD8, 4 KiB random 70/30
read/write QD32; then a timed SYNCHRONIZE CACHE ("flush" column: how long
the dirty data takes to reach the disk) and SIGTERM.  Peak RSS is VmHWM of the
server at the end, and "RSS over base" subtracts its RSS right after start.

    python benchmarks/cache_bench.py [--seconds 10] [--span-mib 64] [--iops 150]

Prints a table; every number is from this run (no-cache in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._targets import build_client, free_port, rss_bytes, wait_port  # noqa: E402
from tests.support.initiator import Initiator  # noqa: E402

IQN = "iqn.2026-11.org.example:slow"
MiB = 1 << 20


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start_slow_disk(work: Path, size: int, iops: int, bps: int) -> tuple[subprocess.Popen, Path]:
    img = work / "hdd.raw"
    with open(img, "wb") as f:  # allocated: the throttled writes are overwrites
        os.posix_fallocate(f.fileno(), 0, size)
    mnt = work / "hdd.fuse"
    mnt.touch()
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"file,node-name=file0,filename={img},cache.direct=off",
        "--object", f"throttle-group,id=tg0,limits.iops-total={iops},limits.bps-total={bps}",
        "--blockdev", "throttle,node-name=thr0,throttle-group=tg0,file=file0",
        "--export", f"fuse,id=exp0,node-name=thr0,mountpoint={mnt},writable=on",
    ]
    proc = subprocess.Popen(cmd, stdout=open(work / "qsd.log", "wb"), stderr=subprocess.STDOUT)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError((work / "qsd.log").read_text())
        if os.stat(mnt).st_size == size:
            return proc, mnt
        time.sleep(0.05)
    raise RuntimeError("FUSE export did not appear")


def config(work: Path, port: int, lun_path: Path, mode: str) -> Path:
    lun = {"none": 'cache = "none"', "write-through": 'cache = "write-through"', "write-back": 'cache = "write-back"',
           "journal": f'journal = "{work}/lun.journal"\n  journal_size = "1GiB"'}[mode]
    cfg = work / f"{mode}.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
nop_interval = "0s"
[cache]
size = "512MiB"
dirty_limit = "256MiB"
max_dirty_age = "5s"
[[target]]
iqn = "{IQN}"
  [[target.lun]]
  id = 0
  path = "{lun_path}"
  {lun}
""")
    return cfg


def run_load(client: Path, url: str, pattern: str, bs: int, qd: int, seconds: float, span: int) -> dict:
    out = subprocess.run([str(client), url, pattern, str(bs), str(qd), str(seconds), str(span)],
                         capture_output=True, text=True, timeout=seconds + 600)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_sync(port: int) -> float:
    ini = Initiator("127.0.0.1", port, name="iqn.2026-11.test:sync", timeout=900)
    ini.login(IQN)
    ini.clear_unit_attentions()
    t = time.monotonic()
    r = ini.command(bytes([0x35]) + bytes(9))
    dt = time.monotonic() - t
    assert r.status == 0, r.sense.hex()
    ini.close()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--span-mib", type=int, default=64, help="random I/O region (dirty data stays below the limit)")
    ap.add_argument("--iops", type=int, default=150)
    ap.add_argument("--mbps", type=int, default=100)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--modes", default="none,write-through,write-back,journal")
    a = ap.parse_args()
    if not os.path.exists("/dev/fuse"):
        print("needs /dev/fuse for the qemu-storage-daemon FUSE export", file=sys.stderr)
        return 2
    client = build_client()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cache-bench-", dir=HERE / "results" if (HERE / "results").is_dir() else None) as d:
        work = Path(d)
        qsd, disk = start_slow_disk(work, a.size_mib * MiB, a.iops, a.mbps * 1000 * 1000)
        try:
            for mode in a.modes.split(","):
                port = free_port()
                cfg = config(work, port, disk, mode)
                env = dict(os.environ, PYTHONPATH=str(HERE.parent))
                proc = subprocess.Popen([sys.executable, "-m", "pyiscsi_target", "serve", str(cfg), "--log-level", "WARNING"],
                                        cwd=work, env=env, stdout=open(work / f"{mode}.log", "wb"), stderr=subprocess.STDOUT)
                try:
                    wait_port("127.0.0.1", port, proc)
                    base = rss_bytes(proc.pid)
                    url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
                    for name, pattern, bs, qd in (("4K randwrite QD32", "randwrite", 4096, 32),
                                                  ("64K seq write QD8", "write", 65536, 8),
                                                  ("4K 70/30 rand r/w QD32", "randrw:70", 4096, 32)):
                        r = run_load(client, url, pattern, bs, qd, a.seconds, a.span_mib)
                        flush = timed_sync(port)
                        rows.append((mode, name, r["iops"], r["mib_s"], r["lat_p99_us"] / 1000, flush, r.get("errors", 0)))
                        print(f"  {mode:13} {name:24} {r['iops']:9.0f} IOPS {r['mib_s']:8.1f} MiB/s "
                              f"p99 {r['lat_p99_us'] / 1000:8.1f} ms  flush {flush:6.2f}s", flush=True)
                    peak = vm_hwm(proc.pid)
                    t = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(900)
                    stop = time.monotonic() - t
                    rows.append((mode, "peak RSS / over base / stop", peak / MiB, (peak - base) / MiB, 0, stop, 0))
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        finally:
            qsd.send_signal(signal.SIGTERM)
            try:
                qsd.wait(30)
            except subprocess.TimeoutExpired:
                qsd.kill()
                qsd.wait()
    print(f"\nslow disk: qemu-storage-daemon throttle {a.iops} IOPS, {a.mbps} MB/s, FUSE export; "
          f"{a.seconds:g}s per test, random span {a.span_mib} MiB; [cache] size 512MiB, dirty_limit 256MiB")
    print(f"{'cache':13} | {'test':26} | {'IOPS':>9} | {'MiB/s':>8} | {'p99 ms':>8} | {'flush s':>7} | err")
    print("-" * 92)
    for mode, name, iops, mibs, p99, flush, err in rows:
        if name.startswith("peak"):
            print(f"{mode:13} | {'peak RSS MiB / over base':26} | {iops:9.1f} | {mibs:8.1f} | {'':8} | {flush:7.2f} | (stop s)")
        else:
            print(f"{mode:13} | {name:26} | {iops:9.0f} | {mibs:8.1f} | {p99:8.1f} | {flush:7.2f} | {err}")
    base = {n: i for m, n, i, *_ in rows if m == "none"}
    for mode in a.modes.split(","):
        if mode != "none" and base.get("4K randwrite QD32"):
            x = next(i for m, n, i, *_ in rows if m == mode and n == "4K randwrite QD32")
            print(f"4K random write, {mode} / none: {x / base['4K randwrite QD32']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
