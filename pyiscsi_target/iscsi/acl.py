"""Who may log in to a target, and which LUNs each initiator sees.

An :class:`AccessList` holds initiator-name patterns (exact names or shell
globs: ``iqn.1991-05.com.microsoft:*``) and source networks (CIDR, IPv4 and
IPv6).  Empty = no restriction on that axis; both axes must match.  iSCSI
names compare case-insensitively (RFC 3722 stringprep folds case).  An IPv4
peer seen on a dual-stack socket (``::ffff:a.b.c.d``) matches IPv4 networks.

:class:`LunMask` maps LUN ids to the initiator patterns allowed to see them;
the SCSI core gets only the resulting per-nexus view (a set of LUN ids).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["AccessList", "LunMask", "NamePatterns", "parse_network", "peer_ip"]

_GLOB = set("*?[")


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``"10.0.0.0/24"``, ``"fd00::/64"`` or a single address; host bits must be zero."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f'"{text}" is not a network: {exc}; use e.g. "10.0.0.0/24" or "fd00::/64"') from None


def peer_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class NamePatterns:
    """Initiator names: exact (case-insensitive) or glob patterns."""

    patterns: tuple[str, ...] = ()
    _exact: frozenset = field(init=False, repr=False, compare=False)
    _globs: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        low = [p.lower() for p in self.patterns]
        object.__setattr__(self, "_exact", frozenset(p for p in low if not (_GLOB & set(p))))
        object.__setattr__(self, "_globs", tuple(p for p in low if _GLOB & set(p)))

    def matches(self, name: str | None) -> bool:
        if name is None:
            return False
        n = name.lower()
        return n in self._exact or any(fnmatch.fnmatchcase(n, g) for g in self._globs)

    def __bool__(self) -> bool:
        return bool(self.patterns)


@dataclass(frozen=True)
class AccessList:
    initiators: NamePatterns = NamePatterns()
    networks: tuple = ()          # ipaddress networks

    @classmethod
    def build(cls, initiators: Iterable[str] = (), networks: Iterable[str] = ()) -> "AccessList":
        return cls(NamePatterns(tuple(initiators)), tuple(parse_network(n) for n in networks))

    @property
    def open(self) -> bool:
        return not self.initiators and not self.networks

    def allows_name(self, name: str | None) -> bool:
        return not self.initiators or self.initiators.matches(name)

    def allows_address(self, host: str) -> bool:
        if not self.networks:
            return True
        ip = peer_ip(host)
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def allows(self, name: str | None, host: str) -> bool:
        return self.allows_name(name) and self.allows_address(host)

    def why_not(self, name: str | None, host: str) -> str | None:
        """None when allowed, else a short reason for the log."""
        if not self.allows_name(name):
            return "initiator name not in the target's allowed initiators"
        if not self.allows_address(host):
            return "source address not in the target's allowed networks"
        return None


@dataclass(frozen=True)
class LunMask:
    """LUN id → initiators allowed to see it; LUNs not listed are seen by all."""

    masks: dict = field(default_factory=dict)    # int → NamePatterns

    def __bool__(self) -> bool:
        return bool(self.masks)

    def visible(self, all_luns: Iterable[int], initiator_name: str | None) -> frozenset[int] | None:
        """The LUN ids this initiator sees, or None when masking hides nothing."""
        if not self.masks:
            return None
        return frozenset(l for l in all_luns if l not in self.masks or self.masks[l].matches(initiator_name))


def initiator_from_port(port_name: str) -> str:
    """``"<InitiatorName>,i,0x<ISID>"`` → InitiatorName (RFC 7143 §4.4.4)."""
    return port_name.rsplit(",i,", 1)[0]
