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
from functools import partial

from .. import eager
from .command import Nexus, ScsiResult, ScsiTask, Status, TmfResponse
from .alua import SINGLE, TargetPortGroups
from .context import Command
from .lun import LogicalUnit
from .opcodes import (COMMANDS, PRE_DISPATCH, OpSpec, ServiceActions, check_alua_standby, check_cdb_bits, check_lun,
                      check_opcode, check_persistent_reservation, check_scsi2_reservation, check_unit_attention,
                      resolve)
from .sense import Reason, ScsiError, build_sense
from .tasks import TaskEntry, TaskSet

__all__ = ["ScsiTargetDevice"]

log = logging.getLogger(__name__)

# The pre-dispatch checks submit() decides from the LU's state without running
# them (each passes with no side effect when its condition holds); the others
# always run, in PRE_DISPATCH order.
_DECIDED_INLINE = (check_lun, check_unit_attention, check_opcode, check_cdb_bits)
_INLINE_CHECKS = tuple(c for c in PRE_DISPATCH if c not in _DECIDED_INLINE)
# The quick lane (a READ answered by OpSpec.quick, see submit) decides the
# rest as well: with no port group in standby, no SPC-2 reservation held and
# no persistent reservation registrations, those checks pass without side
# effects.  A check added to PRE_DISPATCH later turns the lane off until it
# is decided here too.
_DECIDED_QUICK = _DECIDED_INLINE + (check_alua_standby, check_scsi2_reservation, check_persistent_reservation)
_QUICK_LANE = all(c in _DECIDED_QUICK for c in PRE_DISPATCH)


def _inline_rows(table) -> dict[int, tuple[OpSpec, int, int]]:
    """opcode -> (row, CDB length, mask of the bits its usage data leaves
    reserved in CDB bytes 1..n-1): check_cdb_bits as one integer AND."""
    rows = {}
    for opcode, spec in table.items():
        if isinstance(spec, OpSpec):
            n = len(spec.usage)
            reserved = ~int.from_bytes(spec.usage[1:n], "big") & ((1 << (8 * (n - 1))) - 1)
            rows[opcode] = (spec, n, reserved)
    return rows


_INLINE_ROWS = _inline_rows(COMMANDS)


class _Completed:
    """What submit() returns for a command that already answered."""

    __slots__ = ()

    @staticmethod
    def done() -> bool:
        return True


_COMPLETED = _Completed()


_GOOD = Status.GOOD
_CHECK_CONDITION = Status.CHECK_CONDITION


def _as_result(reply, cmd: Command) -> ScsiResult:
    """A handler's reply as a result: data (or nothing) means GOOD."""
    if type(reply) is ScsiResult or isinstance(reply, ScsiResult):
        return reply
    # Positional (status, data_in, sense, data_out_wanted): half the cost of keywords, once per command.
    return ScsiResult(_GOOD, reply if reply is not None else b"", b"", cmd.data_out_wanted)


class _Started:
    """Awaiting it finishes a coroutine whose first step already ran and
    yielded ``first`` (what ``await coro`` would do from that point on):
    values and exceptions (cancellation) are passed through to it."""

    __slots__ = ("coro", "first")

    def __init__(self, coro, first) -> None:
        self.coro = coro
        self.first = first

    def __await__(self):
        coro, out = self.coro, self.first
        self.coro = self.first = None
        while True:
            try:
                value = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    out = coro.send(value)
                except StopIteration as stop:
                    return stop.value


