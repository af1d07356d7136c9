"""ALUA with real clients: two `serve` processes configured as gateways of the
same target (gw-a: port group 1, active/optimized; gw-b: port group 2,
standby), each naming the other as its peer.  libiscsi (ctypes, raw CDBs for
REPORT TARGET PORT GROUPS), iscsi-ls and iscsi-inq look at them.

The two gateways serve separate image files here (a file image is locked by
one process); what is checked is what each one reports about itself and its
peer, which does not depend on the storage behind it.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support.initiator import Initiator
from tests.support.libiscsi_client import CHECK_CONDITION, GOOD, LibIscsi
from tests.support.gateways import Gateway, write_gateway_config
from tests.support.target import free_port, start_target

IQN = "iqn.2026-11.org.example:alua"
STANDBY = (0x02, 0x04, 0x0B)  # NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE


LUN = """
  [[target.lun]]
  id = 0
  path = "disk.img"
  size = "16MiB"
  serial = "ALUA-SHARED-0001"
"""


class Pair:
    def __init__(self, tmp_path: Path) -> None:
        self.pa, self.pb = free_port(), free_port()
        a = Gateway("gw-a", 1, self.pa, "active/optimized")
        b = Gateway("gw-b", 2, self.pb, "standby")
        self.a = start_target(write_gateway_config(tmp_path / "gw-a", IQN, LUN, me=a, peers=(b,)), "127.0.0.1", self.pa)
        self.b = start_target(write_gateway_config(tmp_path / "gw-b", IQN, LUN, me=b, peers=(a,)), "127.0.0.1", self.pb)

    def connect(self, gw, name: str = "iqn.2026-11.test:alua") -> LibIscsi:
        c = LibIscsi(gw.portal, IQN, name)
        # The power-on UA first: INQUIRY does not consume it, REQUEST SENSE
        # (allowed in standby) does.
        r = c.command_in(bytes((0x03, 0, 0, 0, 18, 0)), 18)
        assert r.status == GOOD, r
        return c


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    for gw in (p.a, p.b):
        assert gw.stop() == 0, gw.log_text()[-4000:]


def rtpg(fmt: int = 0, alloc: int = 1024) -> bytes:
    return bytes((0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0)) + alloc.to_bytes(4, "big") + bytes(2)


def designators(page: bytes) -> dict[int, list[tuple[int, int, bytes]]]:
    """VPD 83h: designator type -> [(code set, association, value)]."""
    out: dict[int, list] = {}
    pos, end = 4, 4 + int.from_bytes(page[2:4], "big")
    while pos < end:
        n = page[pos + 3]
        out.setdefault(page[pos + 1] & 0x0F, []).append((page[pos] & 0x0F, (page[pos + 1] >> 4) & 3,
                                                         page[pos + 4: pos + 4 + n]))
        pos += 4 + n
    return out


EXPECTED_DESCRIPTORS = (
    # state (PREF 0), supported AO/AN/S, group, reserved, status 00h, vendor, port count; relative port
    bytes.fromhex("00 07 0001 00 00 00 01") + bytes.fromhex("0000 0001")
    + bytes.fromhex("02 07 0002 00 00 00 01") + bytes.fromhex("0000 0002")
)


def test_send_targets_lists_every_gateway_with_its_tpgt(pair):
    for gw, first, other in ((pair.a, f"127.0.0.1:{pair.pa},1", f"127.0.0.1:{pair.pb},2"),
                             (pair.b, f"127.0.0.1:{pair.pb},2", f"127.0.0.1:{pair.pa},1")):
        p = subprocess.run([require("iscsi-ls"), f"iscsi://{gw.portal}"], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        print(p.stdout)
        # (libiscsi lists the addresses of a target in reverse order)
        assert sorted(p.stdout.splitlines()) == sorted([f"Target:{IQN} Portal:{first}",
                                                        f"Target:{IQN} Portal:{other}"]), p.stdout
        # On the wire: the portal asked first, then the peer's.
        ini = Initiator(gw.host, gw.port, isid=bytes.fromhex("400001370021"))
        try:
            ini.login(None, session_type="Discovery")
            assert ini.text([("SendTargets", "All")]) == [("TargetName", IQN), ("TargetAddress", first),
                                                          ("TargetAddress", other)]
        finally:
            ini.close()


def test_login_returns_the_port_group_as_tpgt(pair):
    for gw, tpgt in ((pair.a, "1"), (pair.b, "2")):
        ini = Initiator(gw.host, gw.port, isid=bytes.fromhex("400001370020"))
        try:
            assert ini.login(IQN)["TargetPortalGroupTag"] == tpgt
        finally:
            ini.close()


def test_inquiry_tpgs_and_vpd83_through_libiscsi(pair):
    for gw, group in ((pair.a, 1), (pair.b, 2)):
        with pair.connect(gw) as c:
            r = c.command_in(bytes((0x12, 0, 0, 0, 96, 0)), 96)
            assert r.status == GOOD and len(r.data) == 96
            assert (r.data[5] >> 4) & 3 == 0b01  # TPGS: implicit ALUA
            r = c.command_in(bytes((0x12, 1, 0x83, 1, 0, 0)), 256)
            assert r.status == GOOD, r
            ds = designators(r.data)
            assert ds[4] == [(1, 1, group.to_bytes(4, "big"))]  # relative target port = port group
            assert ds[5] == [(1, 1, group.to_bytes(4, "big"))]  # target port group
            assert ds[8][0][2].rstrip(b"\0") == f"{IQN},t,0x{group:04x}".encode()
            naa = ds[3]
    # (the NAA comes from each gateway's own state_dir; the same configured
    # serial on both keeps VPD 80h identical, as for a shared RBD image)
    assert naa and naa[0][1] == 0


def _inq(gw, *args) -> subprocess.CompletedProcess:
    # iscsi-inq prints binary designators raw (the NAA too): decode leniently.
    return subprocess.run([require("iscsi-inq"), *args, f"iscsi://{gw.portal}/{IQN}/0"], capture_output=True,
                          text=True, errors="replace", timeout=60)


def test_iscsi_inq_shows_the_target_port_designators(pair):
    p = _inq(pair.a, "-e", "1", "-c", "131")
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    blocks = p.stdout.split("DEVICE DESIGNATOR #")[1:]
    kinds = {b.split("Designator Type:")[1].splitlines()[0]: b for b in blocks}
    # iscsi-inq names the types but prints binary values as text, so the
    # group number itself is checked through libiscsi above.
    for kind in ("(5) TARGET_PORT_GROUP", "(4) RELATIVE_TARGET_PORT", "(8) SCSI_NAME_STRING"):
        assert "Association:(1) TARGET_PORT" in kinds[kind], (kind, p.stdout)
        assert "Code Set:(1) BINARY" in kinds[kind] or kind.startswith("(8)")
    assert f"Designator:[{IQN},t,0x0001]" in kinds["(8) SCSI_NAME_STRING"]
    assert "Association:(0) LOGICAL_UNIT" in kinds["(3) NAA"]


def test_iscsi_inq_cannot_attach_through_a_standby_gateway(pair):
    """libiscsi's tools log in with TEST UNIT READY until it succeeds; in
    standby it gets NOT READY 04/0Bh (TUR is not among the commands SPC-4
    §5.16.2.4.4 allows), and they give up: the standby path is not used."""
    p = _inq(pair.b)
    print(p.stdout + p.stderr)
    assert p.returncode != 0
    assert "NOT READY" in p.stdout + p.stderr and "0x040b" in p.stdout + p.stderr


@pytest.mark.parametrize("which", ["a", "b"])
def test_report_target_port_groups_both_formats(pair, which):
    gw = getattr(pair, which)
    with pair.connect(gw) as c:
        r = c.command_in(rtpg(0), 1024)
        assert r.status == GOOD, r
        assert r.data == struct.pack(">I", len(EXPECTED_DESCRIPTORS)) + EXPECTED_DESCRIPTORS
        r = c.command_in(rtpg(1), 1024)
        assert r.status == GOOD, r
        # RETURN DATA LENGTH counts the extended header; FORMAT TYPE 001b;
        # IMPLICIT TRANSITION TIME 0 (no recommendation: no transitions).
        assert r.data == struct.pack(">I", 4 + len(EXPECTED_DESCRIPTORS)) + bytes((0x10, 0, 0, 0)) \
            + EXPECTED_DESCRIPTORS
        # Allocation length truncates, the length field still tells the whole.
        r = c.command_in(rtpg(0, alloc=4), 4)
        assert r.status == GOOD and r.data == struct.pack(">I", len(EXPECTED_DESCRIPTORS))
        r = c.command_in(rtpg(1, alloc=14), 14)
        assert r.status == GOOD and r.data == (struct.pack(">I", 4 + len(EXPECTED_DESCRIPTORS)) + bytes((0x10, 0, 0, 0))
                                              + EXPECTED_DESCRIPTORS)[:14]
        # A reserved PARAMETER DATA FORMAT.
        r = c.command_in(rtpg(2), 1024)
        assert (r.status, r.sense) == (CHECK_CONDITION, (0x05, 0x24, 0x00))


def test_standby_gateway_refuses_io_but_answers_what_spc4_allows(pair):
    with pair.connect(pair.b) as c:
        assert c.tur().sense == STANDBY and c.tur().status == CHECK_CONDITION
        assert c.read16(0).sense == STANDBY
        assert c.write16(0, bytes(512)).sense == STANDBY
        r = c.command_in(bytes((0x9E, 0x10)) + bytes(11) + bytes((32, 0, 0)), 32)  # READ CAPACITY(16)
        assert (r.status, r.sense) == (CHECK_CONDITION, STANDBY)
        for cdb, n in ((bytes((0x12, 0, 0, 0, 96, 0)), 96),                         # INQUIRY
                       (bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)), 256),       # REPORT LUNS
                       (bytes((0x1A, 0, 0x3F, 0, 255, 0)), 255),                    # MODE SENSE(6)
                       (rtpg(1), 1024)):
            r = c.command_in(cdb, n)
            assert r.status == GOOD, (cdb.hex(), r)
        # Persistent reservations are allowed in standby (SPC-4 §5.16.2.4.4).
        assert c.prout(0x00, sark=0x1234).status == GOOD
        assert c.read_keys()[1] == [0x1234]
    # The active/optimized gateway serves I/O.
    with pair.connect(pair.a) as c:
        assert c.tur().status == GOOD
        assert c.write16(0, bytes(range(256)) * 2).status == GOOD
        assert c.read16(0).status == GOOD
