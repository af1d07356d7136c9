"""Our target and tgt over a 100 Mbit/s link, against the raw TCP goodput of that link.

    python benchmarks/link100.py [--seconds 8] [--rounds 3] [--dir /dev/shm] [--delay-ms 0.2]

Needs root, iproute2 (ip, tc), gcc + libiscsi-dev (the client) and tgt.
Two variants, each measured the same way:

1. No added delay.  Two network namespaces of its own (names carry this
   process's PID) joined by a veth pair, 198.18.0.1/30 (target) and
   198.18.0.2/30 (client) from the RFC 2544 benchmarking range; each
   direction shaped to 100 Mbit/s with ``tc qdisc ... tbf rate 100mbit`` on
   the veth's egress (like a 100BASE-TX switch port).

2. 0.2 ms (``--delay-ms``) extra delay each way, still 100 Mbit/s each way.
   With the ``netem`` qdisc when the kernel has it: netem under the same tbf
   on the same veth pair.  Without netem (``tc qdisc add ... netem`` fails,
   as on kernels built without it), a delay line of our own at L3:
   benchmarks/delayline.c, compiled with gcc under benchmarks/results/bin/,
   in a third "router" namespace between the two::

     target ns 198.18.0.1 --veth-- 198.18.0.2 router ns 198.18.0.5 --veth-- 198.18.0.6 client ns
                                       |  tun A  <- delayline ->  tun B  |

   Policy routing in the router namespace (``ip rule iif <veth> lookup``)
   sends what arrives from the target's side into TUN A and what arrives
   from the client's side into TUN B; the delay line reads each packet,
   holds it for the delay and writes it to the other TUN device, from where
   the kernel routes it out of the other veth.  Packets are delayed one by
   one, so the TCP connections stay end to end (no proxy); ip_forward is on
   in the router namespace only, rp_filter off there.  The tbf shaping stays
   on the egress of the target's and the client's veth, as in variant 1.

Per variant: the round-trip time through the link (a UDP echo in Python, 200
probes 5 ms apart, from the client namespace to the target's; printed for
both variants, so the added delay shows: about 2 x the delay more; with the
delay line also once while it holds 0 ms, which shows what the router hop and
the TUN devices cost by themselves), then per round raw TCP goodput each way
(a small Python socket sender/receiver, no extra package), then every iSCSI
workload against our target, then against tgt (ours, tgt, ours, tgt ...;
medians of the rounds).  Only one target at a time listens on
198.18.0.1:3260, so each is started for its turn and stopped after it; the
images (1 GiB, on tmpfs, so the disk does not dominate) persist for ours and
are re-created by tgt.  libiscsi 1.19 negotiates HeaderDigest only (it has no
DataDigest setting), so the digest rows are HeaderDigest=CRC32C.

Prints MiB/s and the ratio to the raw TCP goodput of the same direction
(reads: target -> client; writes: client -> target), which delay method was
used, and the delay line's counters (packets, drops, how late it released
them, its CPU time: it shares the machine's cores with the targets);
saved under benchmarks/results/ as CSV and JSON.  Namespaces, the delay line
(its TUN devices go with it), the targets and the images are removed in
``finally`` (processes by PID, namespaces by their own names).
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
from _targets import RESULTS, build_client, cpu_seconds, start_ours, start_tgt  # noqa: E402

T_ADDR, C_ADDR = "198.18.0.1", "198.18.0.2"
# The delay line's topology: target 198.18.0.1/30 -- .2 router .5 -- 198.18.0.6/30 client.
R_ADDR_T, R_ADDR_C, C_ADDR_DL = "198.18.0.2", "198.18.0.5", "198.18.0.6"
TCP_PORT = 5201
ECHO_PORT = 5202
SHAPE = ["tbf", "rate", "100mbit", "burst", "32kb", "latency", "20ms"]
DELAY_MS = 0.2
RTT_PROBES = 200

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


def udp_echo(host: str, port: int, count: int) -> int:
    """Send back each datagram until `count` have come or none for 10 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, port))
        s.settimeout(10)
        print("ready", flush=True)
        for _ in range(count):
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                break
            s.sendto(data, peer)
    return 0


