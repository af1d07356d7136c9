"""I/O counters, login counters and their Prometheus exposition.

Cost model: the per-command path does one thing -- the device's observer
(:class:`DeviceObserver`, called by ``ScsiTargetDevice.submit`` when a command
completes) adds to plain integers in a slot object.  No locks, no label
lookups, no allocation: prometheus_client's own Counter/Histogram would take a
lock and resolve labels per command.  Everything else (sessions, cache, PR
state, sizes) is *read* when somebody asks -- a scrape, ``status``, the
dashboard -- through :class:`Collector`, so it costs nothing while nobody looks.

The counters also feed ``status`` and the dashboard's throughput, sampled once
a second by :meth:`Telemetry.sample` (rates = difference of two samples).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque

__all__ = ["LATENCY_BOUNDS", "LunStats", "DeviceObserver", "Telemetry", "Collector"]

# Upper bounds (seconds) of the latency histogram buckets: 100 µs (page-cache
# hit) to 10 s (a stalled disk); +Inf is implicit.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

OTHER, READ, WRITE, FLUSH, PR_OUT = range(5)
_KIND = bytearray(256)  # opcode -> kind: one index per command, no branches on names
for _op in (0x08, 0x28, 0xA8, 0x88):                                     # READ 6/10/12/16
    _KIND[_op] = READ
for _op in (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x89, 0x41, 0x93):  # WRITE*, W&V, CAW, WRITE SAME
    _KIND[_op] = WRITE
for _op in (0x35, 0x91):                                                 # SYNCHRONIZE CACHE 10/16
    _KIND[_op] = FLUSH
_KIND[0x5F] = PR_OUT

PR_OUT_ACTIONS = {0: "register", 1: "reserve", 2: "release", 3: "clear", 4: "preempt",
                  5: "preempt_and_abort", 6: "register_and_ignore", 7: "register_and_move"}

_CHECK_CONDITION = 0x02
_RESERVATION_CONFLICT = 0x18


class LunStats:
    """Counters of one LU since it was brought up (or added by a reload)."""

    __slots__ = ("read_ops", "write_ops", "flush_ops", "other_ops", "read_bytes", "write_bytes",
                 "read_lat", "write_lat", "flush_lat", "read_lat_sum", "write_lat_sum", "flush_lat_sum",
                 "check_conditions", "conflicts", "pr_out")

    def __init__(self) -> None:
        self.read_ops = self.write_ops = self.flush_ops = self.other_ops = 0
        self.read_bytes = self.write_bytes = 0
        n = len(LATENCY_BOUNDS) + 1
        self.read_lat = [0] * n
        self.write_lat = [0] * n
        self.flush_lat = [0] * n
        self.read_lat_sum = self.write_lat_sum = self.flush_lat_sum = 0.0
        self.check_conditions = self.conflicts = 0
        self.pr_out = [0] * 8  # by PERSISTENT RESERVE OUT service action

    def totals(self) -> tuple[int, int, int, int]:
        return self.read_ops, self.write_ops, self.read_bytes, self.write_bytes


class DeviceObserver:
    """``device.observer``: called once per completed command of one target."""

    __slots__ = ("luns", "now")

    def __init__(self, now) -> None:
        self.luns: dict[int, LunStats] = {}
        self.now = now  # the event loop's clock (the one submit() stamped t0 with)

    def __call__(self, task, result, t0: float | None) -> None:
        """Count one completed command.  ``t0``: the loop time it started, or
        None when it was answered in the step that received it (latency 0,
        the first bucket: no clock read, no bucket search)."""
        st = self.luns.get(task.lun)
        if st is None:  # a command to a LUN that does not exist: nothing to count
            return
        kind = _KIND[task.cdb[0]]
        if READ <= kind <= FLUSH:      # the timed kinds
            if t0 is None:
                dt, bucket = 0.0, 0
            else:
                dt = self.now() - t0
                bucket = bisect_left(LATENCY_BOUNDS, dt)
            if kind == READ:
                st.read_ops += 1
                st.read_bytes += len(result.data_in)
                st.read_lat[bucket] += 1
                st.read_lat_sum += dt
            elif kind == WRITE:
                st.write_ops += 1
                st.write_bytes += len(task.data_out)
                st.write_lat[bucket] += 1
                st.write_lat_sum += dt
            else:
                st.flush_ops += 1
                st.flush_lat[bucket] += 1
                st.flush_lat_sum += dt
        else:
            st.other_ops += 1
            if kind == PR_OUT and result.status == 0:
                st.pr_out[task.cdb[1] & 0x07] += 1
        status = result.status
        if status:
            if status == _RESERVATION_CONFLICT:
                st.conflicts += 1
            elif status == _CHECK_CONDITION:
                st.check_conditions += 1


class Telemetry:
    """Counters of the running server: per-LU I/O, logins, reloads; and a
    one-second sampler of the I/O totals for throughput."""

    SAMPLES = 120  # two minutes of history for the dashboard's graph

    def __init__(self, server=None) -> None:
        self.server = server
        self.observers: dict[str, DeviceObserver] = {}
        self.logins_ok = 0
        self.logins_failed: dict[str, int] = {}
        self.reloads: dict[str, int] = {"ok": 0, "refused": 0}
        self.started = time.time()
        # (unix time, {(iqn, lun): (read_ops, write_ops, read_bytes, write_bytes)})
        self.history: deque = deque(maxlen=self.SAMPLES + 1)

    # -- wiring ----------------------------------------------------------------
    def attach(self, iqn: str, device, now) -> None:
        """Count this device's commands (again after a reload replaced it)."""
        obs = self.observers.get(iqn)
        if obs is None or getattr(device, "observer", None) is not obs:
            obs = self.observers[iqn] = DeviceObserver(now)
        for lun_id in device.luns:
            obs.luns.setdefault(lun_id, LunStats())
        for lun_id in [x for x in obs.luns if x not in device.luns]:
            del obs.luns[lun_id]
        device.observer = obs

    def detach(self, iqn: str, device=None) -> None:
        self.observers.pop(iqn, None)
        if device is not None:
            device.observer = None

    def stats(self, iqn: str, lun: int) -> LunStats | None:
        obs = self.observers.get(iqn)
        return obs.luns.get(lun) if obs else None

    # -- events (not per command) ---------------------------------------------------
    def login_ok(self) -> None:
        self.logins_ok += 1

    def login_failed(self, status: int) -> None:
        reason = login_failure_reason(status)
        self.logins_failed[reason] = self.logins_failed.get(reason, 0) + 1

    # -- throughput --------------------------------------------------------------
    def sample(self) -> None:
        snap = {(iqn, lun): st.totals() for iqn, obs in self.observers.items() for lun, st in obs.luns.items()}
        self.history.append((time.time(), snap))

    def rates(self, window: int = 5) -> dict:
        """Per LU and total: read/write bytes and ops per second over the
        last ``window`` samples (a few seconds, to smooth bursts)."""
        out = {"total": (0.0, 0.0, 0.0, 0.0)}
        if len(self.history) < 2:
            return out
        t1, new = self.history[-1]
        t0, old = self.history[max(0, len(self.history) - 1 - window)]
        dt = max(t1 - t0, 1e-3)
        tot = [0.0, 0.0, 0.0, 0.0]
        for key, cur in new.items():
            prev = old.get(key, (0, 0, 0, 0))
            r = tuple(max(0, c - p) / dt for c, p in zip(cur, prev))
            out[key] = r
            for i in range(4):
                tot[i] += r[i]
        out["total"] = tuple(tot)
        return out

    def series(self) -> list[dict]:
        """Per-second total throughput for the dashboard graph."""
        h = list(self.history)
        out = []
        for (t0, a), (t1, b) in zip(h, h[1:]):
            dt = max(t1 - t0, 1e-3)
            rb = wb = 0
            for key, cur in b.items():
                prev = a.get(key, (0, 0, 0, 0))
                rb += max(0, cur[2] - prev[2])
                wb += max(0, cur[3] - prev[3])
            out.append({"t": round(t1, 3), "read_bps": rb / dt, "write_bps": wb / dt})
        return out


