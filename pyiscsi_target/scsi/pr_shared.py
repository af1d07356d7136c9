"""Reservations of one LU kept coherent across several gateways.

Several target processes (gateways) can export the same logical unit -- an
RBD image -- each as its own target port.  SPC-4 makes the reservation state
a property of the *logical unit* (§5.12: registrations and the reservation
are seen through every target port), so a REGISTER, RESERVE or PREEMPT made
through one gateway must bind every other gateway before its status returns.
ceph-iscsi over LIO does not do this; a Windows failover cluster needs it.

The design is one authoritative, versioned record per LU, and local copies:

* The record (PR state and the SPC-2 RESERVE holder) lives in a
  :class:`SharedObject` -- outside the SCSI core; for Ceph one RADOS object
  written with compare-and-swap on its version.  A state change is: read the
  record, decide with the pure state machine (:mod:`.pr`), write it back only
  if nobody wrote in between (else read again and decide again).
* Each gateway checks commands against its local copy (``lu.pr.state``,
  ``lu.reserved_by``): the per-command check stays one attribute read.
* After a successful write the gateway *announces* the change with its
  effects; every other gateway adopts the new record, queues the unit
  attentions for its own nexuses and, for PREEMPT AND ABORT, aborts their
  tasks, and only then acknowledges.  The announcing command completes after
  every live gateway acknowledged (RADOS notify/ack), which is what makes the
  reservation enforced everywhere before the initiator sees GOOD.
* A gateway that dies takes its nexuses' tasks with it but not the
  registrations, which are in the record.  A gateway that lost contact with
  the shared object re-reads the record before trusting its copy again
  (:meth:`SharedReservations.resync`).

Nothing here knows RADOS or iSCSI: the object is bytes with a version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from . import pr
from .command import Nexus
from .sense import Reason
from .tasks import TaskSet

if TYPE_CHECKING:
    from .lun import LogicalUnit

__all__ = ["SharedObject", "SharedReservations", "encode_record", "decode_record", "Decision"]

log = logging.getLogger(__name__)

#: What a decision function returns: the new PR state, the new SPC-2 holder
#: and the effects to apply once the change is committed.
Decision = tuple[pr.PrState, Nexus | None, pr.Effects]


class SharedObject(Protocol):
    """A small versioned record several processes share (one per LU)."""

    async def load(self) -> tuple[bytes | None, int]:
        """(content or None when it does not exist yet, its version)."""

    async def store(self, data: bytes, version: int) -> int | None:
        """Replace the content if its version is still ``version`` (0: the
        record must not exist yet); the new version, or None when another
        writer came first."""

    async def announce(self, message: bytes) -> None:
        """Deliver ``message`` to every other process listening, returning
        once each live one has handled it (or a timeout, logged)."""

    async def listen(self, on_message: Callable[[bytes], Awaitable[None]],
                     on_lost: Callable[[], Awaitable[None]]) -> None:
        """Start calling ``on_message`` (on this event loop, one at a time,
        acknowledging after it returns) and ``on_lost`` when messages may
        have been missed."""

    async def close(self) -> None: ...

    def status(self) -> dict:
        """For ``pyiscsi-target status``: where the record is ("record"), how
        many other processes listen ("gateways"), whom this one fenced
        ("fenced": {id: address})."""


# --- the record and the change notices -----------------------------------------


def _nexus_doc(n: Nexus | None) -> list | None:
    if n is None:
        return None
    return [n.initiator_port, n.target_port, n.relative_port_id, n.transport_id.hex()]


def _nexus_from_doc(d: list | None) -> Nexus | None:
    if d is None:
        return None
    return Nexus(str(d[0]), str(d[1]), int(d[2]), bytes.fromhex(d[3]))


def encode_record(state: pr.PrState, holder: Nexus | None) -> bytes:
    return json.dumps({"pr": pr.state_doc(state), "scsi2_holder": _nexus_doc(holder)}, sort_keys=True).encode()


def decode_record(data: bytes) -> tuple[pr.PrState, Nexus | None]:
    """ValueError when the record is malformed."""
    try:
        doc = json.loads(data)
        state = pr.state_from_doc(doc["pr"])
        holder = _nexus_from_doc(doc["scsi2_holder"])
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"malformed shared reservation record: {e!r}") from None
    return state, holder


def _encode_notice(origin: str, version: int, record: bytes, sender: Nexus | None,
                   effects: pr.Effects) -> bytes:
    return json.dumps({
        "origin": origin,
        "version": version,
        "record": record.decode(),
        "sender": _nexus_doc(sender),
        "unit_attentions": [[pr.registration_doc(r), reason.name] for r, reason in effects.unit_attentions],
        "abort": [pr.registration_doc(r) for r in effects.abort],
    }).encode()


# --- applying a committed change -------------------------------------------------


def deliver_unit_attentions(lu: LogicalUnit, sender: Nexus | None,
                            uas: list[tuple[pr.Registration, Reason]]) -> None:
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


async def apply_effects(lu: LogicalUnit, sender: Nexus | None, effects: pr.Effects) -> None:
    deliver_unit_attentions(lu, sender, effects.unit_attentions)
    if effects.abort:
        # SPC-4 §5.12.11.5: PREEMPT AND ABORT aborts every task of the
        # preempted I_T nexuses (as CLEAR TASK SET would, TAS=0: no status).
        victims = effects.abort
        entries = lu.tasks.select(lambda e: e.nexus != sender and any(r.matches(e.nexus) for r in victims))
        await TaskSet.abort(entries)


# --- the coordinator --------------------------------------------------------------


class SharedReservations:
    """Keeps ``lu.pr.state`` / ``lu.reserved_by`` in step with a shared record."""

    def __init__(self, lu: LogicalUnit, obj: SharedObject, *, name: str = "") -> None:
        self.lu = lu
        self.obj = obj
        self.name = name or f"LUN {lu.lun_id}"
        #: Identifies this process's notices (its own come back to it too).
        self.origin = uuid.uuid4().hex
        self.version = 0
        self._background: set[asyncio.Task] = set()

    # life cycle

    async def start(self, *, own_port: Callable[[str], bool] | None = None) -> None:
        """Listen first, then read: a change made in between is then either
        in what we read or in a notice we get (never lost).  A SPC-2
        reservation held through one of this gateway's own ports cannot
        have survived its restart (SPC-2 §5.5.3: nexus loss releases it)."""
        await self.obj.listen(self._on_message, self.resync)
        await self.resync()
        if self.lu.reserved_by is not None and own_port is not None and own_port(self.lu.reserved_by.target_port):
            log.info("%s: releasing the SPC-2 reservation %s held before this gateway restarted",
                     self.name, self.lu.reserved_by.initiator_port)
            await self.transact(None, lambda s, h: (s, None, pr.Effects()))

    async def close(self) -> None:
        for t in list(self._background):
            await asyncio.wait([t])
        await self.obj.close()

    async def resync(self) -> None:
        """Adopt the authoritative record (start, lost notices, PR IN)."""
        data, version = await self.obj.load()
        if data is None:
            return
        self._adopt(data, version)

    def _adopt(self, data: bytes, version: int) -> bool:
        if version <= self.version:
            return False
        try:
            state, holder = decode_record(data)
        except ValueError as e:
            # Keep enforcing what we had rather than drop a cluster's keys.
            log.error("%s: shared reservation record version %d unreadable: %s", self.name, version, e)
            return False
        self.version = version
        self.lu.pr.state = state
        self.lu.reserved_by = holder
        return True

    def status(self) -> dict:
        return {"version": self.version, **self.obj.status()}

    # changes made here

    async def transact(self, sender: Nexus | None,
                       decide: Callable[[pr.PrState, Nexus | None], Decision]) -> None:
        """Read, decide, compare-and-swap, announce, apply.  ``decide`` may
        raise (RESERVATION CONFLICT, CHECK CONDITION): nothing is written."""
        while True:
            data, version = await self.obj.load()
            if data is not None:
                # An unreadable record raises ValueError: refuse the change
                # rather than overwrite a cluster's keys with a guess.
                state, holder = decode_record(data)
                self._adopt(data, version)
            else:
                state, holder = pr.PrState(), None
            d = decide(state, holder)
            if d[0] is state and d[1] == holder:
                return
            new_state, new_holder, effects = d
            record = encode_record(new_state, new_holder)
            new_version = await self.obj.store(record, version)
            if new_version is None:
                continue  # another gateway wrote first: decide again on its result
            break
        if new_version > self.version:
            self.version = new_version
            self.lu.pr.state = new_state
            self.lu.reserved_by = new_holder
        await self.obj.announce(_encode_notice(self.origin, new_version, record, sender, effects))
        await apply_effects(self.lu, sender, effects)

    def release_scsi2_later(self, only: Nexus | None) -> None:
        """Nexus loss or reset (synchronous callers): release the SPC-2
        reservation in the record too, if ``only`` (None: anyone) holds it."""

        def decide(state: pr.PrState, holder: Nexus | None) -> Decision:
            if holder is None or (only is not None and holder != only):
                return state, holder, pr.Effects()
            return state, None, pr.Effects()

        async def run() -> None:
            try:
                async with self.lu.pr_lock:
                    await self.transact(None, decide)
            except Exception:
                log.exception("%s: releasing the SPC-2 reservation in the shared record failed", self.name)

        t = asyncio.get_running_loop().create_task(run())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # changes made elsewhere

    async def _on_message(self, message: bytes) -> None:
        try:
            doc = json.loads(message)
            if doc.get("origin") == self.origin:
                return
            version = int(doc["version"])
            record = str(doc["record"]).encode()
            sender = _nexus_from_doc(doc["sender"])
            effects = pr.Effects(
                unit_attentions=[(pr.registration_from_doc(r), Reason[name]) for r, name in doc["unit_attentions"]],
                abort=[pr.registration_from_doc(r) for r in doc["abort"]],
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            log.error("%s: unreadable reservation notice (%s); re-reading the record", self.name, e)
            await self.resync()
            return
        self._adopt(record, version)
        await apply_effects(self.lu, sender, effects)
