"""kill -9 trials: nothing acknowledged as durable is lost.

Per trial, two clients write numbered, self-checking 4 KiB blocks at random
slots, one on a write-back LUN (with FUA and SYNCHRONIZE CACHE at random
points) and one on a journal LUN; the server is killed with SIGKILL at a
random moment and restarted on the same images and journal.  Then, per
512-byte sector (the unit a disk writes atomically):

* it is intact (its content matches its own header: sequence, slot, sector);
* it is a version written to that slot, not older than the newest write
  that was durable: on the write-back LUN a FUA write or one followed by a
  completed SYNCHRONIZE CACHE; on the journal LUN *every* acknowledged write.

Trials: ``KILL_TRIALS`` (default 20; the benchmark runs 100).  Every process
started here is ended by its PID.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import threading
import time
from pathlib import Path

from tests.e2e.test_cache_e2e import connect, r10, sync10, w10, write_cache_config
from tests.support.target import free_port, start_target

SLOTS = 256  # 4 KiB slots: the first MiB of each LUN
SECTOR = 512
_HDR = struct.Struct(">8sQII")
MAGIC = b"KILLTRL1"


def sector(seq: int, slot: int, s: int) -> bytes:
    head = _HDR.pack(MAGIC, seq, slot, s)
    body = hashlib.shake_256(head).digest(SECTOR - len(head))
    return head + body


def block(seq: int, slot: int) -> bytes:
    return b"".join(sector(seq, slot, s) for s in range(8))


class Model:
    """What one LUN may hold, per slot and sector."""

    def __init__(self) -> None:
        self.floor = [[0] * 8 for _ in range(SLOTS)]  # oldest acceptable seq (0 = zeros ok)
        self.issued: list[set[int]] = [set() for _ in range(SLOTS)]
        self.unsynced: dict[int, int] = {}
        self.durable_writes = 0

    def make_durable(self, slot: int, seq: int) -> None:
        self.floor[slot] = [max(f, seq) for f in self.floor[slot]]
        self.durable_writes += 1

    def check(self, slot: int, data: bytes) -> tuple[int, list[int]]:
        seqs = []
        for s in range(8):
            raw = data[s * SECTOR : (s + 1) * SECTOR]
            if raw == bytes(SECTOR):
                assert self.floor[slot][s] == 0, f"slot {slot} sector {s}: zeros, but seq {self.floor[slot][s]} was durable"
                seqs.append(0)
                continue
            magic, seq, sl, ss = _HDR.unpack_from(raw)
            assert magic == MAGIC and sl == slot and ss == s, f"slot {slot} sector {s}: foreign or torn data"
            assert raw == sector(seq, slot, s), f"slot {slot} sector {s}: corrupt (seq {seq})"
            assert seq in self.issued[slot], f"slot {slot} sector {s}: seq {seq} never written there"
            assert seq >= self.floor[slot][s], f"slot {slot} sector {s}: seq {seq} older than durable {self.floor[slot][s]}"
            seqs.append(seq)
        return sum(1 for f in self.floor[slot] if f), seqs


def client(port: int, lun: int, model: Model, journal: bool, seq0: int, rng: random.Random, stop: threading.Event) -> None:
    try:
        ini = connect(port, f"iqn.2026-11.test:kill{lun}", bytes.fromhex(f"4000013700{lun:02x}"))
    except OSError:
        return
    seq = seq0
    try:
        while not stop.is_set():
            seq += 1
            slot = rng.randrange(SLOTS)
            fua = not journal and rng.random() < 0.1
            model.issued[slot].add(seq)  # may land even if never acknowledged
            r = ini.command(w10(slot * 8, 8, fua=fua), lun=lun, write=block(seq, slot))
            if r.status != 0:
                raise AssertionError(f"write failed: {r.status} {r.sense.hex()}")
            if journal or fua:
                model.make_durable(slot, seq)
            else:
                model.unsynced[slot] = seq
            if not journal and rng.random() < 0.05:
                r = ini.command(sync10(), lun=lun)
                assert r.status == 0, r.sense.hex()
                for sl, sq in model.unsynced.items():
                    model.make_durable(sl, sq)
                model.unsynced.clear()
    except (OSError, EOFError, ConnectionError):
        pass  # the target died under us: the command in flight was not acknowledged
    except Exception as e:  # noqa: BLE001
        if "closed" not in str(e).lower() and "timed out" not in str(e).lower():
            raise
    finally:
        try:
            ini.close()
        except Exception:  # noqa: BLE001
            pass


def verify(port: int, models: dict[int, Model]) -> int:
    ini = connect(port, "iqn.2026-11.test:verify", bytes.fromhex("400001370099"))
    checked = 0
    try:
        for lun, model in models.items():
            for slot in range(SLOTS):
                r = ini.command(r10(slot * 8, 8), lun=lun, read=4096)
                assert r.status == 0
                n, seqs = model.check(slot, r.data)
                checked += n > 0
                # What survived is now the floor: it is on the image (and a
                # clean restart would keep it).
                model.floor[slot] = [max(f, s) for f, s in zip(model.floor[slot], seqs)]
            model.unsynced.clear()
    finally:
        ini.close()
    return checked


def test_kill9_trials(tmp_path: Path):
    trials = int(os.environ.get("KILL_TRIALS", "20"))
    rng = random.Random(int(os.environ.get("KILL_SEED", "1234")))
    port = free_port()
    cfg = write_cache_config(tmp_path, port)
    models = {0: Model(), 1: Model()}
    verified = 0
    seq = 0
    t0 = time.monotonic()
    for trial in range(trials):
        t = start_target(cfg, "127.0.0.1", port, log_name=f"server{trial}.log")
        try:
            if trial:
                verified += verify(port, models)
            stop = threading.Event()
            threads = [
                threading.Thread(target=client, args=(port, 0, models[0], False, seq, random.Random(rng.random()), stop)),
                threading.Thread(target=client, args=(port, 1, models[1], True, seq + 5_000_000, random.Random(rng.random()), stop)),
            ]
            seq += 10_000_000
            for th in threads:
                th.start()
            time.sleep(rng.uniform(0.2, 1.0))
            t.proc.send_signal(signal.SIGKILL)  # by PID
            t.proc.wait()
            stop.set()
            for th in threads:
                th.join(30)
                assert not th.is_alive()
        finally:
            if t.proc.poll() is None:
                t.proc.kill()
                t.proc.wait()
    t = start_target(cfg, "127.0.0.1", port, log_name="server-final.log")
    try:
        verified += verify(port, models)
    finally:
        t.stop()
    durable = sum(m.durable_writes for m in models.values())
    print(f"\nkill -9 trials: {trials}, durable writes acknowledged: {durable}, "
          f"slot checks with durable data: {verified}, {time.monotonic() - t0:.1f}s")
    assert durable > trials  # the trials really wrote something durable
    assert verified > 0
