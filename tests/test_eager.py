import asyncio

import pytest

from pyiscsi_target.eager import EagerTask, start


async def quick(x):
    return x * 2


async def waits(fut, log):
    log.append("before")
    v = await fut
    log.append(("after", v))
    return v + 1


async def test_a_coroutine_that_never_waits_is_done_at_once():
    t = start(quick(21), asyncio.get_running_loop())
    assert t.done() and t.result() == 42


async def test_a_coroutine_that_waits_is_adopted_by_a_task_and_gets_the_result():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    log = []
    t = EagerTask(waits(fut, log), loop)
    assert log == ["before"] and not t.done()
    got = []
    t.add_done_callback(lambda x: got.append(x.result()))
    fut.set_result(5)
    for _ in range(5):
        await asyncio.sleep(0)
    assert t.done() and t.result() == 6 and log == ["before", ("after", 5)] and got == [6]


async def test_cancel_while_waiting_reaches_the_coroutine_at_its_await():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    log = []

    async def guarded():
        try:
            await fut
        except asyncio.CancelledError:
            log.append("cancelled inside")
            raise

    t = EagerTask(guarded(), loop)
    assert t.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert t.done() and t.cancelled() and log == ["cancelled inside"]
    with pytest.raises(asyncio.CancelledError):
        t.result()


async def test_exception_in_first_step_is_reported_not_raised():
    async def boom():
        raise ValueError("x")

    t = EagerTask(boom(), asyncio.get_running_loop())
    assert t.done() and isinstance(t.exception(), ValueError)


async def test_bare_yield_is_adopted():
    async def yields():
        await asyncio.sleep(0)
        return "ok"

    t = EagerTask(yields(), asyncio.get_running_loop())
    assert not t.done()
    for _ in range(5):
        await asyncio.sleep(0)
    assert t.result() == "ok"
