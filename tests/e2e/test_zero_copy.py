"""Zero-copy READs (payload.py): an image in memory (tmpfs, /dev/shm) sends
large READs with sendfile.  Real clients read it back exactly; a WRITE that
runs after a READ completed never shows through in that READ's data, even
when both arrive in one TCP segment and the READ's answer is still queued."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from pyiscsi_target.iscsi.framing import encode_pdu
from pyiscsi_target.iscsi.pdu import F_FINAL, F_READ, F_WRITE, DataIn, ScsiCommand, ScsiResponse, int_to_lun
from tests.conftest import require
from tests.support.gateways import write_gateway_config
from tests.support.initiator import Initiator, default_operational_keys
from tests.support.target import free_port, start_target

IQN = "iqn.2026-11.org.example:shm"
MiB = 1 << 20
SHM = Path("/dev/shm")


@pytest.fixture
def shm_target(tmp_path):
    if not SHM.is_dir():
        pytest.fail("/dev/shm (tmpfs) is missing")
    d = Path(tempfile.mkdtemp(prefix="pyiscsi-zc-", dir=SHM))
    port = free_port()
    lun = f'  [[target.lun]]\n  id = 0\n  path = "{d / "disk.img"}"\n  size = "32MiB"\n'
    cfg = write_gateway_config(tmp_path, IQN, lun, port=port, name="target.toml")
    t = start_target(cfg, "127.0.0.1", port)
    try:
        yield t, d / "disk.img"
    finally:
        assert t.stop() == 0, t.log_text()[-3000:]
        shutil.rmtree(d, ignore_errors=True)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def test_qemu_img_round_trip_through_sendfile(shm_target, tmp_path):
    t, _ = shm_target
    require("qemu-img")
    src = tmp_path / "rand.raw"
    src.write_bytes(os.urandom(32 * MiB))
    opts = f"driver=iscsi,transport=tcp,portal={t.portal},target={IQN},lun=0,initiator-name=iqn.2026-11.test:zc"
    subprocess.run([require("qemu-img"), "convert", "-n", "-f", "raw", "--target-image-opts", str(src), opts],
                   check=True, capture_output=True, timeout=120)
    p = subprocess.run([require("qemu-img"), "compare", "--image-opts", f"driver=file,filename={src}", opts],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "identical" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("digests", [False, True])
@pytest.mark.parametrize("blocks", [128, 256, 2048])  # 64 KiB (one PDU), 128 KiB and 1 MiB (segmented)
def test_large_reads_are_exact(shm_target, blocks, digests):
    t, img = shm_target
    ini = Initiator("127.0.0.1", t.port, name="iqn.2026-11.test:zc-reads")
    try:
        keys = default_operational_keys()
        if digests:  # CRC32C on header and data: the payload is hashed, so it is bytes by then
            keys = [(k, "CRC32C" if k in ("HeaderDigest", "DataDigest") else v) for k, v in keys]
        ini.login(IQN, operational_keys=keys)
        assert ini.header_digest is digests and ini.data_digest is digests
        ini.clear_unit_attentions()
        data = os.urandom(blocks * 512)
        assert ini.command(write10(1000, blocks), write=data).status == 0
        for _ in range(3):
            r = ini.command(read10(1000, blocks), read=len(data))
            assert r.status == 0 and hashlib.sha256(r.data).digest() == hashlib.sha256(data).digest()
        assert os.pread(os.open(img, os.O_RDONLY), len(data), 1000 * 512) == data
    finally:
        ini.close()


def test_write_after_a_completed_read_does_not_change_its_data(shm_target):
    """READ (SIMPLE) and then WRITE (ORDERED: runs only after the READ has
    completed) of the same blocks in one send: the READ returns the blocks as
    they were before the WRITE."""
    t, _ = shm_target
    ini = Initiator("127.0.0.1", t.port, name="iqn.2026-11.test:zc-order")
    try:
        ini.login(IQN)
        ini.clear_unit_attentions()
        old, new = b"\x11" * 65536, b"\x22" * 65536
        assert ini.command(write10(0, 128), write=old).status == 0
        read_itt, write_itt = ini.next_itt(), ini.next_itt()
        lun = int_to_lun(0)
        read_cmd = ScsiCommand(flags=F_FINAL | F_READ | 1, lun=lun, itt=read_itt, expected_length=65536,
                               cmdsn=ini.cmdsn, expstatsn=ini.expstatsn, cdb=read10(0, 128).ljust(16, b"\0"))
        # ORDERED (attribute 2); its 64 KiB ride as immediate data (FirstBurstLength 65536).
        write_cmd = ScsiCommand(flags=F_FINAL | F_WRITE | 2, lun=lun, itt=write_itt, expected_length=65536,
                                cmdsn=ini.cmdsn + 1, expstatsn=ini.expstatsn,
                                cdb=write10(0, 128).ljust(16, b"\0"))
        wire = b"".join(bytes(b) for b in encode_pdu(read_cmd.encode(0), b""))
        wire += b"".join(bytes(b) for b in encode_pdu(write_cmd.encode(len(new)), new))
        ini.cmdsn += 2
        ini.send_raw(wire)
        read_data, done = b"", set()
        while len(done) < 2:
            rec = ini.recv()
            pdu = rec.bhs
            if isinstance(pdu, DataIn) and pdu.itt == read_itt:
                read_data += bytes(rec.data)
                if pdu.flags & 0x01:
                    assert pdu.status == 0
                    done.add(read_itt)
            elif isinstance(pdu, ScsiResponse):
                assert pdu.status == 0, pdu
                done.add(pdu.itt)
        assert read_data == old
        assert ini.command(read10(0, 128), read=65536).data == new
    finally:
        ini.close()
