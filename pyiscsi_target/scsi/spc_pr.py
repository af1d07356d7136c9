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

from . import pr
from .command import Nexus, ScsiResult, Status
from .context import Command, Reply
from .lun import LogicalUnit
from .sense import Reason, ScsiError
from .tasks import TaskSet

__all__ = ["persistent_reserve_in", "persistent_reserve_out"]

log = logging.getLogger(__name__)


async def persistent_reserve_in(cmd: Command) -> Reply:
    cdb = cmd.cdb
    alloc = int.from_bytes(cdb[7:9], "big")
    # SPC-4 §6.16.1: the data is truncated to ALLOCATION LENGTH, its
    # ADDITIONAL LENGTH still describes all of it.
    return Command.allocation(cmd.unit.pr.pr_in(cdb[1] & 0x1F), alloc)


async def persistent_reserve_out(cmd: Command) -> Reply:
    cdb = cmd.cdb
    lu = cmd.unit
    length = int.from_bytes(cdb[5:9], "big")
    params = bytes(cmd.data_out(length))
    async with lu.pr_lock:
        try:
            new, effects = lu.pr.pr_out(cmd.nexus, cdb[1] & 0x1F, cdb[2] >> 4, cdb[2] & 0x0F, params)
        except pr.ReservationConflict:
            return ScsiResult(status=Status.RESERVATION_CONFLICT, data_out_wanted=cmd.data_out_wanted)
        if new is lu.pr.state:
            return None
        # Persist, commit and apply as one step that an abort of this task
        # cannot cut in half: what is on disk is what is in memory.
        inner = asyncio.ensure_future(_commit(lu, cmd.nexus, new, effects))
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            if not inner.done():  # keep the lock until the commit is complete
                await asyncio.wait([inner])
            raise
    return None


async def _commit(lu: LogicalUnit, nexus: Nexus, new: pr.PrState, effects: pr.Effects) -> None:
    if lu.pr.needs_persist(new):
        # SPC-4 §5.12.5: with APTPL the state must survive power loss before
        # the command completes.  A failed write leaves the old state in force.
        try:
            await asyncio.to_thread(lu.pr.persist, pr.encode(new))
        except OSError as e:
            log.error("LUN %d: persisting reservations failed: %s", lu.lun_id, e)
            raise ScsiError(Reason.INTERNAL_TARGET_FAILURE) from e
    lu.pr.state = new
    deliver_unit_attentions(lu, nexus, effects.unit_attentions)
    if effects.abort:
        # SPC-4 §5.12.11.5: PREEMPT AND ABORT aborts every task of the
        # preempted I_T nexuses (as CLEAR TASK SET would, TAS=0: no status).
        victims = effects.abort
        entries = lu.tasks.select(lambda e: e.nexus != nexus and any(r.matches(e.nexus) for r in victims))
        await TaskSet.abort(entries)


def deliver_unit_attentions(lu: LogicalUnit, sender: Nexus, uas: list[tuple[pr.Registration, Reason]]) -> None:
    """Establish each condition for every known nexus the registration stands
    for, except the sender (SPC-4 §5.12.11: "other than the I_T nexus on which
    the command was received").  A registration whose nexus is not connected
    gets its condition queued under its own ports, reported on its return."""
    known = lu.unit_attentions.nexuses()
    for reg, reason in uas:
        targets = [n for n in known if reg.matches(n)]
        if not targets and ",i,0x" in reg.initiator_port and reg.target_port is not None:
            targets = [reg.nexus()]
        for n in targets:
            if n != sender:
                lu.unit_attentions.establish(n, reason)
