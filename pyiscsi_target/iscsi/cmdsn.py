"""Command numbering (RFC 7143 §4.2.2) in 32-bit serial arithmetic (RFC 1982).

The session's command window is [ExpCmdSN, MaxCmdSN].  Non-immediate commands
outside it, and duplicates inside it, are silently ignored (§4.2.2.1); commands
that arrive ahead of a gap wait until the gap is filled, so the SCSI layer sees
them in CmdSN order.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF
HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """a < b in serial number arithmetic (RFC 1982 §3.2)."""
    return a != b and ((b - a) & MASK) < HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def sn_add(a: int, n: int) -> int:
    return (a + n) & MASK


class CmdWindow:
    """ExpCmdSN/MaxCmdSN bookkeeping for one session.

    ``depth`` is how many non-immediate commands may be outstanding (received,
    not yet answered).  MaxCmdSN never moves backwards (§4.2.2.1: an initiator
    ignores a smaller value anyway).
    """

    __slots__ = ("exp_cmdsn", "max_cmdsn", "depth", "outstanding", "_held")

    def __init__(self, first_cmdsn: int, depth: int = 128):
        self.exp_cmdsn = first_cmdsn & MASK
        self.depth = depth
        self.outstanding = 0
        self.max_cmdsn = sn_add(self.exp_cmdsn, depth - 1)
        self._held: dict[int, object] = {}

    def in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)

    def accept(self, cmdsn: int, item) -> list | None:
        """Admit a non-immediate command (``item`` None: a rejected command PDU
        whose CmdSN is consumed without delivering anything).

        Returns the items now deliverable in CmdSN order (possibly empty when
        the command waits behind a gap), or None if it must be ignored
        (outside the window or a duplicate).
        """
        if cmdsn == self.exp_cmdsn and item is not None and not self._held \
                and ((self.max_cmdsn - cmdsn) & MASK) < HALF:
            # The next command in order, inside the window, nothing held: the
            # usual case, delivered as the general code below would.
            self.exp_cmdsn = (cmdsn + 1) & MASK
            self.outstanding += 1
            return [item]
        if not self.in_window(cmdsn) or cmdsn in self._held:
            return None
        self._held[cmdsn] = item
        ready = []
        while self.exp_cmdsn in self._held:
            got = self._held.pop(self.exp_cmdsn)
            self.exp_cmdsn = sn_add(self.exp_cmdsn, 1)
            if got is not None:
                ready.append(got)
                self.outstanding += 1
        if not ready:
            self.done(0)
        return ready

    def accept_next(self, cmdsn: int) -> bool:
        """Admit ``cmdsn`` if it is the next command in order, inside the
        window, with nothing held (then :meth:`accept` would deliver just
        it); False changes nothing and leaves the case to :meth:`accept`."""
        if cmdsn == self.exp_cmdsn and not self._held and ((self.max_cmdsn - cmdsn) & MASK) < HALF:
            self.exp_cmdsn = (cmdsn + 1) & MASK
            self.outstanding += 1
            return True
        return False

    def done(self, n: int = 1) -> None:
        """A command left the target (answered or aborted): open the window."""
        # sn_add/sn_lt spelled out: this runs once per command.
        left = self.outstanding - n
        self.outstanding = left = left if left > 0 else 0
        cand = (self.exp_cmdsn + self.depth - 1 - left - len(self._held)) & MASK
        mx = self.max_cmdsn
        if mx != cand and ((cand - mx) & MASK) < HALF:
            self.max_cmdsn = cand