def udp_ping(host: str, port: int, count: int, interval: float) -> int:
    """Round-trip times of `count` numbered 64-byte probes, after 5 unrecorded ones (ARP, caches)."""
    rtts = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(1.0)
        for i in range(count + 5):
            msg = i.to_bytes(4, "big") + bytes(60)
            t0 = time.perf_counter_ns()
            s.send(msg)
            try:
                while s.recv(2048)[:4] != msg[:4]:     # a late answer to an earlier probe
                    pass
            except TimeoutError:
                lost += 1
                continue
            if i >= 5:
                rtts.append((time.perf_counter_ns() - t0) / 1e6)
            time.sleep(interval)
    rtts.sort()
    out = {"probes": count, "lost": lost, "min_ms": rtts[0], "median_ms": statistics.median(rtts),
           "mean_ms": statistics.fmean(rtts), "max_ms": rtts[-1]} if rtts else {"probes": count, "lost": lost}
    print(json.dumps(out), flush=True)
    return 0


# ---- namespaces ----------------------------------------------------------------------------

def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


class Link:
    """Two namespaces of our own joined by a shaped veth pair."""

    t_addr, c_addr = T_ADDR, C_ADDR

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

    def describe(self) -> str:
        return (f"namespaces {self.ns_t} ({self.t_addr}, target) and {self.ns_c} ({self.c_addr}, client); "
                f"qdiscs: {self.qdiscs()}")

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
        for dev in self.root_devs():           # only if a step failed before the move
            if Path(f"/sys/class/net/{dev}").exists():
                sh("ip", "link", "del", dev, check=False)

    def root_devs(self) -> tuple[str, ...]:
        return (self.if_t, self.if_c)

    def rtt(self) -> dict:
        """UDP echo: server in the target namespace, probes from the client namespace."""
        me = str(Path(__file__).resolve())
        srv = subprocess.Popen(["ip", "netns", "exec", self.ns_t, sys.executable, me, "--udp-echo", self.t_addr,
                                str(ECHO_PORT), str(RTT_PROBES + 5)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([srv.stdout], [], [], 20)
            if not ready or srv.stdout.readline().strip() != "ready":
                raise RuntimeError("UDP echo did not start")
            p = subprocess.run(["ip", "netns", "exec", self.ns_c, sys.executable, me, "--udp-ping", self.t_addr,
                                str(ECHO_PORT), str(RTT_PROBES), "0.005"],
                               capture_output=True, text=True, check=True, timeout=60)
            return json.loads(p.stdout.strip().splitlines()[-1])
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()

    def wait_port(self, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
        """Connect from the client namespace until the target answers."""
        probe = (f"import socket,sys,time\nend=time.monotonic()+{timeout}\n"
                 f"while time.monotonic()<end:\n"
                 f"  try:\n    socket.create_connection(('{T_ADDR}',{port}),timeout=0.5).close(); sys.exit(0)\n"
                 f"  except OSError: time.sleep(0.1)\nsys.exit(1)\n")
        p = subprocess.run(["ip", "netns", "exec", self.ns_c, sys.executable, "-c", probe], timeout=timeout + 10)
        if p.returncode != 0 or proc.poll() is not None:
            raise RuntimeError(f"nothing listens on {T_ADDR}:{port} in {self.ns_t}")


def build_delayline() -> Path:
    """Compile benchmarks/delayline.c (gcc only), like _targets.build_client does the client."""
    out = RESULTS / "bin" / "delayline"
    src = HERE / "delayline.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


class DelayLink(Link):
    """Target and client namespaces with a router namespace between them that runs the delay line.

    target ns: veth if_t 198.18.0.1/30, route to 198.18.0.4/30 via .2; tbf on if_t's egress
    router ns: veth if_rt 198.18.0.2/30, veth if_rc 198.18.0.5/30, TUN tun_a and tun_b (made by
               the delay line); `ip rule iif if_rt lookup 100` (default dev tun_a) and
               `ip rule iif if_rc lookup 101` (default dev tun_b); what the delay line writes to
               a TUN device comes in on that device and follows the main table to the other veth
    client ns: veth if_c 198.18.0.6/30, route to 198.18.0.0/30 via .5; tbf on if_c's egress
    """

    c_addr = C_ADDR_DL

    def __init__(self, delay_ms: float, binary: Path) -> None:
        super().__init__()
        tag = os.getpid()
        self.ns_r = f"pyiscsi-bench-r-{tag}"
        self.if_rt, self.if_rc = f"vbrt{tag}"[:15], f"vbrc{tag}"[:15]
        self.tun_a, self.tun_b = f"dla{tag}"[:15], f"dlb{tag}"[:15]
        self.binary = binary
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.stats: dict | None = None

    def up(self) -> None:
        for ns in (self.ns_t, self.ns_r, self.ns_c):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
        # IPv4 only in the router, no redirects, no reverse-path filter; forwarding there only.
        self.sysctl(self.ns_r, {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1",
                                "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0",
                                "net/ipv4/conf/all/send_redirects": "0",
                                "net/ipv4/conf/default/send_redirects": "0"}, optional=True)
        for a, b, ns_a, ns_b in ((self.if_t, self.if_rt, self.ns_t, self.ns_r),
                                 (self.if_rc, self.if_c, self.ns_r, self.ns_c)):
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns_a)
            sh("ip", "link", "set", b, "netns", ns_b)
        for ns, dev, addr in ((self.ns_t, self.if_t, T_ADDR), (self.ns_r, self.if_rt, R_ADDR_T),
                              (self.ns_r, self.if_rc, R_ADDR_C), (self.ns_c, self.if_c, C_ADDR_DL)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns in (self.ns_t, self.ns_r, self.ns_c):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns_t, "route", "add", "198.18.0.4/30", "via", R_ADDR_T)
        sh("ip", "-n", self.ns_c, "route", "add", "198.18.0.0/30", "via", R_ADDR_C)
        self.start_line()
        for ns, dev in self.pairs():
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *SHAPE)

    def start_line(self) -> None:
        """Start the delay line, then route through its TUN devices (they and their routes go with it)."""
        # It makes its TUN devices (in the router namespace: `ip netns exec` execs it, so its PID
        # is the Popen's) and says "ready".
        self.stats = None
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns_r, str(self.binary), self.tun_a, self.tun_b,
                                      f"{self.delay_ms * 1000:g}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"delay line did not start: {self.stop_line()}")
        for dev in (self.tun_a, self.tun_b):
            sh("ip", "-n", self.ns_r, "link", "set", dev, "mtu", "1500", "up")
        sh("ip", "-n", self.ns_r, "route", "add", "default", "dev", self.tun_a, "table", "100")
        sh("ip", "-n", self.ns_r, "route", "add", "default", "dev", self.tun_b, "table", "101")
        sh("ip", "-n", self.ns_r, "rule", "add", "iif", self.if_rt, "lookup", "100")
        sh("ip", "-n", self.ns_r, "rule", "add", "iif", self.if_rc, "lookup", "101")
        self.sysctl(self.ns_r, {"net/ipv4/ip_forward": "1",
                                **{f"net/ipv4/conf/{d}/rp_filter": "0"
                                   for d in (self.if_rt, self.if_rc, self.tun_a, self.tun_b)}})

    def restart_line(self, delay_ms: float) -> dict | str:
        """The same link with another delay: the old line's counters."""
        old = self.stop_line()
        sh("ip", "-n", self.ns_r, "rule", "del", "iif", self.if_rt, "lookup", "100")
        sh("ip", "-n", self.ns_r, "rule", "del", "iif", self.if_rc, "lookup", "101")
        self.delay_ms = delay_ms
        self.start_line()
        return old

    @staticmethod
    def sysctl(ns: str, values: dict[str, str], optional: bool = False) -> None:
        """Write /proc/sys/... as seen from inside `ns` (net.* is per namespace)."""
        line = "{ echo %s > /proc/sys/%s; } 2>/dev/null || true\n" if optional else "echo %s > /proc/sys/%s\n"
        script = "".join(line % (v, k) for k, v in values.items())
        sh("ip", "netns", "exec", ns, "sh", "-ec", script)

    def describe(self) -> str:
        rules = sh("ip", "-n", self.ns_r, "rule", "show").stdout.split("\n")
        rules = "; ".join(r.strip() for r in rules if "lookup 10" in r)
        return (f"namespaces {self.ns_t} ({T_ADDR}, target), {self.ns_r} (router: {self.if_rt} {R_ADDR_T}, "
                f"{self.if_rc} {R_ADDR_C}, TUN {self.tun_a} and {self.tun_b}, delay line PID {self.proc.pid}, "
                f"{self.delay_ms} ms each way; rules: {rules}) and {self.ns_c} ({C_ADDR_DL}, client); "
                f"qdiscs: {self.qdiscs()}")

    def shape(self, delay_ms: float) -> None:
        raise NotImplementedError("the delay line's delay is fixed when it starts")

    def root_devs(self) -> tuple[str, ...]:
        return (self.if_t, self.if_rt, self.if_rc, self.if_c)

    def stop_line(self) -> dict | str:
        """Stop the delay line (by PID): its counters, with its CPU time; or its error text."""
        if self.proc is None:
            return self.stats or {}
        proc, self.proc = self.proc, None
        cpu = None
        wall = time.monotonic() - self.started
        if proc.poll() is None:
            try:
                cpu = cpu_seconds(proc.pid)
            except OSError:
                pass
            proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            self.stats = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return f"rc {proc.returncode}: {err.strip()} {out.strip()}"
        self.stats.update(cpu_s=cpu, wall_s=wall, rc=proc.returncode)
        if err.strip():
            self.stats["stderr"] = err.strip()
        return self.stats

    def down(self) -> None:
        self.stop_line()
        super().down()


def raw_tcp(link: Link, direction: str, seconds: float) -> float:
    """Goodput (MiB/s) of one TCP stream target->client ("t2c") or client->target ("c2t")."""
    rx_ns, rx_addr, tx_ns = ((link.ns_c, link.c_addr, link.ns_t) if direction == "t2c"
                             else (link.ns_t, link.t_addr, link.ns_c))
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


def print_rtt(label: str, r: dict) -> None:
    if "median_ms" not in r:
        print(f"RTT {label}: no answer to {r['probes']} probes", flush=True)
        return
    print(f"RTT {label} (UDP echo, {r['probes']} probes, Python at both ends): min {r['min_ms']:.3f} ms, "
          f"median {r['median_ms']:.3f} ms, mean {r['mean_ms']:.3f} ms, max {r['max_ms']:.3f} ms, "
          f"lost {r['lost']}", flush=True)


def print_line_stats(st: dict | str) -> None:
    if not isinstance(st, dict) or "a_to_b" not in st:
        print(f"delay line: no counters ({st})", flush=True)
        return
    for key, label in (("a_to_b", "target->client"), ("b_to_a", "client->target")):
        d = st[key]
        print(f"delay line {label}: {d['pkts_out']} packets ({d['bytes_out'] / 1048576:.1f} MiB) out of "
              f"{d['pkts_in']} in, dropped {d['drop_full']} (FIFO full) + {d['drop_big']} (too large), "
              f"write errors {d['write_err']}, deepest FIFO {d['max_depth']}; released "
              f"{d['late_mean_us']:+.1f} us from due on average, max {d['late_max_us']:.0f} us late, "
              f">20 us late: {d['late_over_20us']}, >100 us late: {d['late_over_100us']}, "
              f">20 us early: {d['early_over_20us']}", flush=True)
    print(f"delay line wake-up lateness estimate at the end: {st['wake_est_us']:.1f} us", flush=True)
    if st.get("cpu_s") is not None and st.get("wall_s"):
        print(f"delay line CPU: {st['cpu_s']:.1f} s over {st['wall_s']:.0f} s "
              f"({st['cpu_s'] / st['wall_s']:.1%} of one core)", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tcp-recv"]:
        return tcp_recv(argv[1], int(argv[2]))
    if argv[:1] == ["--tcp-send"]:
        return tcp_send(argv[1], int(argv[2]), float(argv[3]))
    if argv[:1] == ["--udp-echo"]:
        return udp_echo(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] == ["--udp-ping"]:
        return udp_ping(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each run (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, ours then tgt in each (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the images live (default /dev/shm, tmpfs)")
    ap.add_argument("--delay-ms", type=float, default=DELAY_MS,
                    help=f"extra delay each way of the second variant (default {DELAY_MS}; 0 skips the variant)")
    ap.add_argument("--delay-line", action="store_true",
                    help="use the delay line (delayline.c, router namespace) even if the kernel has netem")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("link100.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    # Serve this checkout's code, not whatever copy of the package happens to be installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    client = build_client()
    work = Path(tempfile.mkdtemp(prefix="pyiscsi-link100-", dir=args.dir))
    link = Link()
    dlink: DelayLink | None = None
    rows: list[dict] = []
    notes: list[str] = []
    meta: dict = {"seconds": args.seconds, "rounds": args.rounds, "shape": " ".join(SHAPE),
                  "delay_ms": args.delay_ms, "notes": notes}
    try:
        link.up()
        print(link.describe())
        print(f"images on {args.dir} (tmpfs: the link and the targets are measured, not the disk)")
        netem, why = link.netem_available()
        if args.delay_ms:
            if netem and not args.delay_line:
                meta["delay_method"] = "netem"
                notes.append(f"{args.delay_ms} ms delay variant: netem qdisc under the tbf")
            else:
                meta["delay_method"] = "delay line"
                notes.append(f"{args.delay_ms} ms delay variant: delay line (benchmarks/delayline.c between two "
                             f"TUN devices in a router namespace), "
                             + ("as asked (--delay-line)" if netem else
                                f"since this kernel has no netem qdisc (`tc qdisc add ... netem` failed: {why})"))
            print(notes[-1])
        notes.append("digest rows use HeaderDigest=CRC32C only: libiscsi 1.19 has no DataDigest setting")
        print(notes[-1], flush=True)
        print("\n100 Mbit/s each way, no added delay", flush=True)
        meta["rtt_no_delay"] = link.rtt()
        print_rtt("no added delay", meta["rtt_no_delay"])
        rows += suite(client, link, work, args.seconds, args.rounds)
        print_table(rows)
        if args.delay_ms:
            if meta["delay_method"] == "netem":
                link.shape(args.delay_ms)
                delayed: Link = link
            else:
                link.down()                    # its namespaces go; the delayed link has its own
                dlink = DelayLink(0.0, build_delayline())
                dlink.up()
                # The hop through the router namespace and the TUN devices costs something of its
                # own: measured with the line holding nothing, then it starts again with the delay.
                meta["rtt_delay_line_0ms"] = dlink.rtt()
                dlink.restart_line(args.delay_ms)
                delayed = dlink
            print(f"\n100 Mbit/s each way, {args.delay_ms} ms extra delay each way by "
                  f"{meta['delay_method']}; {delayed.describe()}", flush=True)
            meta["rtt_delayed"] = delayed.rtt()
            print_rtt("no added delay", meta["rtt_no_delay"])
            if dlink is not None:
                print_rtt("through the delay line holding 0 ms (router hop, TUN devices)",
                          meta["rtt_delay_line_0ms"])
            print_rtt(f"{args.delay_ms} ms each way by {meta['delay_method']}", meta["rtt_delayed"])
            added = {"rtt_added_ms": "no_delay", "rtt_added_by_hold_ms": "delay_line_0ms"}
            for key, ref in added.items():
                ref = meta.get(f"rtt_{ref}", {})
                if "median_ms" in meta["rtt_delayed"] and "median_ms" in ref:
                    meta[key] = {k: meta["rtt_delayed"][k] - ref[k] for k in ("min_ms", "median_ms")}
                    print(f"RTT added against {'no added delay' if key == 'rtt_added_ms' else 'holding 0 ms'}: "
                          f"min {meta[key]['min_ms']:+.3f} ms, median {meta[key]['median_ms']:+.3f} ms "
                          f"(2 x {args.delay_ms} ms = {2 * args.delay_ms:.3f} ms)", flush=True)
            delayed_rows = suite(client, delayed, work, args.seconds, args.rounds)
            for r in delayed_rows:
                r["delay_method"] = meta["delay_method"]
            print_table(delayed_rows)
            rows += delayed_rows
            if dlink is not None:
                meta["delay_line"] = dlink.stop_line()
                print()
                print_line_stats(meta["delay_line"])
    finally:
        if dlink is not None:
            dlink.down()
        link.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"link100-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fields = list(dict.fromkeys(k for r in rows for k in r if not k.endswith("rounds_mib_s")))
    with open(RESULTS / f"link100-{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nsaved benchmarks/results/link100-{stamp}.{{json,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