def login_failure_reason(status: int) -> str:
    from .iscsi.login import LoginStatus

    try:
        return LoginStatus(status).name.lower()
    except ValueError:
        return f"status_0x{status:04x}"


# ---------------------------------------------------------------------------
# Prometheus exposition (read at scrape time)
# ---------------------------------------------------------------------------

class Collector:
    """A prometheus_client collector over the running server's state."""

    def __init__(self, server, telemetry: Telemetry) -> None:
        self.server = server
        self.telemetry = telemetry

    def describe(self):  # no fixed description: metrics depend on the config
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from . import __version__

        tel, srv = self.telemetry, self.server
        L = ["target", "lun"]
        info = GaugeMetricFamily("pyiscsi_info", "Server version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        ops = CounterMetricFamily("pyiscsi_lun_ops", "SCSI commands completed per LU", labels=L + ["op"])
        nbytes = CounterMetricFamily("pyiscsi_lun_bytes", "Bytes read and written per LU", labels=L + ["op"])
        lat = HistogramMetricFamily("pyiscsi_lun_latency_seconds",
                                    "Command latency from submission to completion per LU", labels=L + ["op"])
        errors = CounterMetricFamily("pyiscsi_lun_check_conditions", "Commands ended with CHECK CONDITION", labels=L)
        conflicts = CounterMetricFamily("pyiscsi_reservation_conflicts",
                                        "Commands ended with RESERVATION CONFLICT", labels=L)
        pr_events = CounterMetricFamily("pyiscsi_pr_out", "Successful PERSISTENT RESERVE OUT commands",
                                        labels=L + ["action"])
        size = GaugeMetricFamily("pyiscsi_lun_size_bytes", "LU capacity", labels=L)
        pr_gen = GaugeMetricFamily("pyiscsi_pr_generation", "Persistent reservation generation", labels=L)
        pr_regs = GaugeMetricFamily("pyiscsi_pr_registrations", "Registered reservation keys", labels=L)
        pr_res = GaugeMetricFamily("pyiscsi_pr_reserved", "1 while a persistent reservation is held", labels=L)
        c_hits = CounterMetricFamily("pyiscsi_cache_hits", "Cache read hits", labels=L)
        c_miss = CounterMetricFamily("pyiscsi_cache_misses", "Cache read misses", labels=L)
        c_dirty = GaugeMetricFamily("pyiscsi_cache_dirty_bytes", "Bytes written but not yet on the image", labels=L)
        c_out = CounterMetricFamily("pyiscsi_cache_written_out_bytes", "Bytes written out to the image", labels=L)
        for iqn, dev in srv.devices.items():
            obs = tel.observers.get(iqn)
            for lun_id, lu in sorted(dev.luns.items()):
                lab = [iqn, str(lun_id)]
                size.add_metric(lab, lu.backend.size)
                st = pr_state(lu)
                if st is not None:
                    pr_gen.add_metric(lab, st.generation)
                    pr_regs.add_metric(lab, len(st.registrations))
                    pr_res.add_metric(lab, 1 if st.res_type is not None else 0)
                cstats = getattr(lu.backend, "stats", None)
                if isinstance(cstats, dict):
                    c_hits.add_metric(lab, cstats.get("hits", 0))
                    c_miss.add_metric(lab, cstats.get("misses", 0))
                    c_out.add_metric(lab, cstats.get("written", 0))
                    c_dirty.add_metric(lab, getattr(lu.backend, "dirty_bytes", 0))
                s = obs.luns.get(lun_id) if obs else None
                if s is None:
                    continue
                for op, n in (("read", s.read_ops), ("write", s.write_ops), ("flush", s.flush_ops),
                              ("other", s.other_ops)):
                    ops.add_metric(lab + [op], n)
                nbytes.add_metric(lab + ["read"], s.read_bytes)
                nbytes.add_metric(lab + ["write"], s.write_bytes)
                for op, buckets, total in (("read", s.read_lat, s.read_lat_sum), ("write", s.write_lat, s.write_lat_sum),
                                           ("flush", s.flush_lat, s.flush_lat_sum)):
                    acc, cum = 0, []
                    for bound, n in zip(LATENCY_BOUNDS + (float("inf"),), buckets):
                        acc += n
                        cum.append((_le(bound), acc))
                    lat.add_metric(lab + [op], cum, total)
                errors.add_metric(lab, s.check_conditions)
                conflicts.add_metric(lab, s.conflicts)
                for sa, name in PR_OUT_ACTIONS.items():
                    pr_events.add_metric(lab + [name], s.pr_out[sa])
        yield from (ops, nbytes, lat, errors, conflicts, pr_events, size, pr_gen, pr_regs, pr_res,
                    c_hits, c_miss, c_dirty, c_out)

        sessions = GaugeMetricFamily("pyiscsi_sessions", "Logged-in sessions", labels=["target", "type"])
        counts: dict[tuple[str, str], int] = {}
        conns = 0
        for s in list(srv.ctx.sessions.by_tsih.values()):
            key = (s.target.name if s.target else "", s.session_type or "Normal")
            counts[key] = counts.get(key, 0) + 1
            conns += len(s.connections)
        for iqn in srv.devices:
            counts.setdefault((iqn, "Normal"), 0)
        for (t, kind), n in sorted(counts.items()):
            sessions.add_metric([t, kind], n)
        yield sessions
        yield GaugeMetricFamily("pyiscsi_connections", "TCP connections (all phases)", value=len(srv.protocols))
        logins = CounterMetricFamily("pyiscsi_logins", "Login attempts by outcome", labels=["result", "reason"])
        logins.add_metric(["ok", ""], tel.logins_ok)
        for reason, n in sorted(tel.logins_failed.items()):
            logins.add_metric(["failed", reason], n)
        yield logins
        reloads = CounterMetricFamily("pyiscsi_reloads", "Configuration reloads by outcome", labels=["result"])
        for k, n in tel.reloads.items():
            reloads.add_metric([k], n)
        yield reloads


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def pr_state(lu):
    """The LU's persistent-reservation state (scsi/pr.py PrState), or None."""
    pr = getattr(lu, "pr", None)
    return getattr(pr, "state", None)


def make_registry(server, telemetry: Telemetry):
    """A private registry (not the process-global one): several servers in one
    test process, and no default process/GC collectors nobody asked for."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(server, telemetry))
    return reg
