"""The SCSI target device behind one iSCSI target: LUs, UA queues, task sets.

:meth:`ScsiTargetDevice.execute` is the one entry point for commands.  Each
command runs in its own asyncio task registered in the LU's task set under
(nexus, tag), so ABORT TASK, CLEAR TASK SET, LOGICAL UNIT RESET and target
reset can cancel it with ``Task.cancel()`` without touching the fabric's own
tasks; the cancellation surfaces as ``CancelledError`` from ``execute`` and
the fabric then sends no response for that command (SAM-5 §7.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .. import eager
from .command import Nexus, ScsiResult, ScsiTask, Status, TmfResponse
from .alua import SINGLE, TargetPortGroups
from .context import Command
from .lun import LogicalUnit
from .opcodes import COMMANDS, PRE_DISPATCH, OpSpec, ServiceActions, resolve
from .sense import Reason, ScsiError, build_sense
from .tasks import TaskEntry, TaskSet

__all__ = ["ScsiTargetDevice"]

log = logging.getLogger(__name__)


class ScsiTargetDevice:
    """The SCSI target device behind one iSCSI target: its LUs, UA queues, task sets."""

    def __init__(self, name: str, luns: dict[int, LogicalUnit], lun_view=None,
                 port_groups: TargetPortGroups = SINGLE) -> None:
        self.name = name
        self.luns = luns
        self.commands: dict[int, OpSpec | ServiceActions] = COMMANDS
        # ALUA (SPC-4 §5.16): the target port groups the LUs are reached
        # through, this device's and its peers'; the same for every LU.
        self.port_groups = port_groups
        self._nexuses: set[Nexus] = set()
        # LUN masking: lun_view(nexus) -> the LUN ids that nexus may see, or
        # None for all.  Decided once per nexus; a masked LUN does not exist
        # for that nexus (REPORT LUNS, commands, task management).
        self.lun_view = lun_view
        self._views: dict[Nexus, frozenset[int]] = {}
        # observer(task, result, t0) after each command submit() ran: the one
        # place I/O is counted (metrics.DeviceObserver); None = not counted.
        self.observer = None

    def lu_for(self, nexus: Nexus, lun: int) -> LogicalUnit | None:
        """The LU a nexus addresses as ``lun``; None if absent or masked."""
        lu = self.luns.get(lun)
        if lu is not None and self._views:
            view = self._views.get(nexus)
            if view is not None and lun not in view:
                return None
        return lu

    def visible_luns(self, nexus: Nexus) -> list[int]:
        view = self._views.get(nexus)
        return sorted(self.luns if view is None else (l for l in self.luns if l in view))

    # --- I_T nexus life cycle ---------------------------------------------------

    def add_nexus(self, nexus: Nexus) -> None:
        """A new I_T nexus: every LU reports POWER ON, RESET, OR BUS DEVICE
        RESET OCCURRED (29/00) to it first (SAM-5 §6.3.1)."""
        self._nexuses.add(nexus)
        if self.lun_view is not None:
            view = self.lun_view(nexus)
            if view is not None:
                self._views[nexus] = frozenset(view)
        for lu in self.luns.values():
            lu.unit_attentions.add_nexus(nexus)

    def remove_nexus(self, nexus: Nexus) -> None:
        """I_T nexus loss: forget its UAs and release its SPC-2 reservations
        (SPC-2 §5.5.3: a reservation does not survive the nexus)."""
        self._nexuses.discard(nexus)
        self._views.pop(nexus, None)
        for lu in self.luns.values():
            lu.unit_attentions.remove_nexus(nexus)
            lu.release_scsi2(nexus)

    # --- commands ---------------------------------------------------------------

    async def execute(self, task: ScsiTask) -> ScsiResult:
        """Run one command to its result.  Never raises for bad input (CHECK
        CONDITION with exact sense instead); raises CancelledError when
        aborted by a task management function."""
        lu = self.luns.get(task.lun)
        if lu is not None and self._views:
            lu = self.lu_for(task.nexus, task.lun)
        if lu is None:
            return await self._dispatch(task, None)
        entry = lu.tasks.begin(task.nexus, task.tag, task.attribute)
        if entry is None:
            # SAM-5 §5.10: a tag already in use on this nexus.
            return ScsiResult(Status.CHECK_CONDITION, sense=build_sense(Reason.OVERLAPPED_COMMANDS_ATTEMPTED))
        runner = asyncio.get_running_loop().create_task(self._run(lu, entry, task))
        entry.task = runner
        try:
            return await runner
        finally:
            lu.tasks.end(entry)

    def submit(self, task: ScsiTask, done: Callable[[ScsiResult | None], None]) -> asyncio.Future:
        """Start a command without awaiting it: ``done(result)`` runs when it
        ends, ``done(None)`` when a task management function aborted it.

        The fabric's fast path: one asyncio task per command, where awaiting
        :meth:`execute` from a task of the fabric's own would cost two.
        """
        loop = asyncio.get_running_loop()
        lu = self.luns.get(task.lun)
        if lu is not None and self._views:
            lu = self.lu_for(task.nexus, task.lun)     # LUN masking
        if lu is None:
            runner = eager.start(self._dispatch(task, None), loop)
        else:
            entry = lu.tasks.begin(task.nexus, task.tag, task.attribute)
            if entry is None:
                # SAM-5 §5.10: a tag already in use on this nexus.
                fut = loop.create_future()
                fut.set_result(None)
                done(ScsiResult(Status.CHECK_CONDITION, sense=build_sense(Reason.OVERLAPPED_COMMANDS_ATTEMPTED)))
                return fut
            runner = eager.start(self._run(lu, entry, task), loop)
            entry.task = runner
        obs = self.observer
        t0 = loop.time() if obs is not None else 0.0

        def finished(t: asyncio.Task) -> None:
            if t.cancelled():
                done(None)
                return
            exc = t.exception()
            if exc is not None:  # _dispatch maps every error; this is a bug
                log.error("%s: LUN %d: command %s failed", self.name, task.lun, task.cdb[:1].hex(), exc_info=exc)
                done(ScsiResult(Status.CHECK_CONDITION, sense=build_sense(Reason.INTERNAL_TARGET_FAILURE)))
                return
            result = t.result()
            if obs is not None:
                obs(task, result, t0)
            done(result)

        if runner.done():
            # Finished in its first step (no wait): answer now, in the same
            # loop iteration that received the command.
            finished(runner)
        else:
            runner.add_done_callback(finished)
        return runner

    async def _run(self, lu: LogicalUnit, entry: TaskEntry, task: ScsiTask) -> ScsiResult:
        try:
            if entry.waits_for:
                await TaskSet.wait_turn(entry)
            return await self._dispatch(task, lu)
        finally:
            lu.tasks.end(entry)

    async def _dispatch(self, task: ScsiTask, lu: LogicalUnit | None) -> ScsiResult:
        spec, lookup_error = resolve(self.commands, task.cdb)
        cmd = Command(task, lu, self, spec, lookup_error)
        try:
            for check in PRE_DISPATCH:
                early = check(cmd)
                if early is not None:
                    return early
            assert spec is not None
            reply = await spec.handler(cmd)
        except ScsiError as err:
            return ScsiResult(Status.CHECK_CONDITION, sense=err.sense, data_out_wanted=cmd.data_out_wanted)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, or a backend failure outside the mapped paths
            log.exception("%s: LUN %d: command %s failed", self.name, task.lun, task.cdb[:1].hex())
            return ScsiResult(
                Status.CHECK_CONDITION,
                sense=build_sense(Reason.INTERNAL_TARGET_FAILURE),
                data_out_wanted=cmd.data_out_wanted,
            )
        if isinstance(reply, ScsiResult):
            return reply
        return ScsiResult(Status.GOOD, data_in=reply if reply is not None else b"", data_out_wanted=cmd.data_out_wanted)

    # --- task management (SAM-5 §7) ---------------------------------------------

    async def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResponse:
        lu = self.lu_for(nexus, lun)
        if lu is None:
            return TmfResponse.LUN_DOES_NOT_EXIST
        entry = lu.tasks.find(nexus, tag)
        if entry is None:
            return TmfResponse.TASK_DOES_NOT_EXIST
        await TaskSet.abort([entry])
        return TmfResponse.COMPLETE

    async def abort_task_set(self, nexus: Nexus, lun: int) -> TmfResponse:
        """SAM-5 §7.3: every task of this I_T nexus on the LU."""
        lu = self.lu_for(nexus, lun)
        if lu is None:
            return TmfResponse.LUN_DOES_NOT_EXIST
        await TaskSet.abort(lu.tasks.select(lambda e: e.nexus == nexus))
        return TmfResponse.COMPLETE

    async def clear_task_set(self, nexus: Nexus, lun: int) -> TmfResponse:
        """SAM-5 §7.4: every task on the LU, from every nexus.  With TAS=0,
        each other nexus that lost a task gets COMMANDS CLEARED BY ANOTHER
        INITIATOR (2F/00)."""
        lu = self.lu_for(nexus, lun)
        if lu is None:
            return TmfResponse.LUN_DOES_NOT_EXIST
        entries = lu.tasks.select()
        for other in {e.nexus for e in entries if e.nexus != nexus}:
            lu.unit_attentions.establish(other, Reason.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
        await TaskSet.abort(entries)
        return TmfResponse.COMPLETE

    def _reset_lu(self, lu: LogicalUnit) -> list[TaskEntry]:
        # SPC-2 §5.5.3: a reset releases RESERVE(6)/(10) reservations.
        lu.release_scsi2()
        return lu.tasks.select()

    async def lun_reset(self, nexus: Nexus, lun: int) -> TmfResponse:
        """SAM-5 §7.8: abort every task on the LU (all nexuses), release the
        SCSI-2 reservation, UA 29/03 to every nexus, the issuer's included
        (SAM-5 §6.3.3: "every I_T nexus"; libiscsi MultipathIO.Reset)."""
        lu = self.lu_for(nexus, lun)
        if lu is None:
            return TmfResponse.LUN_DOES_NOT_EXIST
        entries = self._reset_lu(lu)
        lu.unit_attentions.establish_all(Reason.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        await TaskSet.abort(entries)
        return TmfResponse.COMPLETE

    async def target_reset(self, nexus: Nexus, cold: bool) -> TmfResponse:
        """SAM-5 §7.9 (warm) / iSCSI TARGET COLD RESET: a LU reset of every LU;
        UA 29/02 (warm) or 29/01 POWER ON OCCURRED (cold) to every nexus, the
        issuer's included (SAM-5 §6.3.2 hard reset)."""
        reason = Reason.POWER_ON_OCCURRED if cold else Reason.SCSI_BUS_RESET_OCCURRED
        entries: list[TaskEntry] = []
        for lu in self.luns.values():
            entries += self._reset_lu(lu)
            lu.unit_attentions.establish_all(reason)
        await TaskSet.abort(entries)
        return TmfResponse.COMPLETE

    async def close(self) -> None:
        """Flush and close every backend; errors are logged, not raised, so
        one failing image does not keep the others open."""
        for lu in self.luns.values():
            try:
                await lu.backend.flush()
            except Exception:
                log.exception("%s: LUN %d: flush on close failed", self.name, lu.lun_id)
            try:
                await lu.backend.close()
            except Exception:
                log.exception("%s: LUN %d: close failed", self.name, lu.lun_id)
