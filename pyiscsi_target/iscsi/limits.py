"""Admission limits that keep one client from hurting the others — sans-IO.

* connections at once: in total, and per source (an IPv4 address, or an IPv6
  /64: one host can hold a whole /64);
* refused logins from a source slow that source's next logins down: the
  n-th failure within :attr:`window` seconds delays its next connection by
  ``base * 2**(n-1)`` seconds, at most :data:`MAX_DELAY`.  A successful login
  clears the record.  The table of sources is bounded (oldest forgotten).

Time is passed in; the server calls :meth:`admit` on accept, :meth:`release`
on close, :meth:`login_failed` / :meth:`login_succeeded` after a login.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from .acl import peer_ip

MAX_DELAY = 30.0
COUNTED_FAILURES = frozenset({0x0201, 0x0202, 0x0203})  # authentication, authorization, not found


def source_key(host: str) -> str:
    ip = peer_ip(host)
    if ip is None:
        return host
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class ConnectionLimiter:
    def __init__(self, max_total: int = 1024, max_per_source: int = 64, failure_delay: float = 1.0,
                 *, window: float = 300.0, max_tracked: int = 4096):
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.failure_delay = failure_delay
        self.window = window
        self.max_tracked = max_tracked
        self.total = 0
        self.by_source: dict[str, int] = {}
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()   # key → (count, last)
        self._logged: OrderedDict[str, float] = OrderedDict()
        self.refused = 0

    def admit(self, host: str) -> str | None:
        """Count a new connection; returns None, or why it must be refused."""
        key = source_key(host)
        if self.total >= self.max_total:
            self.refused += 1
            return f"{self.total} connections open (server.max_connections_total)"
        n = self.by_source.get(key, 0)
        if n >= self.max_per_source:
            self.refused += 1
            return f"{n} connections open from {key} (server.max_connections_per_address)"
        self.total += 1
        self.by_source[key] = n + 1
        return None

    def release(self, host: str) -> None:
        key = source_key(host)
        n = self.by_source.get(key, 0)
        if n <= 1:
            self.by_source.pop(key, None)
        else:
            self.by_source[key] = n - 1
        self.total = max(0, self.total - 1)

    def delay(self, host: str, now: float) -> float:
        """Seconds to wait before reading this new connection's login."""
        if self.failure_delay <= 0:
            return 0.0
        rec = self._failures.get(source_key(host))
        if rec is None:
            return 0.0
        count, last = rec
        if now - last > self.window:
            del self._failures[source_key(host)]
            return 0.0
        return min(MAX_DELAY, self.failure_delay * 2 ** min(count - 1, 16))

    def login_failed(self, host: str, status: int, now: float) -> None:
        if status not in COUNTED_FAILURES:
            return
        key = source_key(host)
        count, last = self._failures.pop(key, (0, now))
        if now - last > self.window:
            count = 0
        self._failures[key] = (count + 1, now)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def login_succeeded(self, host: str) -> None:
        self._failures.pop(source_key(host), None)

    def should_log(self, host: str, now: float, every: float = 10.0) -> bool:
        """Rate-limit repeated log lines about one source (a flood must not flood the log)."""
        key = source_key(host)
        last = self._logged.get(key)
        if last is not None and now - last < every:
            return False
        self._logged.pop(key, None)
        self._logged[key] = now
        while len(self._logged) > self.max_tracked:
            self._logged.popitem(last=False)
        return True
