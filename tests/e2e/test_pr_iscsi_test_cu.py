"""libiscsi's persistent-reservation and RESERVE(6) suites, with two
initiator names, counted apart: every test must run and pass, none may skip
("PERSISTENT RESERVE OUT is not implemented" is a CU_PASS skip in libiscsi)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import require
from tests.support.target import DATA

SUITES = "SCSI.Prin*,SCSI.Prout*,SCSI.Reserve6*"



def test_pr_suites_two_initiators(target):
    run_pr_suites(target.url(DATA, 0))


def run_pr_suites(url: str, label: str = "") -> None:
    """Every test of the suites runs and passes through ``url`` (also used
    through each gateway of an RBD LU: tests/ceph/test_gateways.py)."""
    listed = subprocess.run([require("iscsi-test-cu"), "--list"], capture_output=True, text=True).stdout
    names = [n for n in listed.split() if re.match(r"SCSI\.(Prin|Prout|Reserve6)\w*\.\w+$", n)]
    p = subprocess.run([require("iscsi-test-cu"), "--dataloss", "-i", "iqn.2026-11.test:cu-1",
                        "-I", "iqn.2026-11.test:cu-2", "-t", SUITES, url],
                       capture_output=True, text=True, errors="replace", timeout=600)
    out = p.stdout + p.stderr
    m = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    assert m, out[-3000:]
    total, ran, passed, failed = map(int, m.groups())
    skipped = len(re.findall(r"\[SKIPPED\]|not implemented", out))
    print(f"{label}iscsi-test-cu PR suites: {passed - skipped} passed, {failed} failed, {skipped} skipped of {total}")
    assert total == ran == len(names), (total, ran, names)
    assert failed == 0 and skipped == 0 and passed == total, out[-5000:]
