"""The TOML configuration: parsed with stdlib ``tomllib``, validated into frozen
dataclasses.  Every error names the file, the line and the key::

    config.toml:12: target[0].lun[1].size: "15GB" is not a size; use e.g. 15GiB

All problems found are reported at once (one per line); unknown keys are errors
too, with a "did you mean" hint.  Relative paths (``state_dir``, LUN ``path``)
are relative to the directory holding the config file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "CACHE_MODES",
    "CacheConfig",
    "Config",
    "ConfigError",
    "ChapConfig",
    "IscsiConfig",
    "LunConfig",
    "ServerConfig",
    "TargetConfig",
    "DEFAULT_PORT",
    "GATEWAY_STATES",
    "GatewayConfig",
    "PeerGatewayConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "format_size",
    "validate_iscsi_name",
]

DEFAULT_PORT = 3260
MAX_LUN_ID = 16383  # flat/peripheral addressing limit (SAM-5 §4.7)


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is ready to print (file:line: key: problem)."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


# ---------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", DEFAULT_PORT),)
    state_dir: Path = Path("state")
    nop_interval: float = 10.0  # seconds; 0 disables target NOP-In pings
    nop_timeout: float = 30.0
    login_timeout: float = 15.0
    max_sessions: int = 64
    max_connections_total: int = 1024       # TCP connections at once, all sources
    max_connections_per_address: int = 64   # TCP connections at once from one source address
    login_failure_delay: float = 1.0        # first slow-down after a refused login; doubles, max 30 s


@dataclass(frozen=True, slots=True)
class IscsiConfig:
    """What the target offers during login (RFC 7143 §13); sizes in bytes."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 1
    header_digest: tuple[str, ...] = ("None", "CRC32C")  # preference order
    data_digest: tuple[str, ...] = ("None", "CRC32C")
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_connections: int = 1


CACHE_MODES = ("write-back", "write-through", "none")
MIN_CACHE_SIZE = 16 << 20  # two write-out batches and room to go on (storage/cache.py)
MIN_JOURNAL_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """``[cache]``: the memory shared by every cached LUN, and the defaults
    of the per-LUN cache keys."""

    size: int = 256 << 20  # bytes, shared by all LUNs (data + bookkeeping)
    mode: str = "none"  # for LUNs that do not set ``cache``
    max_dirty_age: float = 5.0  # seconds
    dirty_limit: int | None = None  # bytes per LUN; None = half of size


@dataclass(frozen=True, slots=True)
class LunConfig:
    id: int
    path: Path  # absolute
    size: int | None = None  # bytes; None = take the existing image's size
    block_size: int = 512
    preallocate: bool = False
    read_only: bool = False
    serial: str | None = None
    rotation_rate: int = 0  # 0 not reported, 1 non-rotating (SSD), else rpm
    initiators: tuple[str, ...] = ()  # LUN masking: only these initiators (names/globs) see it; () = all
    cache: str = "none"  # write-back | write-through | none (a journal implies write-back)
    max_dirty_age: float = 5.0
    dirty_limit: int | None = None  # None = half of [cache] size
    journal: Path | None = None  # absolute
    journal_size: int = 256 << 20

    @property
    def is_block_device(self) -> bool:
        return _is_device_path(self.path)

    @property
    def is_rbd(self) -> bool:
        """``path = "rbd:pool/image"``: a Ceph RBD image (path is not a file)."""
        return str(self.path).startswith(RBD_PREFIX)


RBD_PREFIX = "rbd:"


@dataclass(frozen=True, slots=True)
class CephConfig:
    """``[ceph]``: how RBD LUNs reach the cluster (one connection per process)."""

    conf: Path = Path("/etc/ceph/ceph.conf")  # absolute
    client: str = "admin"  # the client id: the cephx entity is client.<id>
    keyring: Path | None = None  # None = what ceph.conf says (default /etc/ceph/ceph.client.<id>.keyring)
    # Seconds a RADOS operation may take before the command fails (0 = wait
    # forever): with the OSDs unreachable an initiator then gets an error and
    # moves to another path, instead of a command that never ends.
    op_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ChapConfig:
    """CHAP credentials; the secrets never show in a repr (nor in logs)."""

    user: str
    secret: str = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)
    algorithms: tuple[str, ...] = ("SHA-256", "MD5")


