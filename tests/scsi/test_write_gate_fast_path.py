"""WriteGate's non-awaiting fast path used by every WRITE."""

import asyncio

from pyiscsi_target.scsi.lun import WriteGate


async def test_try_shared_only_when_nothing_exclusive_holds_or_waits():
    g = WriteGate()
    assert g.try_shared()
    assert g.try_shared()
    excl = asyncio.ensure_future(g._acquire(True))      # waits: two shared holders
    await asyncio.sleep(0)
    assert not excl.done()
    assert not g.try_shared()                            # a waiting exclusive blocks new shared holders
    g.release_shared()
    g.release_shared()
    await asyncio.sleep(0)
    assert excl.done()                                   # granted once the shared holders left
    assert not g.try_shared()                            # exclusive held
    g._release(True)
    assert g.try_shared()