class ScsiTargetDevice:
    """The SCSI target device behind one iSCSI target: its LUs, UA queues, task sets."""

    def __init__(self, name: str, luns: dict[int, LogicalUnit], lun_view=None,
                 port_groups: TargetPortGroups = SINGLE) -> None:
        self.name = name
        self.luns = luns
        self.commands: dict[int, OpSpec | ServiceActions] = COMMANDS
        self._inline = _INLINE_ROWS        # used while self.commands is COMMANDS
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

    def submit(self, task: ScsiTask, done: Callable[[ScsiResult | None], None], loop=None):
        """Start a command without awaiting it: ``done(result)`` runs when it
        ends, ``done(None)`` when a task management function aborted it.
        Returns an object with ``done()`` (an asyncio.Future, an EagerTask or
        :data:`_COMPLETED`): not done means still running.

        The fabric's fast path: one asyncio task per command, where awaiting
        :meth:`execute` from a task of the fabric's own would cost two; none
        at all for a command that does not have to wait (see _submit_inline).
        ``loop``: the running loop, when the caller has it at hand (asking
        asyncio costs a getpid system call per command on Python 3.11).
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        lu = self.luns.get(task.lun)
        if lu is not None and self._views:
            lu = self.lu_for(task.nexus, task.lun)     # LUN masking
        if lu is None:
            runner = eager.start(self._dispatch(task, None), loop)
        else:
            row = self._inline.get(task.cdb[0]) if self.commands is COMMANDS else None
            if row is not None:
                spec, n, reserved = row
                cdb = task.cdb
                # The pre-dispatch checks this skips would all pass without
                # side effects: the LUN exists, the opcode is a plain row this
                # LU supports, no reserved CDB bit is set, and no unit
                # attention is queued for this nexus (checking one pops it).
                # Anything else takes the generic path, which reports it.
                if len(cdb) >= n and not int.from_bytes(cdb[1:n], "big") & reserved \
                        and (spec.allowed_with_ua or not lu.unit_attentions.pending(task.nexus)) \
                        and (spec.supported is None or spec.supported(lu)) \
                        and lu.tasks.runs_at_once(task.nexus, task.tag, task.attribute):
                    quick = spec.quick
                    if quick is not None and _QUICK_LANE and lu.reserved_by is None \
                            and not lu.pr.state.registrations and not self.port_groups.standby_ports:
                        # The quick lane: every pre-dispatch check is known
                        # to pass (_DECIDED_QUICK), and the handler's
                        # synchronous half answers with no Command, no
                        # coroutine and no task (a READ from the page cache:
                        # what queue depth 1 latency is made of).
                        try:
                            data = quick(lu, cdb)
                        except ScsiError as err:
                            result = ScsiResult(_CHECK_CONDITION, b"", err.sense, 0)
                        except Exception:  # not ours to report: the generic path runs it again and does
                            result = None
                        else:
                            result = ScsiResult(_GOOD, data, b"", 0) if data is not None else None
                        if result is not None:
                            obs = self.observer
                            if obs is not None:
                                obs(task, result, None)     # answered at once
                            done(result)
                            return _COMPLETED
                    return self._submit_inline(lu, spec, task, done, loop)
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
        finished = partial(self._finished, task, done, obs, t0, None, None)
        if runner.done():
            # Finished in its first step (no wait): answer now, in the same
            # loop iteration that received the command.
            finished(runner)
        else:
            runner.add_done_callback(finished)
        return runner

    def _submit_inline(self, lu: LogicalUnit, spec: OpSpec, task: ScsiTask,
                       done: Callable[[ScsiResult | None], None], loop):
        """Run a command whose skipped checks are known to pass (see submit)
        straight from the caller: no asyncio task, no task-set entry and no
        future unless it has to wait.  A READ served from the page cache or a
        write taken by a cache completes here, in the data_received that
        brought it.  The remaining pre-dispatch checks (reservations, and any
        check added to PRE_DISPATCH later) run as usual, in their order, so
        the result is the generic path's to the byte."""
        cmd = Command(task, lu, self, spec, None)
        # The first step of _handle, unrolled (same checks, same mapping of
        # errors): no coroutine of our own around the handler's.
        try:
            for check in _INLINE_CHECKS:
                result = check(cmd)
                if result is not None:
                    break
            else:
                coro = spec.handler(cmd)
                try:
                    waiting_on = coro.send(None)
                except StopIteration as stop:
                    result = _as_result(stop.value, cmd)
                else:
                    return self._inline_waits(lu, task, cmd, coro, waiting_on, done, loop)
        except ScsiError as err:
            result = ScsiResult(Status.CHECK_CONDITION, sense=err.sense, data_out_wanted=cmd.data_out_wanted)
        except asyncio.CancelledError:
            done(None)
            return _COMPLETED
        except Exception:  # a bug, or a backend failure outside the mapped paths
            result = self._internal_failure(cmd)
        obs = self.observer
        if obs is not None:
            obs(task, result, None)     # answered at once
        done(result)
        return _COMPLETED

    def _inline_waits(self, lu: LogicalUnit, task: ScsiTask, cmd: Command, coro, waiting_on, done, loop):
        """The inline command waits (a disk read, the write gate, a flush):
        register it now, as begin() would have before it started
        (runs_at_once: the tag is free and it waits for nothing), so task
        management can abort it, and let a task finish it."""
        obs = self.observer
        t0 = loop.time() if obs is not None else 0.0    # the same step it started in
        entry = lu.tasks.begin(task.nexus, task.tag, task.attribute)
        runner = eager.start(self._handle(cmd, (), _Started(coro, waiting_on)), loop)
        entry.task = runner
        finished = partial(self._finished, task, done, obs, t0, lu, entry)
        if runner.done():
            finished(runner)
        else:
            runner.add_done_callback(finished)
        return runner

    def _finished(self, task: ScsiTask, done, obs, t0: float, lu: LogicalUnit | None, entry: TaskEntry | None,
                  t) -> None:
        """A command's task ended: hand the result (None: aborted) to the fabric."""
        if entry is not None:
            lu.tasks.end(entry)
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

    async def _run(self, lu: LogicalUnit, entry: TaskEntry, task: ScsiTask) -> ScsiResult:
        try:
            if entry.waits_for:
                await TaskSet.wait_turn(entry)
            return await self._dispatch(task, lu)
        finally:
            lu.tasks.end(entry)

    async def _dispatch(self, task: ScsiTask, lu: LogicalUnit | None) -> ScsiResult:
        spec, lookup_error = resolve(self.commands, task.cdb)
        return await self._handle(Command(task, lu, self, spec, lookup_error), PRE_DISPATCH)

    async def _handle(self, cmd: Command, checks, started=None) -> ScsiResult:
        """Run ``checks`` (pre-dispatch), then the handler (or finish its
        ``started`` coroutine); every error becomes CHECK CONDITION with its
        sense data."""
        try:
            if started is None:
                for check in checks:
                    early = check(cmd)
                    if early is not None:
                        return early
                spec = cmd.spec
                assert spec is not None
                reply = await spec.handler(cmd)
            else:
                reply = await started
        except ScsiError as err:
            return ScsiResult(Status.CHECK_CONDITION, sense=err.sense, data_out_wanted=cmd.data_out_wanted)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, or a backend failure outside the mapped paths
            return self._internal_failure(cmd)
        return _as_result(reply, cmd)

    def _internal_failure(self, cmd: Command) -> ScsiResult:
        task = cmd.task
        log.exception("%s: LUN %d: command %s failed", self.name, task.lun, task.cdb[:1].hex())
        return ScsiResult(
            Status.CHECK_CONDITION,
            sense=build_sense(Reason.INTERNAL_TARGET_FAILURE),
            data_out_wanted=cmd.data_out_wanted,
        )

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
        """SAM-5 §7.9 (warm) / iSCSI TARGET COLD RESET: a LU reset of every LU
        the issuer can see (LUN masking); UA 29/02 (warm) or 29/01 POWER ON
        OCCURRED (cold) to every nexus, the
        issuer's included (SAM-5 §6.3.2 hard reset)."""
        reason = Reason.POWER_ON_OCCURRED if cold else Reason.SCSI_BUS_RESET_OCCURRED
        entries: list[TaskEntry] = []
        for lun_id, lu in self.luns.items():
            # LUN masking: an initiator cannot reset (abort the commands of,
            # drop the SPC-2 reservation of) a LU it is not allowed to see.
            if self._views and self.lu_for(nexus, lun_id) is None:
                continue
            entries += self._reset_lu(lu)
            lu.unit_attentions.establish_all(reason)
        await TaskSet.abort(entries)
        return TmfResponse.COMPLETE

    async def close(self) -> None:
        """Flush and close every backend; errors are logged, not raised, so
        one failing image does not keep the others open."""
        for lu in self.luns.values():
            await lu.stop_sharing()
            try:
                await lu.backend.flush()
            except Exception:
                log.exception("%s: LUN %d: flush on close failed", self.name, lu.lun_id)
            try:
                await lu.backend.close()
            except Exception:
                log.exception("%s: LUN %d: close failed", self.name, lu.lun_id)
