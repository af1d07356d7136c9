"""APTPL state under kill -9: the reservation file is always the old or the
new state, never a torn one, and the restarted server serves exactly it.

A libiscsi client changes its key with REGISTER (APTPL=1) as fast as the
server answers, while the test kills the server with SIGKILL after a random
delay -- a bounded number of times.  After each kill the file on disk must
decode, and hold either the last key the client saw acknowledged or the one
in flight (SPC-4 §5.12.5: an acknowledged APTPL change is on stable storage).
"""

from __future__ import annotations

import random
import signal
import threading

from pyiscsi_target.pr_store import pr_state_path
from pyiscsi_target.scsi import pr
from tests.support.libiscsi_client import GOOD, LibIscsi, LibIscsiError
from tests.support.target import DATA, free_port, start_target, write_config

NODE = "iqn.1991-05.com.microsoft:node1"
KILLS = 10
REGISTER, REGISTER_IGNORE = 0, 6


def test_kill_9_during_pr_out_never_tears_state(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    path = pr_state_path(tmp_path / "state", DATA, 0)
    rng = random.Random(5)
    key = 0x1000
    t = start_target(cfg, "127.0.0.1", port)
    try:
        c = LibIscsi(t.portal, DATA, NODE)
        c.unit_attentions()
        assert c.prout(REGISTER_IGNORE, sark=key, aptpl=True).status == GOOD
        c.drop()
        for round_ in range(KILLS):
            acked = [key]
            stop = threading.Event()

            def churn():
                try:
                    cl = LibIscsi(t.portal, DATA, NODE)
                    cl.unit_attentions()
                    while not stop.is_set():
                        nxt = acked[-1] + 1
                        r = cl.prout(REGISTER, rk=acked[-1], sark=nxt, aptpl=True)
                        assert r.status == GOOD, r
                        acked.append(nxt)
                except LibIscsiError:
                    pass  # the server died under us: expected

            worker = threading.Thread(target=churn)
            worker.start()
            # Let some PR OUTs complete, then kill at a random moment.
            threading.Event().wait(rng.uniform(0.15, 0.5))
            t.proc.send_signal(signal.SIGKILL)
            t.proc.wait()
            stop.set()
            worker.join(20)
            assert not worker.is_alive()
            assert len(acked) > 1, "no PR OUT completed before the kill; the test proves nothing"
            state = pr.decode(path.read_bytes())  # never torn: decodes, validated
            assert state.aptpl and len(state.registrations) == 1
            on_disk = state.registrations[0].key
            assert on_disk in (acked[-1], acked[-1] + 1), (round_, hex(on_disk), hex(acked[-1]))
            t = start_target(cfg, "127.0.0.1", port, log_name=f"server{round_}.log")
            assert not list(path.parent.glob(f".{path.name}.*.tmp"))
            c = LibIscsi(t.portal, DATA, NODE)
            c.unit_attentions()
            gen, keys = c.read_keys()
            assert keys == [on_disk] and gen == state.generation
            c.drop()
            key = on_disk
    finally:
        t.stop()
