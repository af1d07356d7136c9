"""How fast can one thread move 256 KiB reads from an image to a socket?

    python benchmarks/copy_paths.py [--count 8000] [--size 262144] [--dir /dev/shm]

The 256 KiB sequential read of benchmarks/loopback.py is bound by one core
doing two copies per command (image -> buffer with preadv, buffer -> socket
with writev); tgt spreads the same copies over two threads.  This measures
the ceiling of the copy paths alone, in one run, without any iSCSI: a Python
thread sending COUNT reads of SIZE bytes from an image on DIR to a loopback
socket (a reader thread on the other end), with

* ``pread + send``   -- the target's path for images on disk (a fresh buffer
  per read);
* ``sendfile``       -- the kernel moves page-cache pages to the socket (zero
  copy on the sending side): the target's path for READs of 64 KiB or more
  from images in memory (pyiscsi_target/payload.py).

Printed as a table and saved as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _drain(port: int, total: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    s.close()


def measure(fd: int, image_blocks: int, size: int, count: int, mode: str) -> dict:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    reader = threading.Thread(target=_drain, args=(ls.getsockname()[1], size * count))
    reader.start()
    conn, _ = ls.accept()
    cpu0, t0 = time.thread_time(), time.perf_counter()
    for i in range(count):
        off = (i % image_blocks) * size
        if mode == "sendfile":
            sent = 0
            while sent < size:
                sent += os.sendfile(conn.fileno(), fd, off + sent, size - sent)
        else:
            conn.sendall(os.pread(fd, size, off))
    elapsed = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    reader.join()
    conn.close()
    ls.close()
    return {"mode": mode, "mib_s": size * count / elapsed / (1 << 20),
            "sender_cpu_us_per_read": cpu / count * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=8000)
    ap.add_argument("--size", type=int, default=262144)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args(argv)
    blocks = 1024
    with tempfile.NamedTemporaryFile(dir=args.dir) as f:
        chunk = os.urandom(1 << 20)
        for _ in range(blocks * args.size // len(chunk)):
            f.write(chunk)
        f.flush()
        rows = [measure(f.fileno(), blocks, args.size, args.count, m) for m in ("pread + send", "sendfile")]
    print(f"{'path':14} {'MiB/s':>8} {'sender CPU us/read':>19}")
    for r in rows:
        print(f"{r['mode']:14} {r['mib_s']:8.0f} {r['sender_cpu_us_per_read']:19.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "copy_paths.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
