"""PERSISTENT RESERVE IN / OUT handlers (SPC-4 §6.16, §6.17).

The glue between the dispatch table and the pure state machine in
:mod:`.pr`: read the CDB and parameter list, run the state machine, persist
the new state when APTPL asks for it, commit it, then apply its effects --
unit attentions to the nexuses SPC-4 names, and for PREEMPT AND ABORT the
abort of the preempted nexuses' tasks through the LU's task set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import pr
from .command import Nexus, ScsiResult, Status
from .context import Command, Reply
from .lun import LogicalUnit
from .pr_shared import Decision, apply_effects
from .sense import Reason, ScsiError

__all__ = ["persistent_reserve_in", "persistent_reserve_out", "change_reservations"]

log = logging.getLogger(__name__)


async def persistent_reserve_in(cmd: Command) -> Reply:
    cdb = cmd.cdb
    alloc = int.from_bytes(cdb[7:9], "big")
    lu = cmd.unit
    if lu.shared is not None:
        # Another gateway's change is normally here already (its command
        # waited for our acknowledgement); reading the record also covers a
        # gateway that timed out on us.
        await lu.shared.resync()
    # SPC-4 §6.16.1: the data is truncated to ALLOCATION LENGTH, its
    # ADDITIONAL LENGTH still describes all of it.
    return Command.allocation(lu.pr.pr_in(cdb[1] & 0x1F), alloc)


async def persistent_reserve_out(cmd: Command) -> Reply:
    cdb = cmd.cdb
    lu = cmd.unit
    length = int.from_bytes(cdb[5:9], "big")
    params = bytes(cmd.data_out(length))
    nexus = cmd.nexus

    def decide(state: pr.PrState, holder: Nexus | None) -> Decision:
        new, effects = lu.pr.pr_out(nexus, cdb[1] & 0x1F, cdb[2] >> 4, cdb[2] & 0x0F, params, state=state)
        return new, holder, effects

    try:
        await change_reservations(lu, nexus, decide)
    except pr.ReservationConflict:
        return ScsiResult(status=Status.RESERVATION_CONFLICT, data_out_wanted=cmd.data_out_wanted)
    return None


async def change_reservations(lu: LogicalUnit, sender: Nexus | None,
                              decide: Callable[[pr.PrState, Nexus | None], Decision]) -> None:
    """The one way the LU's reservation state (PR state and SPC-2 holder)
    changes: decide from the current state, make the new state durable
    (APTPL file, or the record shared by several gateways), commit it, apply
    its effects.  One change at a time per LU, and once the new state is
    being written an abort of the command cannot cut the step in half: what
    is stored is what is enforced."""
    async with lu.pr_lock:
        if lu.shared is not None:
            step = lu.shared.transact(sender, decide)
        else:
            state, holder = lu.pr.state, lu.reserved_by
            d = decide(state, holder)
            if d[0] is state and d[1] == holder:
                return
            step = _commit_local(lu, sender, d)
        inner = asyncio.ensure_future(step)
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            if not inner.done():  # keep the lock until the commit is complete
                await asyncio.wait([inner])
            raise


async def _commit_local(lu: LogicalUnit, sender: Nexus | None, d: Decision) -> None:
    new, holder, effects = d
    if lu.pr.needs_persist(new):
        # SPC-4 §5.12.5: with APTPL the state must survive power loss before
        # the command completes.  A failed write leaves the old state in force.
        try:
            await asyncio.to_thread(lu.pr.persist, pr.encode(new))
        except OSError as e:
            log.error("LUN %d: persisting reservations failed: %s", lu.lun_id, e)
            raise ScsiError(Reason.INTERNAL_TARGET_FAILURE) from e
    lu.pr.state = new
    lu.reserved_by = holder
    await apply_effects(lu, sender, effects)
