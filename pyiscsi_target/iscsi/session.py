"""Sessions, their identity (ISID/TSIH) and the table of them (RFC 7143 §4.4, §6.3.5).

A session is identified on the wire by the pair (ISID, TSIH); across
reconnects the SCSI world knows it by its I_T nexus: initiator port
``<InitiatorName>,i,0x<ISID>`` and target port ``<TargetName>,t,0x<TPGT>``
(RFC 7143 §4.4.4 / SAM-5).  A new login with the same InitiatorName, ISID and
target but TSIH 0 *reinstates* the session: the old one is closed first and
the nexus, hence persistent reservations keyed on it, continues.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..scsi.command import Nexus
from .cmdsn import CmdWindow

ISCSI_PROTOCOL_ID = 0x5  # SPC-4 §7.6.1 table 362


@dataclass
class TargetEntry:
    """What the fabric knows of an exported target: a name and a SCSI device."""

    name: str
    device: Any                      # pyiscsi_target.scsi.target.ScsiTargetDevice
    alias: str | None = None
    chap: Any = None                 # iscsi.chap.ChapCredentials: CHAP required; None = AuthMethod None
    acl: Any = None                  # iscsi.acl.AccessList; None = anyone may log in


@dataclass
class PortalContext:
    """Everything a connection needs from the running server, injected.

    Keeps the sans-IO protocol code free of sockets, config files and clocks.
    """

    targets: dict[str, TargetEntry]
    offers: dict[str, str]                       # RFC 7143 key → our offered value
    # Target portal group tag of every portal of this process (RFC 7143
    # §4.4.1); also its relative target port id (SPC-4 §7.8.6.7) and its ALUA
    # target port group ([gateway] port_group; 1 for a single box).
    tpgt: int = 1
    portals: list[tuple[str, int]] = field(default_factory=list)   # configured listen addresses
    # Other gateways' portals (host, port, their TPGT), advertised by
    # SendTargets so one discovery finds every path ([[gateway.peer]] portals).
    peer_portals: list[tuple[str, int, int]] = field(default_factory=list)
    queue_depth: int = 128
    nop_interval: float = 10.0
    nop_timeout: float = 30.0
    login_timeout: float = 15.0
    max_sessions: int = 256
    discovery_chap: Any = None                   # iscsi.chap.ChapCredentials for discovery sessions
    sessions: "SessionTable" = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.sessions is None:
            self.sessions = SessionTable()


def initiator_port_name(initiator_name: str, isid: bytes) -> str:
    return f"{initiator_name},i,0x{isid.hex()}"


def target_port_name(target_name: str, tpgt: int) -> str:
    return f"{target_name},t,0x{tpgt:04x}"


def iscsi_transport_id(port_name: str) -> bytes:
    """SPC-4 §7.6.4.6: iSCSI initiator-port TransportID (format 01b)."""
    name = port_name.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes([0x40 | ISCSI_PROTOCOL_ID, 0]) + len(name).to_bytes(2, "big") + name


class Session:
    def __init__(self, tsih: int, isid: bytes, initiator_name: str, session_type: str,
                 target: TargetEntry | None, tpgt: int, params, first_cmdsn: int, depth: int):
        self.tsih = tsih
        self.isid = isid
        self.initiator_name = initiator_name
        self.session_type = session_type
        self.target = target
        self.tpgt = tpgt
        self.params = params
        self.window = CmdWindow(first_cmdsn, depth)
        self.connections: dict[int, Any] = {}     # CID → IscsiConnection
        self.nexus: Nexus | None = None
        if target is not None:
            iport = initiator_port_name(initiator_name, isid)
            self.nexus = Nexus(iport, target_port_name(target.name, tpgt), tpgt,
                               iscsi_transport_id(iport))

    @property
    def key(self) -> tuple:
        return (self.initiator_name, self.isid, self.target.name if self.target else None, self.tpgt)

    @property
    def discovery(self) -> bool:
        return self.session_type == "Discovery"


class SessionTable:
    def __init__(self):
        self.by_tsih: dict[int, Session] = {}
        self._tsih = itertools.count(1)

    def new_tsih(self) -> int:
        # TSIH 0 is reserved (§11.12.5); wrap within 16 bits, skipping live ones.
        while True:
            t = next(self._tsih) & 0xFFFF
            if t and t not in self.by_tsih:
                return t

    def find(self, key: tuple) -> Session | None:
        for s in self.by_tsih.values():
            if s.key == key:
                return s
        return None

    def add(self, s: Session) -> None:
        self.by_tsih[s.tsih] = s

    def remove(self, s: Session) -> None:
        if self.by_tsih.get(s.tsih) is s:
            del self.by_tsih[s.tsih]

    def __len__(self) -> int:
        return len(self.by_tsih)