@dataclass(frozen=True, slots=True)
class TargetConfig:
    iqn: str
    alias: str | None = None
    luns: tuple[LunConfig, ...] = ()
    chap: ChapConfig | None = None  # None = no authentication (AuthMethod=None)
    allow_initiators: tuple[str, ...] = ()  # names or globs; () = any
    allow_networks: tuple[str, ...] = ()  # CIDR; () = any


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the local endpoint ``status`` and ``reload`` talk to.

    A Unix socket (mode 0600: only the server's user and root may use it) on
    POSIX; localhost TCP plus a token file readable by the server's user on
    Windows, which has no Unix sockets for Python's asyncio.  Never remote:
    ``reload`` changes what is exported, so it needs the OS's own access checks.
    """

    enabled: bool = True
    transport: str = "unix"  # "unix" or "tcp" (the default on Windows)
    socket: Path | None = None  # absolute; None = <state_dir>/admin.sock
    listen: tuple[str, int] = ("127.0.0.1", 3262)  # transport "tcp" only; loopback addresses only


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: HTTP for Prometheus (``/metrics``) and the read-only
    dashboard (``/``, ``/status.json``).  None = not served."""

    listen: tuple[str, int] | None = None


#: ALUA asymmetric access states a gateway may be in (SPC-4 §5.16.2.4).
GATEWAY_STATES = ("active/optimized", "active/non-optimized", "standby")


@dataclass(frozen=True, slots=True)
class PeerGatewayConfig:
    """``[[gateway.peer]]``: another gateway exporting the same targets."""

    name: str
    port_group: int
    state: str = "active/optimized"
    portals: tuple[tuple[str, int], ...] = ()  # advertised by SendTargets with TPGT = port_group


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """``[gateway]``: this process as one of several gateways exporting the
    same LUs (issue 10).  ``port_group`` is at once its ALUA target port
    group id, the TPGT of all its portals and its relative target port id.
    The default is a single box: group 1, active/optimized, no peers."""

    name: str = ""  # "" = the host name (filled in by parse_config)
    port_group: int = 1
    state: str = "active/optimized"
    peers: tuple[PeerGatewayConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    iscsi: IscsiConfig
    targets: tuple[TargetConfig, ...]
    source: Path  # absolute path of the file this came from
    discovery_chap: ChapConfig | None = None  # [discovery.chap]: CHAP for SendTargets sessions
    warnings: tuple[str, ...] = ()  # problems worth a log line that do not stop the server
    cache: CacheConfig = CacheConfig()  # [cache]
    admin: AdminConfig = AdminConfig()  # [admin]
    metrics: MetricsConfig = MetricsConfig()  # [metrics]
    ceph: CephConfig = CephConfig()  # [ceph]
    gateway: GatewayConfig = GatewayConfig()  # [gateway]

    def target(self, iqn: str) -> TargetConfig | None:
        for t in self.targets:
            if t.iqn == iqn:
                return t
        return None


# ---------------------------------------------------------------------------
# Value parsers (usable on their own)
# ---------------------------------------------------------------------------

_BINARY_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
_DECIMAL_UNITS = {"k", "kb", "m", "mb", "g", "gb", "t", "tb", "p", "pb"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int) -> int:
    """``"512MiB"``/``"1GiB"``/``"4KiB"``/``"1TiB"``/``"4096"``/4096 -> bytes.

    Decimal and ambiguous units (``GB``, ``G``) are refused with a hint: an
    admin who writes 15GB may mean 15*10^9 or 15*2^30, and a disk size that is
    off by 7% is a bad surprise.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; use e.g. 1GiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a size: negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size; use e.g. 1GiB or a number of bytes")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f'"{value}" is not a size; use e.g. 1GiB, 512MiB or a number of bytes')
    num, unit = m.group(1), m.group(2).lower()
    if unit in _DECIMAL_UNITS:
        hint = f"{num}{unit[0].upper() if unit[0] != 'k' else 'K'}iB"
        raise ValueError(f'"{value}" is not a size; use e.g. {hint}')
    if unit not in _BINARY_UNITS:
        raise ValueError(f'"{value}" is not a size: unknown unit "{m.group(2)}"; use B, KiB, MiB, GiB or TiB')
    mult = _BINARY_UNITS[unit]
    if "." in num:
        whole, frac = num.split(".")
        n = int(whole) * mult + int(frac) * mult // 10 ** len(frac)
        if int(frac) * mult % 10 ** len(frac):
            raise ValueError(f'"{value}" is not a whole number of bytes')
        return n
    return int(num) * mult


def format_size(n: int) -> str:
    """Bytes -> the largest exact binary unit (``1073741824`` -> ``1GiB``)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: str | int | float) -> float:
    """``"10s"``/``"500ms"``/``"2m"``/``"1h"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; use e.g. 10s, 500ms, 2m")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value} is not a duration: must be >= 0 seconds")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration; use e.g. 10s, 500ms, 2m")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f'"{value}" is not a duration; use e.g. 10s, 500ms, 2m or a number of seconds')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_IQN_RE = re.compile(r"^iqn\.(\d{4})-(\d{2})\.([a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)(?::(.+))?$")
_IQN_TAIL_RE = re.compile(r"^[a-z0-9\-.:]+$")
_EUI_RE = re.compile(r"^eui\.[0-9A-Fa-f]{16}$")
_NAA_RE = re.compile(r"^naa\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})$")


def validate_iscsi_name(name: str) -> None:
    """Check an iSCSI name (RFC 3720 §3.2.6, RFC 3980); raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError("an iSCSI name must be a non-empty string, e.g. iqn.2026-11.org.example:disk1")
    if len(name.encode()) > 223:
        raise ValueError(f'"{name}" is longer than 223 bytes (RFC 3720 §3.2.6)')
    low = name.lower()
    if low.startswith("iqn."):
        if name != low:
            raise ValueError(f'"{name}" must be lower case: {low}')
        m = _IQN_RE.match(name)
        if not m:
            raise ValueError(
                f'"{name}" is not a valid iqn name; the form is iqn.YYYY-MM.reversed.domain[:unique-name], '
                "e.g. iqn.2026-11.org.example:quorum"
            )
        month = int(m.group(2))
        if not 1 <= month <= 12:
            raise ValueError(f'"{name}": month {m.group(2)} in the date is not 01..12')
        if m.group(4) is not None and not _IQN_TAIL_RE.match(m.group(4)):
            raise ValueError(f'"{name}": after ":" use only a-z, 0-9, "-", "." and ":"')
        return
    if low.startswith("eui."):
        if not name.startswith("eui.") or not _EUI_RE.match(name):
            raise ValueError(f'"{name}" is not a valid eui name: eui. followed by 16 hex digits')
        return
    if low.startswith("naa."):
        if not name.startswith("naa.") or not _NAA_RE.match(name):
            raise ValueError(f'"{name}" is not a valid naa name: naa. followed by 16 or 32 hex digits')
        return
    raise ValueError(f'"{name}" is not an iSCSI name: it must start with iqn., eui. or naa.')


def parse_portal(value: str) -> tuple[str, int]:
    """``"0.0.0.0:3260"``, ``"[::]:3260"``, ``"host"`` -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'{value!r} is not a portal; use "host:port", e.g. "0.0.0.0:3260" or "[::]:3260"')
    v = value.strip()
    port = DEFAULT_PORT
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError(f'"{value}": missing "]" after the IPv6 address')
        host, rest = v[1:end], v[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ValueError(f'"{value}": "{host}" is not an IPv6 address') from None
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f'"{value}": expected ":port" after "]"')
            port = _port(value, rest[1:])
        return host, port
    if v.count(":") > 1:
        raise ValueError(f'"{value}": write IPv6 addresses in brackets, e.g. "[::]:3260"')
    if ":" in v:
        host, p = v.split(":")
        port = _port(value, p)
    else:
        host = v
    if not host:
        raise ValueError(f'"{value}": missing host; use 0.0.0.0 for every IPv4 address')
    if re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f'"{value}": "{host}" is not an IPv4 address') from None
    elif not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        raise ValueError(f'"{value}": "{host}" is not a host name or address')
    return host, port


def _port(value: str, p: str) -> int:
    if not p.isdigit() or not 1 <= int(p) <= 65535:
        raise ValueError(f'"{value}": port "{p}" is not a number 1..65535')
    return int(p)


# ---------------------------------------------------------------------------
# Locating keys in the TOML text (tomllib keeps no positions)
# ---------------------------------------------------------------------------

_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf'(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_AOT_RE = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_RE = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEYLINE_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_KEY_PART)


def _split_dotted(s: str) -> list[str]:
    out = []
    for part in _PART_RE.findall(s):
        if part[:1] in "\"'":
            part = part[1:-1]
        out.append(part)
    return out


class KeyLocator:
    """Map key paths like ``target[0].lun[1].size`` to 1-based line numbers.

    Scans the text for ``[table]``, ``[[array.of.tables]]`` headers (counting
    occurrences per parent instance, as TOML does) and ``key =`` lines;
    multi-line strings are skipped.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        aot_count: dict[str, int] = {}
        table = ""
        in_ml: str | None = None  # inside a multi-line string: its delimiter

        def resolve(parts: list[str]) -> str:
            cur = ""
            for name in parts:
                p = f"{cur}.{name}" if cur else name
                if p in aot_count:
                    p = f"{p}[{aot_count[p] - 1}]"
                cur = p
            return cur

        for lineno, line in enumerate(text.splitlines(), 1):
            if in_ml:
                if line.count(in_ml) % 2 == 1:
                    in_ml = None
                continue
            if m := _AOT_RE.match(line):
                parts = _split_dotted(m.group(1))
                parent = resolve(parts[:-1])
                full = f"{parent}.{parts[-1]}" if parent else parts[-1]
                aot_count[full] = aot_count.get(full, 0) + 1
                table = f"{full}[{aot_count[full] - 1}]"
                self.lines.setdefault(table, lineno)
                self.lines.setdefault(full, lineno)
            elif m := _TABLE_RE.match(line):
                table = resolve(_split_dotted(m.group(1)))
                self.lines.setdefault(table, lineno)
            elif m := _KEYLINE_RE.match(line):
                parts = _split_dotted(m.group(1))
                path = table
                for name in parts:
                    path = f"{path}.{name}" if path else name
                    self.lines.setdefault(path, lineno)
                rest = line[m.end() :]
                for delim in ('"""', "'''"):
                    if rest.count(delim) % 2 == 1:
                        in_ml = delim
                        break

    def line_of(self, path: str) -> int | None:
        """Line of ``path`` or of its nearest enclosing key/table found."""
        while path:
            if path in self.lines:
                return self.lines[path]
            # drop the last component: ".name" or "[i]"
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                break
            path = path[:cut]
        return self.lines.get(path)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_MISSING = object()


class _Validator:
    def __init__(self, source: str, locator: KeyLocator, base_dir: Path) -> None:
        self.source = source
        self.loc = locator
        self.base_dir = base_dir
        self.errors: list[tuple[int, str]] = []
        self.cache = CacheConfig()
        self.warnings: list[str] = []
        self.has_inline_secret = False
        self.discovery_chap: ChapConfig | None = None
        self.rbd_luns: list[str] = []  # key paths of the RBD LUNs ([ceph] is needed then)

    def warn(self, path: str, msg: str) -> None:
        line = self.loc.line_of(path)
        where = f"{self.source}:{line}" if line else self.source
        self.warnings.append(f"{where}: {path}: {msg}")

    def error(self, path: str, msg: str) -> None:
        line = self.loc.line_of(path)
        where = f"{self.source}:{line}" if line else self.source
        self.errors.append((line or 0, f"{where}: {path}: {msg}" if path else f"{where}: {msg}"))

    def check_keys(self, table: dict, path: str, allowed: tuple[str, ...]) -> None:
        for k in table:
            if k not in allowed:
                kp = f"{path}.{k}" if path else k
                close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                hint = f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(allowed)}"
                self.error(kp, f'unknown key "{k}"{hint}')

    def table(self, parent: dict, key: str, path: str) -> dict:
        v = parent.get(key, _MISSING)
        if v is _MISSING:
            return {}
        if not isinstance(v, dict):
            self.error(path, f"must be a table ([{path}]), not {_tname(v)}")
            return {}
        return v

    def get(self, tbl: dict, key: str, path: str, conv: Callable[[Any], Any], default: Any, *, required: bool = False):
        kp = f"{path}.{key}" if path else key
        v = tbl.get(key, _MISSING)
        if v is _MISSING:
            if required:
                self.error(path, f'missing required key "{key}"')
            return default
        try:
            return conv(v)
        except ValueError as e:
            self.error(kp, str(e))
            return default


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "a table"}.get(
        type(v), type(v).__name__
    )


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{v!r} must be true or false")
    return v


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r} must be an integer {lo}..{hi}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range {lo}..{hi}")
        return v

    return conv


