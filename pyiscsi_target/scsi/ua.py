"""Unit attention conditions, queued per (logical unit, I_T nexus).

SAM-5 §5.14 / SPC-4 §5.14: a unit attention is established for an I_T nexus
on one logical unit and reported once, as CHECK CONDITION UNIT ATTENTION, to
the next command from that nexus to that LU that is not INQUIRY, REPORT LUNS
or REQUEST SENSE (REQUEST SENSE returns it as sense data and clears it).
Several may be queued; a power on / reset condition supersedes every other
one (SAM-5 §5.14: after a reset the initiator re-reads all state anyway).
"""

from __future__ import annotations

from collections import deque

from .command import Nexus
from .sense import Reason

__all__ = ["UnitAttentions"]

#: Bound per nexus: beyond it the oldest non-reset condition is dropped.
MAX_QUEUED = 8


class UnitAttentions:
    """The UA queues of one logical unit, one per known I_T nexus."""

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        self._queues: dict[Nexus, deque[Reason]] = {}

    def add_nexus(self, nexus: Nexus, reason: Reason | None = Reason.POWER_ON_RESET_OR_BUS_DEVICE_RESET) -> None:
        """A new I_T nexus sees the LU for the first time (SAM-5 §6.3.1).

        Conditions established while the nexus was absent (persistent
        reservation UAs go to registered nexuses whether connected or not,
        SPC-4 §5.12.11.4) are kept and reported after the reset condition:
        a preempted Windows node learns REGISTRATIONS PREEMPTED on return."""
        waiting: list[Reason] = []
        ports = (nexus.initiator_port.lower(), nexus.target_port.lower())
        for known in list(self._queues):
            if (known.initiator_port.lower(), known.target_port.lower()) == ports:
                waiting += [r for r in self._queues.pop(known) if not r.is_reset and r not in waiting]
        self._queues[nexus] = deque()
        if reason is not None:
            self.establish(nexus, reason)
        for r in waiting:
            self.establish(nexus, r)

    def remove_nexus(self, nexus: Nexus) -> None:
        self._queues.pop(nexus, None)

    def nexuses(self) -> list[Nexus]:
        return list(self._queues)

    def establish(self, nexus: Nexus, reason: Reason) -> None:
        q = self._queues.get(nexus)
        if q is None:
            q = self._queues[nexus] = deque()
        if reason.is_reset:
            q.clear()
        elif reason in q:
            return
        elif len(q) >= MAX_QUEUED:
            # Keep a queued reset condition: it is the most important one.
            for i, queued in enumerate(q):
                if not queued.is_reset:
                    del q[i]
                    break
            else:
                return
        q.append(reason)

    def establish_all(self, reason: Reason, *, except_nexus: Nexus | None = None) -> None:
        for nexus in list(self._queues):
            if nexus != except_nexus:
                self.establish(nexus, reason)

    def pending(self, nexus: Nexus) -> bool:
        q = self._queues.get(nexus)
        return bool(q)

    def peek(self, nexus: Nexus) -> Reason | None:
        q = self._queues.get(nexus)
        return q[0] if q else None

    def pop(self, nexus: Nexus) -> Reason | None:
        q = self._queues.get(nexus)
        return q.popleft() if q else None

    def clear(self, nexus: Nexus, reason: Reason) -> None:
        """Drop one condition (REPORT LUNS clears 3F/0E, SPC-4 §6.33)."""
        q = self._queues.get(nexus)
        if q and reason in q:
            q.remove(reason)
