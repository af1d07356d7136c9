"""Bad input against the live server: the precise RFC answer, one log line, and a
second initiator (QEMU, copying data) that never notices."""

from __future__ import annotations

import os
import subprocess

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.pdu import F_FINAL, F_TRANSIT, F_WRITE, LoginRequest, NopOut, Reject, ScsiCommand
from tests.conftest import require
from tests.support.initiator import Initiator
from tests.support.target import DATA, QUORUM

MiB = 1024 * 1024
READ10_1 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])


def _session(target, name="iqn.2026-11.test:bad", isid=bytes.fromhex("400001370001")):
    ini = Initiator(target.host, target.port, name=name, isid=isid)
    ini.login(QUORUM)
    return ini


def test_bad_pdus_hurt_no_other_session(target, tmp_path):
    require("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(32 * MiB))
    dst = (f"driver=iscsi,transport=tcp,portal={target.portal},target={DATA},lun=0,"
           f"initiator-name=iqn.2026-11.test:good")
    copier = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts",
                               str(src), dst], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # 1. A garbage opcode: Reject "command not supported" with the header echoed; session goes on.
        ini = _session(target)
        raw = bytearray(NopOut(itt=0x77, cmdsn=ini.cmdsn).encode(0))
        raw[0] = 0x1D
        ini.send_raw(bytes(raw))
        rec = ini.recv()
        assert isinstance(rec.bhs, Reject) and rec.bhs.reason == 0x05 and rec.data[:48] == bytes(raw)
        assert ini.nop(b"still here") == b"still here"

        # 2. A data segment longer than our MaxRecvDataSegmentLength: Reject "protocol error".
        mrdsl = int(ini.params["MaxRecvDataSegmentLength"])
        ini.send(ScsiCommand(flags=F_FINAL | F_WRITE | 1, itt=0x99, expected_length=mrdsl + 4096, cmdsn=ini.cmdsn,
                             cdb=bytes([0x2A]) + bytes(15)), bytes(mrdsl + 4096))
        ini.cmdsn += 1
        rec = ini.recv()
        assert isinstance(rec.bhs, Reject) and rec.bhs.reason == 0x04
        assert ini.nop(b"x") == b"x"

        # 3. A CmdSN far outside the window: silently ignored (RFC 7143 §4.2.2.1) ...
        ini.send(NopOut(opbyte=0x00, itt=0x55, cmdsn=(ini.cmdsn + 100000) & 0xFFFFFFFF, expstatsn=ini.expstatsn),
                 b"lost")
        # ... so the next in-window command is the first answer we get: the new
        # nexus' POWER ON, RESET unit attention (29/00), then the read.
        r = ini.command(bytes(6))
        assert r.status == 2 and r.sense[2] & 0x0F == 6 and r.sense[12:14] == b"\x29\x00", r
        r = ini.command(READ10_1, read=512)
        assert r.status == 0 and len(r.data) == 512
        ini.logout()
        ini.close()

        # 4. A login without InitiatorName: Login Response "missing parameter" 0x0207, then closed.
        bad = Initiator(target.host, target.port)
        req = LoginRequest(flags=F_TRANSIT | 0x01, isid=bytes.fromhex("400001370002"), itt=1, cid=1, cmdsn=1)
        bad.send(req, keys.encode_text([("SessionType", "Normal"), ("TargetName", QUORUM), ("AuthMethod", "None")]))
        rsp = bad.recv().bhs
        assert (rsp.status_class, rsp.status_detail) == (0x02, 0x07)
        assert bad.closed_by_target()
        bad.close()

        # 5. Garbage before any login: the connection is closed, nothing else happens.
        junk = Initiator(target.host, target.port)
        junk.send_raw(os.urandom(4096))
        assert junk.closed_by_target()
        junk.close()

        out, err = copier.communicate(timeout=300)
        assert copier.returncode == 0, err
    finally:
        if copier.poll() is None:
            copier.kill()
            copier.wait()
    back = subprocess.run(["qemu-img", "compare", "--image-opts", f"driver=file,filename={src}", dst],
                          capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stdout + back.stderr
    log = target.log_text()
    assert "unknown opcode 0x1d" in log
    assert "longer than MaxRecvDataSegmentLength" in log
    assert "outside window" in log
    assert "InitiatorName missing" in log


def test_header_and_data_digests_with_our_initiator(target):
    """libiscsi 1.19 offers no DataDigest, so our own client proves CRC32C data digests."""
    ini = Initiator(target.host, target.port, isid=bytes.fromhex("400001370003"))
    ops = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "8192"),
           ("ImmediateData", "Yes"), ("InitialR2T", "No"), ("FirstBurstLength", "8192"), ("MaxBurstLength", "16384")]
    a = ini.login(DATA, operational_keys=ops)
    assert a["HeaderDigest"] == "CRC32C" and a["DataDigest"] == "CRC32C"
    assert ini.clear_unit_attentions() == [b"\x29\x00"]
    payload = os.urandom(64 * 1024)
    w = ini.command(bytes([0x2A, 0, 0, 0, 0, 0x10, 0, 0, 128, 0]), write=payload)
    assert w.status == 0, w
    r = ini.command(bytes([0x28, 0, 0, 0, 0, 0x10, 0, 0, 128, 0]), read=len(payload))
    assert r.status == 0 and r.data == payload
    # A corrupted data digest on a NOP-Out: Reject "data digest error", session continues.
    hdr = NopOut(opbyte=0x00, itt=0x1234, cmdsn=ini.cmdsn, expstatsn=ini.expstatsn)
    from pyiscsi_target.iscsi.framing import encode_pdu
    bufs = [bytearray(bytes(b)) for b in encode_pdu(hdr.encode(4), b"ping", header_digest=True, data_digest=True)]
    bufs[-1][-1] ^= 0xFF
    ini.send_raw(b"".join(bytes(b) for b in bufs))
    rec = ini.recv()
    assert isinstance(rec.bhs, Reject) and rec.bhs.reason == 0x02
    ini.cmdsn += 1   # the rejected NOP consumed its CmdSN
    assert ini.nop(b"ok") == b"ok"
    # A corrupted header digest: the connection is dropped (RFC 7143 §7.8, ERL 0).
    bufs = [bytearray(bytes(b)) for b in encode_pdu(NopOut(itt=1, cmdsn=ini.cmdsn).encode(0), b"",
                                                   header_digest=True)]
    bufs[0][50] ^= 0xFF
    ini.send_raw(b"".join(bytes(b) for b in bufs))
    assert ini.closed_by_target()
    ini.close()
    assert "header digest error" in target.log_text()