def _size_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ValueError(f"{_show(v)} is out of range: {lo}..{hi} bytes")
        return n

    return conv


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _duration(v: Any) -> float:
    return parse_duration(v)


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} must be a string")
    return v


def _digests(v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError(f'{v!r} must be a list like ["None", "CRC32C"]')
    out = []
    for it in items:
        norm = {"none": "None", "crc32c": "CRC32C"}.get(it.lower()) if isinstance(it, str) else None
        if norm is None:
            raise ValueError(f'{_show(it)} is not a digest; use "None" or "CRC32C"')
        if norm in out:
            raise ValueError(f'"{norm}" is listed twice')
        out.append(norm)
    return tuple(out)


_SERIAL_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")


def _serial(v: Any) -> str:
    if not isinstance(v, str) or not _SERIAL_RE.match(v):
        raise ValueError(f"{_show(v)} is not a serial: use 1..32 of A-Z a-z 0-9 . _ -")
    return v


def _rotation_rate(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (v in (0, 1) or 0x401 <= v <= 0xFFFE):
        raise ValueError(f"{v!r} is not a rotation rate: use 0 (not reported), 1 (SSD) or rpm 1025..65534, e.g. 7200")
    return v


_TOP_KEYS = ("server", "iscsi", "target", "discovery", "cache", "admin", "metrics", "ceph", "gateway")
_CACHE_KEYS = ("size", "mode", "max_dirty_age", "dirty_limit")
_SERVER_KEYS = ("listen", "state_dir", "nop_interval", "nop_timeout", "login_timeout", "max_sessions",
                "max_connections_total", "max_connections_per_address", "login_failure_delay")
_ISCSI_KEYS = (
    "max_recv_data_segment_length",
    "max_burst_length",
    "first_burst_length",
    "immediate_data",
    "initial_r2t",
    "max_outstanding_r2t",
    "header_digest",
    "data_digest",
    "default_time2wait",
    "default_time2retain",
    "max_connections",
)
_TARGET_KEYS = ("iqn", "alias", "lun", "chap", "allow_initiators", "allow_networks")
_LUN_KEYS = ("id", "path", "size", "block_size", "preallocate", "read_only", "serial", "rotation_rate", "initiators")
_LUN_CACHE_KEYS = ("cache", "max_dirty_age", "dirty_limit", "journal", "journal_size")
_SEG_MAX = (1 << 24) - 1  # RFC 7143 §13: 512 .. 2**24-1


def _cache_mode(v: Any) -> str:
    if v not in CACHE_MODES:
        close = difflib.get_close_matches(str(v), CACHE_MODES, n=1, cutoff=0.5)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise ValueError(f'{_show(v)} is not a cache mode: use "write-back", "write-through" or "none"{hint}')
    return v


def _validate_cache(data: dict, v: _Validator) -> CacheConfig:
    c = v.table(data, "cache", "cache")
    v.check_keys(c, "cache", _CACHE_KEYS)
    d = CacheConfig()
    size = v.get(c, "size", "cache", parse_size, d.size)
    if "size" in c and size < MIN_CACHE_SIZE:
        v.error("cache.size", f"{_show(c['size'])} is too small: at least {format_size(MIN_CACHE_SIZE)}")
        size = d.size
    dirty_limit = v.get(c, "dirty_limit", "cache", parse_size, None)
    if dirty_limit is not None and not 1 << 20 <= dirty_limit <= size:
        v.error("cache.dirty_limit", f"{_show(c['dirty_limit'])} must be 1MiB .. the cache size ({format_size(size)})")
        dirty_limit = None
    return CacheConfig(
        size=size,
        mode=v.get(c, "mode", "cache", _cache_mode, d.mode),
        max_dirty_age=v.get(c, "max_dirty_age", "cache", _duration, d.max_dirty_age),
        dirty_limit=dirty_limit,
    )


def _validate_lun_cache(ll: dict, lp: str, v: _Validator, read_only: bool) -> dict[str, Any]:
    """Per-LUN cache keys, defaults from [cache]; a dict of LunConfig fields."""
    cc: CacheConfig = v.cache
    journal = v.get(ll, "journal", lp, _path_str, None)
    cache = v.get(ll, "cache", lp, _cache_mode, None)
    if journal is not None:
        if cache is not None and cache != "write-back":
            v.error(
                f"{lp}.cache",
                f'"{cache}" cannot have a journal: the journal works with cache = "write-back" '
                "(and then reports WCE=0: every write is durable); remove one of the two",
            )
        cache = "write-back"
    elif cache is None:
        cache = cc.mode
    max_dirty_age = v.get(ll, "max_dirty_age", lp, _duration, cc.max_dirty_age)
    dirty_limit = v.get(ll, "dirty_limit", lp, parse_size, cc.dirty_limit)
    if "dirty_limit" in ll and dirty_limit is not None and not 1 << 20 <= dirty_limit <= cc.size:
        v.error(f"{lp}.dirty_limit", f"{_show(ll['dirty_limit'])} must be 1MiB .. [cache] size ({format_size(cc.size)})")
    journal_size = v.get(ll, "journal_size", lp, parse_size, 256 << 20)
    if "journal_size" in ll and journal_size < MIN_JOURNAL_SIZE:
        v.error(f"{lp}.journal_size", f"{_show(ll['journal_size'])} is too small: at least {format_size(MIN_JOURNAL_SIZE)}")
    if "journal_size" in ll and journal is None:
        v.error(f"{lp}.journal_size", 'only means something with a journal: add journal = "/fast/disk/lun.journal"')
    for key in ("max_dirty_age", "dirty_limit"):
        if key in ll and cache != "write-back":
            v.error(f"{lp}.{key}", f'only applies to cache = "write-back" (this LUN is "{cache}")')
    if read_only:
        if journal is not None or "cache" in ll and cache != "none":
            v.error(f"{lp}.cache" if "cache" in ll else f"{lp}.journal", "a read-only LUN has nothing to write back; remove it")
        cache, journal = "none", None
    return {
        "cache": cache,
        "max_dirty_age": max_dirty_age,
        "dirty_limit": dirty_limit,
        "journal": _resolve(v.base_dir, journal) if journal is not None else None,
        "journal_size": journal_size,
    }


def _validate(data: dict, v: _Validator) -> tuple[ServerConfig, IscsiConfig, tuple[TargetConfig, ...]]:
    v.check_keys(data, "", _TOP_KEYS)

    # [server]
    s = v.table(data, "server", "server")
    v.check_keys(s, "server", _SERVER_KEYS)
    d = ServerConfig()
    listen = d.listen
    raw_listen = s.get("listen", _MISSING)
    if raw_listen is not _MISSING:
        items = [raw_listen] if isinstance(raw_listen, str) else raw_listen
        if not isinstance(items, list) or not items:
            v.error("server.listen", f'{raw_listen!r} must be a list of "host:port" strings, e.g. ["0.0.0.0:3260"]')
        else:
            got: list[tuple[str, int]] = []
            for i, it in enumerate(items):
                try:
                    hp = parse_portal(it)
                except ValueError as e:
                    v.error(f"server.listen[{i}]", str(e))
                    continue
                if hp in got:
                    v.error(f"server.listen[{i}]", f'"{it}" is listed twice')
                got.append(hp)
            listen = tuple(got)
    state_dir = v.get(s, "state_dir", "server", _string, str(d.state_dir))
    nop_interval = v.get(s, "nop_interval", "server", _duration, d.nop_interval)
    nop_timeout = v.get(s, "nop_timeout", "server", _duration, d.nop_timeout)
    if "nop_timeout" in s and nop_timeout == 0:
        v.error("server.nop_timeout", "must be more than 0")
    login_timeout = v.get(s, "login_timeout", "server", _duration, d.login_timeout)
    if "login_timeout" in s and login_timeout == 0:
        v.error("server.login_timeout", "must be more than 0")
    max_sessions = v.get(s, "max_sessions", "server", _int_range(1, 65535), d.max_sessions)
    limits = _server_limits(s, v, d)
    server = ServerConfig(
        listen=listen,
        state_dir=_resolve(v.base_dir, state_dir),
        nop_interval=nop_interval,
        nop_timeout=nop_timeout,
        login_timeout=login_timeout,
        max_sessions=max_sessions,
        **limits,
    )

    # [iscsi]
    t = v.table(data, "iscsi", "iscsi")
    v.check_keys(t, "iscsi", _ISCSI_KEYS)
    di = IscsiConfig()
    seg = _size_range(512, _SEG_MAX)
    mbl = v.get(t, "max_burst_length", "iscsi", seg, di.max_burst_length)
    iscsi = IscsiConfig(
        max_recv_data_segment_length=v.get(t, "max_recv_data_segment_length", "iscsi", seg, di.max_recv_data_segment_length),
        max_burst_length=mbl,
        # Unset, FirstBurstLength follows a smaller MaxBurstLength down.
        first_burst_length=v.get(t, "first_burst_length", "iscsi", seg, min(di.first_burst_length, mbl)),
        immediate_data=v.get(t, "immediate_data", "iscsi", _bool, di.immediate_data),
        initial_r2t=v.get(t, "initial_r2t", "iscsi", _bool, di.initial_r2t),
        max_outstanding_r2t=v.get(t, "max_outstanding_r2t", "iscsi", _int_range(1, 65535), di.max_outstanding_r2t),
        header_digest=v.get(t, "header_digest", "iscsi", _digests, di.header_digest),
        data_digest=v.get(t, "data_digest", "iscsi", _digests, di.data_digest),
        default_time2wait=v.get(t, "default_time2wait", "iscsi", _int_range(0, 3600), di.default_time2wait),
        default_time2retain=v.get(t, "default_time2retain", "iscsi", _int_range(0, 3600), di.default_time2retain),
        max_connections=v.get(t, "max_connections", "iscsi", _int_range(1, 65535), di.max_connections),
    )
    if iscsi.first_burst_length > iscsi.max_burst_length:
        v.error(
            "iscsi.first_burst_length" if "first_burst_length" in t else "iscsi.max_burst_length",
            f"first_burst_length ({format_size(iscsi.first_burst_length)}) must not exceed "
            f"max_burst_length ({format_size(iscsi.max_burst_length)})",
        )

    v.cache = _validate_cache(data, v)

    # [[target]]
    raw_targets = data.get("target", _MISSING)
    targets: list[TargetConfig] = []
    if raw_targets is _MISSING:
        v.error("", "no target defined; add a [[target]] with an iqn and at least one [[target.lun]]")
        raw_targets = []
    elif isinstance(raw_targets, dict):
        v.error("target", "write [[target]] (an array of tables, one per target), not [target]")
        raw_targets = []
    iqns: dict[str, str] = {}
    paths: dict[Path, str] = {}
    serials: dict[str, str] = {}
    for ti, tt in enumerate(raw_targets):
        tp = f"target[{ti}]"
        if not isinstance(tt, dict):
            v.error(tp, "must be a table ([[target]])")
            continue
        v.check_keys(tt, tp, _TARGET_KEYS)
        iqn = v.get(tt, "iqn", tp, _iqn, None, required=True)
        if iqn is not None:
            if iqn.lower() in iqns:
                v.error(f"{tp}.iqn", f'"{iqn}" is already used by {iqns[iqn.lower()]}')
            else:
                iqns[iqn.lower()] = tp
        alias = v.get(tt, "alias", tp, _alias, None)
        raw_luns = tt.get("lun", _MISSING)
        luns: list[LunConfig] = []
        if raw_luns is _MISSING:
            v.error(tp, "has no LUN; add a [[target.lun]] with id, path and size")
            raw_luns = []
        elif isinstance(raw_luns, dict):
            v.error(f"{tp}.lun", "write [[target.lun]] (an array of tables, one per LUN), not [target.lun]")
            raw_luns = []
        ids: dict[int, str] = {}
        for li, ll in enumerate(raw_luns):
            lp = f"{tp}.lun[{li}]"
            if not isinstance(ll, dict):
                v.error(lp, "must be a table ([[target.lun]])")
                continue
            lun = _validate_lun(ll, lp, v)
            if lun is None:
                continue
            if lun.id in ids:
                v.error(f"{lp}.id", f"LUN {lun.id} is already used by {ids[lun.id]}")
            ids.setdefault(lun.id, lp)
            key = Path(_norm(lun.path))
            if key in paths:
                v.error(f"{lp}.path", f'"{lun.path}" is already used by {paths[key]}')
            paths.setdefault(key, lp)
            if lun.journal is not None:
                jkey = Path(_norm(lun.journal))
                if jkey in paths:
                    v.error(f"{lp}.journal", f'"{lun.journal}" is already used by {paths[jkey]}')
                paths.setdefault(jkey, f"{lp}.journal")
            if lun.serial is not None:
                if lun.serial in serials:
                    v.error(f"{lp}.serial", f'"{lun.serial}" is already used by {serials[lun.serial]}')
                serials.setdefault(lun.serial, lp)
            luns.append(lun)
        if iqn is not None:
            targets.append(TargetConfig(iqn=iqn, alias=alias, luns=tuple(sorted(luns, key=lambda x: x.id)),
                                        **_target_access(tt, tp, v)))
    return server, iscsi, tuple(targets)


def _iqn(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} must be a string like iqn.2026-11.org.example:disk1")
    validate_iscsi_name(v)
    return v


def _alias(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} must be a string")
    if len(v.encode()) > 255 or any(ord(c) < 0x20 or c == "\x7f" for c in v):
        raise ValueError(f"{_show(v)}: an alias is at most 255 bytes without control characters")
    return v


def _norm(p: Path) -> str:
    try:
        return str(p.resolve(strict=False))
    except OSError:  # pragma: no cover
        return str(p)


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    # normpath, not resolve(): "../luns" should read as such, symlinks stay as configured.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _validate_lun(ll: dict, lp: str, v: _Validator) -> LunConfig | None:
    v.check_keys(ll, lp, _LUN_KEYS + _LUN_CACHE_KEYS)
    if isinstance(ll.get("path"), str) and ll["path"].startswith(RBD_PREFIX):
        return _validate_rbd_lun(ll, lp, v)
    n_err = len(v.errors)
    lun_id = v.get(ll, "id", lp, _int_range(0, MAX_LUN_ID), None, required=True)
    path = v.get(ll, "path", lp, _path_str, None, required=True)
    block_size = v.get(ll, "block_size", lp, _block_size, 512)
    size = v.get(ll, "size", lp, parse_size, None)
    if size is not None and "size" in ll:
        if size == 0:
            v.error(f"{lp}.size", "must be more than 0")
        elif size % block_size:
            v.error(
                f"{lp}.size",
                f"{_show(ll['size'])} ({size} bytes) is not a multiple of the block size {block_size}",
            )
    preallocate = v.get(ll, "preallocate", lp, _bool, False)
    read_only = v.get(ll, "read_only", lp, _bool, False)
    serial = v.get(ll, "serial", lp, _serial, None)
    rotation_rate = v.get(ll, "rotation_rate", lp, _rotation_rate, 0)
    initiators = v.get(ll, "initiators", lp, _name_patterns, ())
    cache_fields = _validate_lun_cache(ll, lp, v, read_only)
    if len(v.errors) != n_err or lun_id is None or path is None:
        return None
    full = _resolve(v.base_dir, path)
    _check_image(v, lp, ll, full, size, block_size, read_only)
    if len(v.errors) != n_err:
        return None
    return LunConfig(
        id=lun_id,
        path=full,
        size=size,
        block_size=block_size,
        preallocate=preallocate,
        read_only=read_only,
        serial=serial,
        rotation_rate=rotation_rate,
        initiators=initiators,
        **cache_fields,
    )


def _validate_rbd_lun(ll: dict, lp: str, v: _Validator) -> LunConfig | None:
    """``path = "rbd:pool/image"``: a Ceph RBD image, possibly exported by
    several gateways at once.  Its size is the image's (``size`` only sizes a
    missing image); existence is checked when the LUN is opened (it needs the
    cluster)."""
    from .storage.rbd import parse_rbd_path

    n_err = len(v.errors)
    lun_id = v.get(ll, "id", lp, _int_range(0, MAX_LUN_ID), None, required=True)
    path = ll["path"]
    try:
        parse_rbd_path(path)
    except ValueError as e:
        v.error(f"{lp}.path", str(e))
    block_size = v.get(ll, "block_size", lp, _block_size, 512)
    size = v.get(ll, "size", lp, parse_size, None)
    if size is not None and (size == 0 or size % block_size):
        v.error(f"{lp}.size", f"{_show(ll['size'])} must be a positive multiple of the block size {block_size}")
    if "preallocate" in ll:
        v.error(f"{lp}.preallocate", "RBD images are thin (Ceph allocates on write); remove it")
    # No cache in front of a shared image: another gateway writing the same
    # image would not invalidate this one's cached pages, so initiators on
    # different gateways would read stale data (write-through too), and
    # write-back would acknowledge writes the other gateways cannot see.
    cache = ll.get("cache", "none")
    if cache != "none":
        v.error(f"{lp}.cache", f'{_show(cache)} is not possible on an RBD LUN: several gateways may write the '
                "image, and a cache on one would serve stale data to its initiators; use \"none\" (the default "
                "for RBD LUNs) - writes are acknowledged once on the OSDs")
    for key in ("journal", "journal_size", "max_dirty_age", "dirty_limit"):
        if key in ll:
            v.error(f"{lp}.{key}", "RBD LUNs have no cache or journal; remove it")
    read_only = v.get(ll, "read_only", lp, _bool, False)
    serial = v.get(ll, "serial", lp, _serial, None)
    rotation_rate = v.get(ll, "rotation_rate", lp, _rotation_rate, 0)
    initiators = v.get(ll, "initiators", lp, _name_patterns, ())
    if len(v.errors) != n_err or lun_id is None:
        return None
    v.rbd_luns.append(lp)
    return LunConfig(id=lun_id, path=Path(path), size=size, block_size=block_size, read_only=read_only,
                     serial=serial, rotation_rate=rotation_rate, initiators=initiators, cache="none")


_CEPH_KEYS = ("conf", "client", "keyring", "op_timeout")


def _ceph_client(x: Any) -> str:
    if not isinstance(x, str) or not x.strip() or any(c.isspace() for c in x):
        raise ValueError(f'{_show(x)} must be a cephx client id like "admin" or "iscsi"')
    return x[len("client."):] if x.startswith("client.") and len(x) > len("client.") else x


def _validate_ceph(data: dict, v: _Validator) -> CephConfig:
    """``[ceph]``; the files it names must exist when an RBD LUN uses them."""
    c = v.table(data, "ceph", "ceph")
    v.check_keys(c, "ceph", _CEPH_KEYS)
    d = CephConfig()
    conf = v.get(c, "conf", "ceph", _path_str, str(d.conf))
    keyring = v.get(c, "keyring", "ceph", _path_str, None)
    out = CephConfig(conf=_resolve(v.base_dir, conf), client=v.get(c, "client", "ceph", _ceph_client, d.client),
                     keyring=_resolve(v.base_dir, keyring) if keyring is not None else None,
                     op_timeout=v.get(c, "op_timeout", "ceph", _duration, d.op_timeout))
    if v.rbd_luns:
        where = "ceph.conf" if "conf" in c else f"{v.rbd_luns[0]}.path"
        if not out.conf.is_file():
            v.error(where, f'the Ceph config "{out.conf}" does not exist; set [ceph] conf = "/path/to/ceph.conf"')
        if out.keyring is not None and not out.keyring.is_file():
            v.error("ceph.keyring", f'"{out.keyring}" does not exist')
        from .storage.ceph_bindings import CephBindingsError, import_rados_rbd

        try:
            import_rados_rbd()
        except CephBindingsError as e:
            v.error(f"{v.rbd_luns[0]}.path", str(e))
    return out


def _is_device_path(path: Path) -> bool:
    """A path under /dev names a device and is never created as a file; /dev/shm
    is tmpfs, a normal place for image files (e.g. for benchmarks)."""
    p = str(path)
    return p.startswith("/dev/") and not p.startswith("/dev/shm/")


def _check_image(v: _Validator, lp: str, ll: dict, path: Path, size: int | None, block_size: int, read_only: bool) -> None:
    """What can be known before opening: the image's existence and size (the
    same rules FileBackend.open applies at start, reported with a line here)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if _is_device_path(path):
            v.error(f"{lp}.path", f'"{path}": no such block device')
        elif size is None:
            v.error(f"{lp}.path", f'"{path}" does not exist; add a size (e.g. size = "1GiB") to create it')
        elif read_only:
            v.error(f"{lp}.path", f'"{path}" does not exist and the LUN is read-only')
        return
    except OSError as e:
        v.error(f"{lp}.path", f'"{path}": {e.strerror}')
        return
    if stat.S_ISBLK(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        v.error(f"{lp}.path", f'"{path}" is neither an image file nor a block device')
    elif size is not None and st.st_size > size:
        v.error(
            f"{lp}.size",
            f"{_show(ll['size'])} is smaller than the existing image {path.name} ({format_size(st.st_size)}); "
            "images are never shrunk",
        )
    elif size is not None and st.st_size < size and read_only:
        v.error(f"{lp}.size", f"{_show(ll['size'])} is larger than the read-only image ({format_size(st.st_size)})")
    elif size is None and (st.st_size == 0 or st.st_size % block_size):
        v.error(f"{lp}.path", f'"{path}" holds {st.st_size} bytes, not a multiple of the block size {block_size}')


def _path_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{v!r} must be a non-empty path string")
    return v


def _block_size(v: Any) -> int:
    if isinstance(v, bool) or v not in (512, 4096):
        raise ValueError(f"{v!r} is not a block size: use 512 or 4096")
    return v


# ---------------------------------------------------------------------------
# Security: CHAP, access lists, connection limits
# ---------------------------------------------------------------------------

_CHAP_KEYS = ("user", "secret", "secret_file", "mutual_user", "mutual_secret", "mutual_secret_file", "algorithms")
_CHAP_ALGORITHMS = {"sha-256": "SHA-256", "sha256": "SHA-256", "md5": "MD5"}
_DISCOVERY_KEYS = ("chap",)
MAX_LOGIN_FAILURE_DELAY = 30.0


def _server_limits(s: dict, v: _Validator, d: ServerConfig) -> dict:
    out = {
        "max_connections_total": v.get(s, "max_connections_total", "server", _int_range(1, 1 << 20),
                                       d.max_connections_total),
        "max_connections_per_address": v.get(s, "max_connections_per_address", "server", _int_range(1, 1 << 20),
                                             d.max_connections_per_address),
        "login_failure_delay": v.get(s, "login_failure_delay", "server", _duration, d.login_failure_delay),
    }
    if out["login_failure_delay"] > MAX_LOGIN_FAILURE_DELAY:
        v.error("server.login_failure_delay", f"must be at most {MAX_LOGIN_FAILURE_DELAY:g}s")
    return out


def _name_patterns(v: Any) -> tuple[str, ...]:
    """Initiator names: exact iSCSI names or shell globs (``iqn.1991-05.com.microsoft:*``)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError(f'{v!r} must be a list of initiator names or patterns, e.g. ["iqn.1991-05.com.microsoft:*"]')
    out = []
    for it in items:
        if not isinstance(it, str) or not it.strip():
            raise ValueError(f"{it!r} is not an initiator name or pattern")
        if not any(c in it for c in "*?["):
            try:
                validate_iscsi_name(it.lower())
            except ValueError as e:
                raise ValueError(f"{e} (use * or ? for a pattern)") from None
        out.append(it)
    return tuple(out)


def _networks(v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError(f'{v!r} must be a list of networks, e.g. ["10.0.0.0/24", "fd00::/64"]')
    out = []
    for it in items:
        if not isinstance(it, str):
            raise ValueError(f"{it!r} is not a network")
        try:
            ipaddress.ip_network(it.strip(), strict=True)
        except ValueError as e:
            raise ValueError(f'"{it}" is not a network ({e}); use e.g. "10.0.0.0/24" or "fd00::/64"') from None
        out.append(it.strip())
    return tuple(out)


def _target_access(tt: dict, tp: str, v: _Validator) -> dict:
    return {
        "chap": _chap(v.table(tt, "chap", f"{tp}.chap"), f"{tp}.chap", v) if "chap" in tt else None,
        "allow_initiators": v.get(tt, "allow_initiators", tp, _name_patterns, ()),
        "allow_networks": v.get(tt, "allow_networks", tp, _networks, ()),
    }


def _validate_discovery(data: dict, v: _Validator) -> None:
    d = v.table(data, "discovery", "discovery")
    v.check_keys(d, "discovery", _DISCOVERY_KEYS)
    if "chap" in d:
        v.discovery_chap = _chap(v.table(d, "chap", "discovery.chap"), "discovery.chap", v)


def _chap_user(x: Any) -> str:
    if not isinstance(x, str) or not x or len(x.encode()) > 255 or any(ord(c) < 0x20 for c in x):
        raise ValueError("must be a CHAP name of 1..255 bytes without control characters")
    return x


def _secret(tbl: dict, key: str, path: str, v: _Validator, *, required: bool) -> str | None:
    """``key`` inline or ``key_file``; the value is never echoed in a message."""
    inline, file_key = tbl.get(key, _MISSING), f"{key}_file"
    from_file = tbl.get(file_key, _MISSING)
    if inline is not _MISSING and from_file is not _MISSING:
        v.error(f"{path}.{file_key}", f"set {key} or {file_key}, not both")
        return None
    if inline is _MISSING and from_file is _MISSING:
        if required:
            v.error(path, f'missing "{key}" (or "{file_key}")')
        return None
    if inline is not _MISSING:
        kp = f"{path}.{key}"
        if not isinstance(inline, str):
            v.error(kp, "must be a string")
            return None
        v.has_inline_secret = True
        secret = inline
    else:
        kp = f"{path}.{file_key}"
        if not isinstance(from_file, str) or not from_file.strip():
            v.error(kp, "must be a path to a file holding the secret")
            return None
        fp = _resolve(v.base_dir, from_file)
        try:
            st = os.stat(fp)
            raw = fp.read_bytes()
        except OSError as e:
            v.error(kp, f'cannot read "{fp}": {e.strerror or e}')
            return None
        if st.st_mode & 0o077:
            v.warn(kp, f'"{fp}" holds a secret and is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); '
                       f"chmod 600 it")
        try:
            secret = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            v.error(kp, f'"{fp}" is not UTF-8 text')
            return None
    n = len(secret.encode())
    if n == 0 or n > 255:
        v.error(kp, f"the secret must be 1..255 bytes long (it is {n})")
        return None
    if not 12 <= n <= 16:
        v.warn(kp, f"the secret is {n} bytes long; the Windows initiator accepts only 12..16")
    return secret


def _chap(tbl: dict, path: str, v: _Validator) -> ChapConfig | None:
    v.check_keys(tbl, path, _CHAP_KEYS)
    n_err = len(v.errors)
    user = v.get(tbl, "user", path, _chap_user, None, required=True)
    secret = _secret(tbl, "secret", path, v, required=True)
    mutual_user = v.get(tbl, "mutual_user", path, _chap_user, None)
    mutual_secret = _secret(tbl, "mutual_secret", path, v, required=mutual_user is not None)
    if mutual_secret is not None and mutual_user is None:
        v.error(path, 'mutual_secret needs a mutual_user (the name the target answers with)')
    if secret is not None and mutual_secret is not None and secret == mutual_secret:
        key = "mutual_secret" if "mutual_secret" in tbl else "mutual_secret_file"
        v.error(f"{path}.{key}", "the mutual secret must differ from the initiator's secret (RFC 7143 §12.1.3)")

    def algos(x: Any) -> tuple[str, ...]:
        items = [x] if isinstance(x, str) else x
        if not isinstance(items, list) or not items:
            raise ValueError('must be a list like ["SHA-256", "MD5"]')
        out = []
        for it in items:
            name = _CHAP_ALGORITHMS.get(it.lower()) if isinstance(it, str) else None
            if name is None:
                raise ValueError(f'{_show(it)} is not a CHAP algorithm; use "SHA-256" and/or "MD5"')
            if name not in out:
                out.append(name)
        return tuple(out)

    algorithms = v.get(tbl, "algorithms", path, algos, ("SHA-256", "MD5"))
    if len(v.errors) != n_err or user is None or secret is None:
        return None
    return ChapConfig(user=user, secret=secret, mutual_user=mutual_user, mutual_secret=mutual_secret,
                      algorithms=algorithms)


def _readable_warning(v: _Validator, source: str | Path) -> tuple[str, ...]:
    if not v.has_inline_secret:
        return ()
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return ()
    if mode & 0o044:
        return (f"{source}: holds CHAP secrets and is readable by group/others (mode {stat.S_IMODE(mode):o}); "
                "chmod 600 it, or move the secrets to secret_file",)
    return ()


# ---------------------------------------------------------------------------
# Operations: [admin] (status/reload endpoint), [metrics] (Prometheus, dashboard)
# ---------------------------------------------------------------------------

_ADMIN_KEYS = ("enabled", "transport", "socket", "listen")
_METRICS_KEYS = ("listen",)
# sun_path is 108 bytes on Linux, 104 on BSD/macOS (with the NUL)
_MAX_SOCKET_PATH = 103


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_operations(data: dict, v: _Validator, server: ServerConfig) -> tuple[AdminConfig, MetricsConfig]:
    a = v.table(data, "admin", "admin")
    v.check_keys(a, "admin", _ADMIN_KEYS)
    d = AdminConfig()

    def transport(x: Any) -> str:
        if x not in ("unix", "tcp"):
            raise ValueError(f'{_show(x)} is not an admin transport: use "unix" (POSIX) or "tcp" (localhost)')
        return x

    default_transport = "tcp" if os.name == "nt" else "unix"
    tr = v.get(a, "transport", "admin", transport, default_transport)
    if tr == "unix" and os.name == "nt":
        v.error("admin.transport", '"unix" is not available on Windows; use "tcp" (localhost)')
    sock = v.get(a, "socket", "admin", _path_str, None)
    sock_path = _resolve(v.base_dir, sock) if sock is not None else Path(server.state_dir) / "admin.sock"
    # On Linux a long path is reached through /proc/self/fd (admin._unix_name).
    if tr == "unix" and not hasattr(os, "O_PATH") and len(os.fsencode(str(sock_path))) > _MAX_SOCKET_PATH:
        v.error("admin.socket" if sock is not None else "server.state_dir",
                f'the admin socket path "{sock_path}" is longer than {_MAX_SOCKET_PATH} bytes (an OS limit); '
                'set [admin] socket = "/run/pyiscsi-target/admin.sock" or similar')
    listen = d.listen
    if "listen" in a:
        listen = v.get(a, "listen", "admin", parse_portal, d.listen)
        if not _is_loopback(listen[0]):
            # No remote admin: reload changes what is exported and has no
            # authentication of its own beyond the token file.
            v.error("admin.listen", f'"{a["listen"]}" is not a loopback address; use "127.0.0.1:PORT" or "[::1]:PORT"')
    admin = AdminConfig(enabled=v.get(a, "enabled", "admin", _bool, d.enabled), transport=tr,
                        socket=sock_path, listen=listen)

    m = v.table(data, "metrics", "metrics")
    v.check_keys(m, "metrics", _METRICS_KEYS)
    mlisten = v.get(m, "listen", "metrics", parse_portal, None)
    if mlisten is not None:
        if mlisten in server.listen:
            v.error("metrics.listen", f'"{m["listen"]}" is also an iSCSI portal in [server] listen')
        elif tr == "tcp" and admin.enabled and mlisten == listen:
            v.error("metrics.listen", f'"{m["listen"]}" is also the [admin] listen address')
    return admin, MetricsConfig(listen=mlisten)


_GATEWAY_KEYS = ("name", "port_group", "state", "peer")
_PEER_KEYS = ("name", "port_group", "state", "portals")


def _gateway_name(x: Any) -> str:
    if not isinstance(x, str) or not x.strip() or len(x) > 64 or not x.isprintable():
        raise ValueError(f"{_show(x)} must be a name of 1..64 printable characters")
    return x


def _gateway_state(x: Any) -> str:
    if x not in GATEWAY_STATES:
        raise ValueError(f"{_show(x)} is not an ALUA state: use " + ", ".join(f'"{s}"' for s in GATEWAY_STATES))
    return x


def _validate_gateway(data: dict, v: _Validator, server: ServerConfig) -> GatewayConfig:
    """``[gateway]`` and its ``[[gateway.peer]]`` list.  Port groups are
    SPC-4 target port group ids and iSCSI TPGTs at once: 1..65535, unique
    among this gateway and its peers (an initiator would merge two groups'
    paths otherwise)."""
    import socket

    g = v.table(data, "gateway", "gateway")
    v.check_keys(g, "gateway", _GATEWAY_KEYS)
    d = GatewayConfig()
    name = v.get(g, "name", "gateway", _gateway_name, "") or socket.gethostname() or "localhost"
    group_id = v.get(g, "port_group", "gateway", _int_range(1, 65535), d.port_group)
    state = v.get(g, "state", "gateway", _gateway_state, d.state)
    groups: dict[int, str] = {group_id: "gateway"}
    names: dict[str, str] = {name: "gateway"}
    raw = g.get("peer", [])
    if isinstance(raw, dict):
        v.error("gateway.peer", "write [[gateway.peer]] (an array of tables, one per peer), not [gateway.peer]")
        raw = []
    elif not isinstance(raw, list):
        v.error("gateway.peer", f"must be [[gateway.peer]] tables, not {_tname(raw)}")
        raw = []
    own_portals = set(server.listen)
    peers: list[PeerGatewayConfig] = []
    seen_portals: dict[tuple[str, int], str] = {}
    for i, pt in enumerate(raw):
        pp = f"gateway.peer[{i}]"
        if not isinstance(pt, dict):
            v.error(pp, "must be a table ([[gateway.peer]])")
            continue
        v.check_keys(pt, pp, _PEER_KEYS)
        pname = v.get(pt, "name", pp, _gateway_name, None, required=True)
        pgroup = v.get(pt, "port_group", pp, _int_range(1, 65535), None, required=True)
        pstate = v.get(pt, "state", pp, _gateway_state, d.state)
        if pname is not None:
            if pname in names:
                what = "this gateway's name" if names[pname] == "gateway" else f"already used by {names[pname]}"
                v.error(f"{pp}.name", f'"{pname}" is {what}: list the other gateways, not this one')
            names.setdefault(pname, pp)
        if pgroup is not None:
            if pgroup in groups:
                whose = "this gateway's [gateway] port_group" if groups[pgroup] == "gateway" else groups[pgroup]
                v.error(f"{pp}.port_group", f"{pgroup} is already used by {whose}; every gateway needs its own")
            groups.setdefault(pgroup, pp)
        portals: list[tuple[str, int]] = []
        rp = pt.get("portals", [])
        if not isinstance(rp, list):
            v.error(f"{pp}.portals", f'{rp!r} must be a list of "host:port" strings, e.g. ["192.0.2.12:3260"]')
            rp = []
        for j, it in enumerate(rp):
            kp = f"{pp}.portals[{j}]"
            try:
                hp = parse_portal(it)
            except ValueError as e:
                v.error(kp, str(e))
                continue
            if _is_ip(hp[0]) and ipaddress.ip_address(hp[0]).is_unspecified:
                # RFC 7143 / windows-initiator.md §3: an initiator cannot connect to a wildcard.
                v.error(kp, f'"{it}" is a wildcard address; give the address initiators reach the peer on')
                continue
            if hp in own_portals:
                v.error(kp, f'"{it}" is one of this gateway\'s own [server] listen portals')
                continue
            if hp in seen_portals:
                v.error(kp, f'"{it}" is already listed by {seen_portals[hp]}')
                continue
            seen_portals[hp] = pp
            portals.append(hp)
        if pname is not None and pgroup is not None:
            peers.append(PeerGatewayConfig(pname, pgroup, pstate, tuple(portals)))
    return GatewayConfig(name=name, port_group=group_id, state=state, peers=tuple(peers))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

_TOML_POS_RE = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)\s*$", re.S)


def parse_config(text: str, source: str | Path = "<config>", base_dir: Path | None = None) -> Config:
    """Validate TOML ``text``; ``source`` names it in errors, relative paths
    resolve against ``base_dir`` (default: the current directory)."""
    src = str(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS_RE.match(msg)
        if m:
            raise ConfigError(f"{src}:{m.group(2)}: TOML syntax error: {m.group(1)} (column {m.group(3)})") from None
        if "end of document" in msg:
            last = max(1, len(text.splitlines()))
            raise ConfigError(f"{src}:{last}: TOML syntax error: {msg}") from None
        raise ConfigError(f"{src}: TOML syntax error: {msg}") from None
    base = (base_dir or Path.cwd()).absolute()
    v = _Validator(src, KeyLocator(text), base)
    server, iscsi, targets = _validate(data, v)
    _validate_discovery(data, v)
    admin, metrics = _validate_operations(data, v, server)
    ceph = _validate_ceph(data, v)
    gateway = _validate_gateway(data, v, server)
    if v.errors:
        msgs = [m for _, m in sorted(v.errors, key=lambda e: e[0])]
        raise ConfigError("\n".join(msgs), msgs)
    return Config(server=server, iscsi=iscsi, targets=targets, source=Path(source).absolute(),
                  discovery_chap=v.discovery_chap, warnings=tuple(v.warnings) + _readable_warning(v, source),
                  cache=v.cache, admin=admin, metrics=metrics, ceph=ceph, gateway=gateway)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise :class:`ConfigError`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the config file is not UTF-8") from None
    return parse_config(text, source=path, base_dir=p.absolute().parent)
