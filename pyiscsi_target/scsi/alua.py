"""Asymmetric logical unit access (ALUA, SPC-4 §5.16): target port groups.

Several target devices ("gateways", one process each) may export the same
logical unit; each is one *target port group* with one asymmetric access
state.  The SCSI core only needs to know, for an I_T nexus, which group its
target port (``Nexus.relative_port_id``) belongs to and what state that group
is in.  How groups map to processes, portals or config is the fabric's and
the assembler's business, not this module's.

Only *implicit* ALUA is offered (INQUIRY TPGS=01b, SPC-4 §6.6.2): states
change when the administrator reconfigures a gateway, never through SET
TARGET PORT GROUPS.  Because a group is never caught half-way through a
change, the transitioning state is never reported (T_SUP=0).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["AccessState", "PortGroup", "TargetPortGroups", "SINGLE"]


class AccessState(enum.IntEnum):
    """ASYMMETRIC ACCESS STATE codes (SPC-4 §6.36.2 table 265)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    OFFLINE = 0xE
    TRANSITIONING = 0xF

    @property
    def label(self) -> str:
        """The name SPC-4 and administrators use (``active/optimized``...)."""
        return _LABELS[self]

    @classmethod
    def from_label(cls, text: str) -> "AccessState":
        for state, label in _LABELS.items():
            if label == text:
                return state
        raise ValueError(text)


_LABELS = {
    AccessState.ACTIVE_OPTIMIZED: "active/optimized",
    AccessState.ACTIVE_NON_OPTIMIZED: "active/non-optimized",
    AccessState.STANDBY: "standby",
    AccessState.UNAVAILABLE: "unavailable",
    AccessState.OFFLINE: "offline",
    AccessState.TRANSITIONING: "transitioning",
}

#: The states a group may be configured in, hence the only ones REPORT TARGET
#: PORT GROUPS announces as supported (AO_SUP, AN_SUP, S_SUP).
CONFIGURABLE_STATES = (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED, AccessState.STANDBY)


@dataclass(frozen=True, slots=True)
class PortGroup:
    """One target port group (SPC-4 §5.16.2.1): its id, its asymmetric access
    state, and the relative target port identifiers of its target ports."""

    id: int
    state: AccessState
    relative_port_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 < self.id <= 0xFFFF:
            raise ValueError(f"target port group id {self.id} is out of range 1..65535")
        if self.state not in CONFIGURABLE_STATES:
            raise ValueError(f"access state {self.state.label} cannot be configured")
        for rel in self.relative_port_ids:
            # SPC-4 §7.8.6.7: relative target port identifier 0 is reserved.
            if not 0 < rel <= 0xFFFF:
                raise ValueError(f"relative target port id {rel} is out of range 1..65535")


@dataclass(frozen=True, slots=True)
class TargetPortGroups:
    """Every target port group through which the LUs of a target device are
    reachable: this device's own and its peers' (REPORT TARGET PORT GROUPS
    lists them all, SPC-4 §6.36.1).

    ``standby_ports`` holds the relative port ids whose group is in standby:
    the per-command check is one empty-set test in the common case.
    """

    groups: tuple[PortGroup, ...]
    #: IMPLICIT TRANSITION TIME (SPC-4 §6.36.2): 0 = no recommendation.  A
    #: state changes only when a gateway is reconfigured and restarted.
    implicit_transition_time: int = 0
    _by_port: dict = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]
    standby_ports: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_port: dict[int, PortGroup] = {}
        ids: set[int] = set()
        for g in self.groups:
            if g.id in ids:
                raise ValueError(f"target port group {g.id} is listed twice")
            ids.add(g.id)
            for rel in g.relative_port_ids:
                if rel in by_port:
                    raise ValueError(f"relative target port {rel} is in groups {by_port[rel].id} and {g.id}")
                by_port[rel] = g
        if not 0 <= self.implicit_transition_time <= 255:
            raise ValueError("implicit transition time must be 0..255 seconds")
        object.__setattr__(self, "_by_port", by_port)
        object.__setattr__(self, "standby_ports",
                           frozenset(r for r, g in by_port.items() if g.state == AccessState.STANDBY))

    def group_of(self, relative_port_id: int) -> PortGroup | None:
        """The group holding a target port; None for a port no group names."""
        return self._by_port.get(relative_port_id)


#: A single box: one group, id 1, active/optimized, holding relative port 1
#: (what an unconfigured gateway is; TPGT 1 on the iSCSI side).
SINGLE = TargetPortGroups((PortGroup(1, AccessState.ACTIVE_OPTIMIZED, (1,)),))
