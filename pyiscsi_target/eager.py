"""Start a coroutine now; give it an asyncio Task only if it has to wait.

Most SCSI commands on a fast path never wait: a read served from the page
cache (RWF_NOWAIT) or tmpfs, a write taken by the write-back cache, INQUIRY,
TEST UNIT READY.  Running their first step synchronously, inside the
``data_received`` that brought the command, saves creating a Task and two
event-loop iterations per command, which at queue depth 32 is a large part of
the per-command cost.  Python 3.12's ``eager_start`` does the same natively;
this is the 3.11 equivalent.

How it stays correct: when the coroutine suspends on an asyncio future, a real
Task adopts it only once that future is done, so the Task's first step resumes
``Future.__await__`` with the result ready.  ``cancel()`` before adoption
cancels the awaited future, exactly what ``Task.cancel()`` would do, and the
CancelledError reaches the coroutine at that same await.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

_NATIVE = sys.version_info >= (3, 12)


class EagerTask:
    __slots__ = ("_loop", "_coro", "_waiter", "_task", "_done", "_result", "_exc", "_cancelled",
                 "_callbacks", "_must_cancel")

    def __init__(self, coro: Coroutine, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._coro = coro
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None
        self._cancelled = False
        self._callbacks: list[Callable] = []
        self._must_cancel = False
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            self._done, self._result = True, stop.value
            return
        except asyncio.CancelledError:
            self._done = self._cancelled = True
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # reported to the done callbacks, like a Task
            self._done, self._exc = True, exc
            return
        if getattr(yielded, "_asyncio_future_blocking", None):
            yielded._asyncio_future_blocking = False
            self._waiter = yielded
            yielded.add_done_callback(self._adopt)
        elif yielded is None:            # a bare yield (asyncio.sleep(0))
            loop.call_soon(self._adopt, None)
        else:
            coro.throw(RuntimeError(f"coroutine yielded {yielded!r}, not an asyncio future"))

    def _adopt(self, _fut) -> None:
        self._waiter = None
        task = self._loop.create_task(self._coro)
        self._task = task
        if self._must_cancel:
            task.cancel()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._done = True
        if task.cancelled():
            self._cancelled = True
        else:
            self._exc = task.exception()
            if self._exc is None:
                self._result = task.result()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    # -- the parts of the Future/Task API that callers use ---------------------
    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        if self._done:
            return False
        if self._task is not None:
            return self._task.cancel()
        self._must_cancel = True
        if self._waiter is not None:
            self._waiter.cancel()
        return True

    def result(self):
        if self._cancelled:
            raise asyncio.CancelledError()
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self) -> BaseException | None:
        if self._cancelled:
            raise asyncio.CancelledError()
        return self._exc

    def add_done_callback(self, fn: Callable) -> None:
        if self._done:
            self._loop.call_soon(fn, self)
        else:
            self._callbacks.append(fn)


def start(coro: Coroutine, loop: asyncio.AbstractEventLoop):
    """An eagerly started task: ``done()`` may already be true on return."""
    if _NATIVE:
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return EagerTask(coro, loop)
