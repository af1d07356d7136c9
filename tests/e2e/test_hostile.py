"""A hostile stream against the live server while QEMU copies data: the copy
finishes identical and without error, and the server's memory stays flat.

Hostile clients (threads, seeded) cycle through: random garbage, truncated
headers left hanging (the login timeout closes them), oversized login PDUs,
logins followed by random/oversized/truncated PDUs, connection floods past
the per-address limit, logins to unknown targets (slowed down), and a client
that queues reads and never reads the answers.  Bounded: 25 s of abuse.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, F_TRANSIT, LoginRequest, ScsiCommand
from tests.conftest import require
from tests.support.initiator import Initiator
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config

MiB = 1 << 20
ABUSE_SECONDS = 25.0
OPCODES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1C, 0x1D, 0x3F, 0x41, 0x43, 0x45, 0x46]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Abuser(threading.Thread):
    def __init__(self, target, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.t, self.rng, self.stop = target, random.Random(seed), stop
        self.inputs = 0
        self.lingering: list[socket.socket] = []
        self.errors: list[str] = []

    def sock(self) -> socket.socket:
        s = socket.create_connection((self.t.host, self.t.port), timeout=2)
        s.settimeout(2)
        return s

    def run(self):
        scenarios = [self.garbage] * 3 + [self.truncated, self.oversized_login] * 2 + \
                    [self.in_session] * 4 + [self.flood, self.no_reader, self.unknown_target]
        unknown = 0
        while not self.stop.is_set():
            fn = self.rng.choice(scenarios)
            if fn == self.unknown_target:
                unknown += 1
                if unknown > 2:        # a few only: each one slows this source down (doubling)
                    continue
            try:
                fn()
            except (OSError, ConnectionError, AssertionError):
                pass                   # the server closing on us is the expected answer
        for s in self.lingering:
            s.close()

    def _send(self, s, data: bytes):
        self.inputs += 1
        s.sendall(data)

    def garbage(self):
        with self.sock() as s:
            self._send(s, self.rng.randbytes(self.rng.randint(1, 8192)))

    def truncated(self):
        s = self.sock()
        self._send(s, LoginRequest(flags=F_TRANSIT | 1, isid=bytes(6), itt=1).encode(100)[:self.rng.randint(1, 47)])
        if len(self.lingering) < 6:
            self.lingering.append(s)        # left hanging: the login timeout must close it
        else:
            s.close()

    def oversized_login(self):
        with self.sock() as s:
            hdr = LoginRequest(flags=F_TRANSIT | 1, isid=bytes(6), itt=1).encode(self.rng.choice([8193, 1 << 20,
                                                                                                (1 << 24) - 1]))
            self._send(s, hdr + self.rng.randbytes(4096))

    def unknown_target(self):
        with self.sock() as s:
            data = keys.encode_text([("InitiatorName", "iqn.2026-11.test:hostile"),
                                     ("TargetName", "iqn.2026-11.test:nope"), ("AuthMethod", "None")])
            self._send(s, LoginRequest(flags=F_TRANSIT | 1, isid=bytes(6), itt=1).encode(len(data)) + data
                       + bytes(-len(data) % 4))
            s.recv(4096)

    def flood(self):
        socks = []
        try:
            for _ in range(40):
                socks.append(self.sock())
                self.inputs += 1
        finally:
            for s in socks:
                s.close()

    def _login(self) -> Initiator:
        isid = bytes([0x40, 0, 0, 0]) + self.rng.randbytes(2)
        ini = Initiator(self.t.host, self.t.port, name="iqn.2026-11.test:hostile", isid=isid, timeout=3)
        ini.login(QUORUM)
        return ini

    def in_session(self):
        ini = self._login()
        try:
            mrdsl = int(ini.params.get("MaxRecvDataSegmentLength", "8192"))
            for _ in range(self.rng.randint(1, 12)):
                bhs = bytearray(self.rng.randbytes(48))
                bhs[0] = self.rng.choice(OPCODES) | self.rng.choice([0, 0x40])
                bhs[4] = self.rng.choice([0, 0, 1, 3])
                dlen = self.rng.choice([0, 0, 4, 512, mrdsl, mrdsl + 1, 4 * mrdsl, (1 << 24) - 1])
                bhs[5:8] = dlen.to_bytes(3, "big")
                body = self.rng.randbytes(min(dlen + bhs[4] * 4, 300 * 1024))
                if self.rng.random() < 0.1:
                    body = body[:self.rng.randint(0, len(body))]     # truncated, then more PDUs
                self._send(ini.sock, bytes(bhs) + body + bytes(-len(body) % 4))
        finally:
            ini.close()

    def no_reader(self):
        """Queue reads and never read the Data-In: back-pressure, not unbounded buffers."""
        ini = self._login()
        try:
            for i in range(16):
                cdb = bytes([0x28, 0, 0, 0, (i * 512) >> 8 & 0xFF, (i * 512) & 0xFF, 0, 0x02, 0, 0]).ljust(16, b"\0")
                ini.send(ScsiCommand(flags=F_FINAL | F_READ | 1, itt=100 + i, expected_length=256 * 1024,
                                     cmdsn=ini.cmdsn, expstatsn=ini.expstatsn, cdb=cdb))
                ini.cmdsn += 1
                self.inputs += 1
            time.sleep(0.3)
        finally:
            ini.close()


HOSTILE_SOURCE = "127.0.0.2"     # the abusers' own address: limits and slow-downs are per source


def test_hostile_stream_hurts_no_one(tmp_path, monkeypatch):
    require("qemu-img")
    real = socket.create_connection
    port = free_port()
    cfg = write_config(tmp_path, port, extra_server='login_timeout = "2s"\nmax_connections_per_address = 48\n'
                                                   'login_failure_delay = "100ms"\nnop_interval = 0')
    monkeypatch.setattr(socket, "create_connection", real)
    t = start_target(cfg, "127.0.0.1", port)
    monkeypatch.setattr(socket, "create_connection",
                        lambda addr, timeout=None, **kw: real(addr, timeout, source_address=(HOSTILE_SOURCE, 0)))
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(96 * MiB))
    dst = (f"driver=iscsi,transport=tcp,portal={t.portal},target={DATA},lun=0,"
           f"initiator-name=iqn.2026-11.test:good")
    stop = threading.Event()
    abusers = [Abuser(t, seed, stop) for seed in range(4)]
    copier = None
    try:
        base = rss(t.proc.pid)
        for a in abusers:
            a.start()
        time.sleep(1.0)
        copier = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), dst],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + ABUSE_SECONDS
        peak = base
        while time.monotonic() < deadline:
            peak = max(peak, rss(t.proc.pid))
            time.sleep(0.25)
        stop.set()
        for a in abusers:
            a.join(30)
        out, err = copier.communicate(timeout=300)
        assert copier.returncode == 0, err
        back = subprocess.run(["qemu-img", "compare", "--image-opts", f"driver=file,filename={src}", dst],
                              capture_output=True, text=True, timeout=300)
        assert back.returncode == 0, back.stdout + back.stderr
        time.sleep(2.5)                     # hanging truncated logins hit the 2 s login timeout
        end = rss(t.proc.pid)
    finally:
        stop.set()
        if copier is not None and copier.poll() is None:
            copier.kill()
            copier.wait()
        rc = t.stop()
    inputs = sum(a.inputs for a in abusers)
    print(f"\nhostile inputs tried against the live server: {inputs}; RSS {base / MiB:.0f} MiB at start, "
          f"peak {peak / MiB:.0f} MiB, {end / MiB:.0f} MiB at the end")
    assert rc == 0, t.log_text()[-3000:]
    assert inputs > 500
    assert peak - base < 96 * MiB and end - base < 64 * MiB, (base, peak, end)
    log = t.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000:][:6000]
    assert "login not finished within" in log
    assert "connection refused" in log                  # the per-address limit was hit
    assert "target iqn.2026-11.test:nope not found" in log
