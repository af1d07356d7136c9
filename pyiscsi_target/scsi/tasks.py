"""The task set of one logical unit: registration, ordering, abort.

SAM-5 §8.6-8.9: SIMPLE tasks may run in any order among themselves; an
ORDERED task starts only when every older task has ended, and no younger
SIMPLE task starts before it ends; a HEAD OF QUEUE task starts at once.  One
task set is shared by all I_T nexuses (TST=000b in the Control mode page), so
the bookkeeping here is per LU.  Each entry holds the asyncio task executing
the command so a task management function can cancel it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from .command import Nexus, TaskAttribute

__all__ = ["TaskEntry", "TaskSet"]

_ORDERED = TaskAttribute.ORDERED   # a global: cheaper than the Enum attribute, per command


@dataclass(slots=True, eq=False)
class TaskEntry:
    nexus: Nexus
    tag: int
    attribute: TaskAttribute
    waits_for: tuple[TaskEntry, ...]
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[Nexus, int]:
        return (self.nexus, self.tag)


class TaskSet:
    """Tasks registered on one LU, oldest first (dicts keep insertion order)."""

    __slots__ = ("_entries", "_ordered")

    def __init__(self) -> None:
        self._entries: dict[tuple[Nexus, int], TaskEntry] = {}
        self._ordered = 0   # ORDERED tasks in the set: none (the usual case) means no scan

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, nexus: Nexus, tag: int, attribute: TaskAttribute) -> TaskEntry | None:
        """Register a new task; None if the tag is already in use (SAM-5 §5.10 overlapped)."""
        key = (nexus, tag)
        if key in self._entries:
            return None
        if attribute == TaskAttribute.HEAD_OF_QUEUE:
            waits: tuple[TaskEntry, ...] = ()
        elif attribute == TaskAttribute.ORDERED:
            waits = tuple(self._entries.values())
        elif self._ordered:  # SIMPLE, UNTAGGED, ACA: only older ORDERED tasks block them
            waits = tuple(e for e in self._entries.values() if e.attribute == TaskAttribute.ORDERED)
        else:
            waits = ()
        entry = TaskEntry(nexus, tag, attribute, waits)
        self._entries[key] = entry
        if attribute == TaskAttribute.ORDERED:
            self._ordered += 1
        return entry

    def runs_at_once(self, nexus: Nexus, tag: int, attribute: TaskAttribute) -> bool:
        """True when :meth:`begin` would accept this task with nothing to wait
        for: the tag is free and no ORDERED task is in the set (nor is this
        one).  Such a task may run its first step before it is registered and
        register only if it has to wait (ScsiTargetDevice.submit): nothing
        can look at the set while that step runs, so it is indistinguishable
        from registering first."""
        return not self._ordered and attribute != _ORDERED and (nexus, tag) not in self._entries

    @staticmethod
    async def wait_turn(entry: TaskEntry) -> None:
        for earlier in entry.waits_for:
            if not earlier.done.is_set():
                await earlier.done.wait()
        entry.waits_for = ()  # let finished entries be collected

    def end(self, entry: TaskEntry) -> None:
        """Idempotent: the entry leaves the set and wakes tasks waiting on it."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            if entry.attribute == TaskAttribute.ORDERED:
                self._ordered -= 1
        entry.done.set()

    def find(self, nexus: Nexus, tag: int) -> TaskEntry | None:
        return self._entries.get((nexus, tag))

    def select(self, predicate: Callable[[TaskEntry], bool] = lambda e: True) -> list[TaskEntry]:
        return [e for e in self._entries.values() if predicate(e)]

    @staticmethod
    async def abort(entries: list[TaskEntry]) -> None:
        """Cancel the tasks and wait until each has stopped (SAM-5 §7.2: the
        TMF completes only once the aborted tasks can have no more effect on
        the medium visible to the initiator)."""
        for e in entries:
            if e.task is not None and not e.task.done():
                e.task.cancel()
        for e in entries:
            await e.done.wait()
