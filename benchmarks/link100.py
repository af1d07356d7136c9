"""Our target and tgt over a 100 Mbit/s link, against the raw TCP goodput of that link.

    python benchmarks/link100.py [--seconds 8] [--rounds 3] [--dir /dev/shm]

Needs root, iproute2 (ip, tc), gcc + libiscsi-dev (the client) and tgt.
The benchmark creates two network namespaces of its own (names carry this
process's PID), joins them with a veth pair, gives them 198.18.0.1/30 (target)
and 198.18.0.2/30 (client) from the RFC 2544 benchmarking range, and shapes
each direction to 100 Mbit/s with ``tc qdisc ... tbf rate 100mbit`` (like a
100BASE-TX switch port).  Per round: raw TCP goodput each way (a small Python
socket sender/receiver, no extra package), then every iSCSI workload against
our target, then against tgt (ours, tgt, ours, tgt ...; medians of the
rounds).  Only one target at a time listens on 198.18.0.1:3260, so each is
started for its turn and stopped after it; the images (1 GiB, on tmpfs, so the
disk does not dominate) persist for ours and are re-created by tgt.

A variant with 0.2 ms extra delay each way needs the ``netem`` qdisc; when the
kernel lacks it (``tc qdisc add ... netem`` fails) a line says so and the
variant is skipped.  libiscsi 1.19 negotiates HeaderDigest only (it has no
DataDigest setting), so the digest rows are HeaderDigest=CRC32C.

Prints MiB/s and the ratio to the raw TCP goodput of the same direction
(reads: target -> client; writes: client -> target); saved under
benchmarks/results/ as CSV and JSON.  Namespaces, processes and images are
removed in ``finally`` (processes by PID, namespaces by their own names).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _targets import RESULTS, build_client, start_ours, start_tgt  # noqa: E402

T_ADDR, C_ADDR = "198.18.0.1", "198.18.0.2"
TCP_PORT = 5201
SHAPE = ["tbf", "rate", "100mbit", "burst", "32kb", "latency", "20ms"]
DELAY_MS = 0.2

# (name, mode, block size, QD, digest, direction of the data)
WORKLOADS = [
    ("seq write 256 KiB QD8", "write", 262144, 8, "none", "c2t"),
    ("seq write 1 MiB QD8", "write", 1 << 20, 8, "none", "c2t"),
    ("seq write 1 MiB QD8 HeaderDigest", "write", 1 << 20, 8, "crc32c", "c2t"),
    ("seq read 256 KiB QD8", "read", 262144, 8, "none", "t2c"),
    ("seq read 1 MiB QD8", "read", 1 << 20, 8, "none", "t2c"),
    ("seq read 1 MiB QD8 HeaderDigest", "read", 1 << 20, 8, "crc32c", "t2c"),
    ("rand read 4 KiB QD8", "randread", 4096, 8, "none", "t2c"),
]
DIRECTION = {"t2c": "target->client", "c2t": "client->target"}


# ---- the raw TCP reference (run inside the namespaces via `ip netns exec`) ----------------

def tcp_recv(host: str, port: int) -> int:
    """Accept one connection, count bytes until EOF, print JSON goodput (first to last byte)."""
    with socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(1)
        ls.settimeout(30)
        print("ready", flush=True)
        conn, _ = ls.accept()
    buf = bytearray(1 << 20)
    n = 0
    t_first = t_last = None
    with conn:
        conn.settimeout(30)
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            t_last = time.monotonic()
            if t_first is None:
                t_first = t_last
            n += k
    dt = (t_last - t_first) if t_first is not None else 0.0
    print(json.dumps({"bytes": n, "seconds": dt, "mib_s": n / dt / 1048576 if dt else 0.0}), flush=True)
    return 0


def tcp_send(host: str, port: int, seconds: float) -> int:
    data = os.urandom(1 << 20)
    with socket.create_connection((host, port), timeout=30) as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):      # the receiver closes after EOF: everything arrived
            pass
    return 0


# ---- namespaces ----------------------------------------------------------------------------

def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


class Link:
    """Two namespaces of our own joined by a shaped veth pair."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.ns_t, self.ns_c = f"pyiscsi-bench-t-{tag}", f"pyiscsi-bench-c-{tag}"
        self.if_t, self.if_c = f"vbt{tag}"[:15], f"vbc{tag}"[:15]
        self.created: list[str] = []
        self.delay_ms = 0.0

    def up(self) -> None:
        for ns in (self.ns_t, self.ns_c):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
        sh("ip", "link", "add", self.if_t, "type", "veth", "peer", "name", self.if_c)
        sh("ip", "link", "set", self.if_t, "netns", self.ns_t)
        sh("ip", "link", "set", self.if_c, "netns", self.ns_c)
        for ns, dev, addr in ((self.ns_t, self.if_t, T_ADDR), (self.ns_c, self.if_c, C_ADDR)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.shape(0.0)

    def pairs(self):
        return ((self.ns_t, self.if_t), (self.ns_c, self.if_c))

    def shape(self, delay_ms: float) -> None:
        """Egress of each end: tbf 100 Mbit/s, under a netem delay when delay_ms > 0."""
        for ns, dev in self.pairs():
            sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if delay_ms:
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                   "delay", f"{delay_ms}ms", "limit", "10000")
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *SHAPE)
            else:
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *SHAPE)
        self.delay_ms = delay_ms

    def netem_available(self) -> tuple[bool, str]:
        """Try netem on the client namespace's loopback (not on the link), then remove it."""
        p = sh("tc", "-n", self.ns_c, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        if p.returncode != 0:
            return False, (p.stderr or p.stdout).strip()
        sh("tc", "-n", self.ns_c, "qdisc", "del", "dev", "lo", "root", check=False)
        return True, ""

    def qdiscs(self) -> str:
        return "; ".join(sh("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout.strip() for ns, dev in self.pairs())

    def down(self) -> None:
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()
        for dev in (self.if_t, self.if_c):     # only if a step failed before the move
            if Path(f"/sys/class/net/{dev}").exists():
                sh("ip", "link", "del", dev, check=False)

    def wait_port(self, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
        """Connect from the client namespace until the target answers."""
        probe = (f"import socket,sys,time\nend=time.monotonic()+{timeout}\n"
                 f"while time.monotonic()<end:\n"
                 f"  try:\n    socket.create_connection(('{T_ADDR}',{port}),timeout=0.5).close(); sys.exit(0)\n"
                 f"  except OSError: time.sleep(0.1)\nsys.exit(1)\n")
        p = subprocess.run(["ip", "netns", "exec", self.ns_c, sys.executable, "-c", probe], timeout=timeout + 10)
        if p.returncode != 0 or proc.poll() is not None:
            raise RuntimeError(f"nothing listens on {T_ADDR}:{port} in {self.ns_t}")


def raw_tcp(link: Link, direction: str, seconds: float) -> float:
    """Goodput (MiB/s) of one TCP stream target->client ("t2c") or client->target ("c2t")."""
    rx_ns, rx_addr, tx_ns = ((link.ns_c, C_ADDR, link.ns_t) if direction == "t2c"
                             else (link.ns_t, T_ADDR, link.ns_c))
    me = str(Path(__file__).resolve())
    rx = subprocess.Popen(["ip", "netns", "exec", rx_ns, sys.executable, me, "--tcp-recv", rx_addr, str(TCP_PORT)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([rx.stdout], [], [], 20)
        if not ready or rx.stdout.readline().strip() != "ready":
            raise RuntimeError("TCP receiver did not start")
        subprocess.run(["ip", "netns", "exec", tx_ns, sys.executable, me, "--tcp-send", rx_addr, str(TCP_PORT),
                        str(seconds)], check=True, timeout=seconds + 60)
        out, err = rx.communicate(timeout=60)
        if rx.returncode != 0:
            raise RuntimeError(f"TCP receiver: {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])["mib_s"]
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


# ---- iSCSI ---------------------------------------------------------------------------------

def run_bench(client: Path, link: Link, target, mode: str, bs: int, qd: int, digest: str, seconds: float) -> dict:
    cmd = ["ip", "netns", "exec", link.ns_c, str(client), target.url, mode, str(bs), str(qd), str(seconds),
           "256", digest]
    for attempt in range(3):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90)
        if p.returncode == 2 and "login failed" in p.stderr and attempt < 2:
            time.sleep(1.0)
            continue
        break
    if p.returncode not in (0, 1) or not p.stdout.strip():
        raise RuntimeError(f"{target.name} {mode} {bs}: rc {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def start(name: str, work: Path, link: Link):
    if name == "ours":
        t = start_ours(work, listen=T_ADDR, netns=link.ns_t)
    else:
        t = start_tgt(work, listen=T_ADDR, netns=link.ns_t)
    try:
        link.wait_port(3260, t.proc)
    except BaseException:
        t.stop()
        raise
    return t


def suite(client: Path, link: Link, work: Path, seconds: float, rounds: int) -> list[dict]:
    tcp = {"t2c": [], "c2t": []}
    res = {(w[0], who): [] for w in WORKLOADS for who in ("ours", "tgt")}
    for r in range(rounds):
        for d in ("t2c", "c2t"):
            tcp[d].append(raw_tcp(link, d, seconds))
        print(f"  round {r + 1}/{rounds}: raw TCP target->client {tcp['t2c'][-1]:.2f} MiB/s, "
              f"client->target {tcp['c2t'][-1]:.2f} MiB/s", flush=True)
        for who in ("ours", "tgt"):
            t = start(who, work, link)
            try:
                for name, mode, bs, qd, digest, _ in WORKLOADS:
                    res[(name, who)].append(run_bench(client, link, t, mode, bs, qd, digest, seconds))
            finally:
                t.stop()
            print(f"  round {r + 1}/{rounds}: {who} done", flush=True)
    rows = []
    base = {d: statistics.median(v) for d, v in tcp.items()}
    for d in ("t2c", "c2t"):
        rows.append({"delay_ms": link.delay_ms, "workload": f"raw TCP {DIRECTION[d]}", "direction": DIRECTION[d],
                     "tcp_mib_s": base[d], "tcp_rounds": tcp[d]})
    for name, mode, bs, qd, digest, d in WORKLOADS:
        row = {"delay_ms": link.delay_ms, "workload": name, "direction": DIRECTION[d], "tcp_mib_s": base[d]}
        for who in ("ours", "tgt"):
            rs = res[(name, who)]
            row[f"{who}_mib_s"] = statistics.median(x["mib_s"] for x in rs)
            row[f"{who}_iops"] = statistics.median(x["iops"] for x in rs)
            row[f"{who}_ratio_tcp"] = row[f"{who}_mib_s"] / base[d] if base[d] else 0.0
            row[f"{who}_lat_p99_us"] = statistics.median(x["lat_p99_us"] for x in rs)
            row[f"{who}_errors"] = sum(x["errors"] for x in rs)
            row[f"{who}_rounds_mib_s"] = [x["mib_s"] for x in rs]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':<34} {'raw TCP':>8} {'ours':>8} {'/TCP':>7} {'tgt':>8} {'/TCP':>7} {'ours/tgt':>8}"
          f" {'p99 ours':>9} {'p99 tgt':>9} {'errors':>6}")
    print(f"{'':<34} {'MiB/s':>8} {'MiB/s':>8} {'':>7} {'MiB/s':>8}")
    for r in rows:
        if "ours_mib_s" not in r:
            print(f"{r['workload']:<34} {r['tcp_mib_s']:>8.2f}")
            continue
        o, t = r["ours_mib_s"], r["tgt_mib_s"]
        print(f"{r['workload']:<34} {r['tcp_mib_s']:>8.2f} {o:>8.2f} {r['ours_ratio_tcp']:>6.1%} {t:>8.2f}"
              f" {r['tgt_ratio_tcp']:>6.1%} {o / t if t else 0:>7.3f}x {r['ours_lat_p99_us'] / 1000:>7.1f}ms"
              f" {r['tgt_lat_p99_us'] / 1000:>7.1f}ms {r['ours_errors'] + r['tgt_errors']:>6}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tcp-recv"]:
        return tcp_recv(argv[1], int(argv[2]))
    if argv[:1] == ["--tcp-send"]:
        return tcp_send(argv[1], int(argv[2]), float(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each run (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, ours then tgt in each (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images live (default /dev/shm, tmpfs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("link100.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    # Serve this checkout's code, not whatever copy of the package happens to be installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    client = build_client()
    work = Path(tempfile.mkdtemp(prefix="pyiscsi-link100-", dir=args.dir))
    link = Link()
    rows: list[dict] = []
    notes: list[str] = []
    try:
        link.up()
        print(f"namespaces {link.ns_t} ({T_ADDR}, target) and {link.ns_c} ({C_ADDR}, client); "
              f"qdiscs: {link.qdiscs()}")
        print(f"images on {args.dir} (tmpfs: the link and the targets are measured, not the disk)")
        netem, why = link.netem_available()
        if not netem:
            notes.append(f"{DELAY_MS} ms delay variant NOT run: this kernel has no netem qdisc "
                         f"(`tc qdisc add ... netem` failed: {why})")
            print(notes[-1])
        notes.append("digest rows use HeaderDigest=CRC32C only: libiscsi 1.19 has no DataDigest setting")
        print(notes[-1], flush=True)
        print("\n100 Mbit/s each way, no added delay", flush=True)
        rows += suite(client, link, work, args.seconds, args.rounds)
        print_table(rows)
        if netem:
            link.shape(DELAY_MS)
            print(f"\n100 Mbit/s each way, {DELAY_MS} ms netem delay each way; qdiscs: {link.qdiscs()}", flush=True)
            delayed = suite(client, link, work, args.seconds, args.rounds)
            print_table(delayed)
            rows += delayed
    finally:
        link.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"seconds": args.seconds, "rounds": args.rounds, "shape": " ".join(SHAPE), "notes": notes}
    (RESULTS / f"link100-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fields = [k for k in rows[-1] if not k.endswith("rounds_mib_s")]
    with open(RESULTS / f"link100-{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nsaved benchmarks/results/link100-{stamp}.{{json,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
