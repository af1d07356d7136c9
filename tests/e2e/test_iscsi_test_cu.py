"""libiscsi's conformance suite, iscsi-test-cu, against the real server.

Every family (SCSI and iSCSI) runs with two initiator names so the
multi-initiator tests run too.  CUnit counts a test that skips itself as
passed; we count the "[SKIPPED]" lines separately and print them, so a skip is
never mistaken for a pass.  Zero failures are required.
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import require
from tests.support.target import DATA


def run_suite(url: str, timeout: float = 600) -> tuple[int, int, int, str]:
    p = subprocess.run([require("iscsi-test-cu"), "--dataloss", "--silent",
                        "-i", "iqn.2026-11.test:cu-1", "-I", "iqn.2026-11.test:cu-2", url],
                       capture_output=True, text=True, errors="replace", timeout=timeout)
    out = p.stdout + p.stderr
    m = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    assert m, out[-3000:]
    total, ran, passed, failed = map(int, m.groups())
    skipped = len(re.findall(r"\[SKIPPED\]", out))
    return passed - skipped, failed, skipped, out


def test_iscsi_test_cu_all_families_zero_failures(target):
    passed, failed, skipped, out = run_suite(target.url(DATA, 0))
    print(f"iscsi-test-cu: {passed} passed, {failed} failed, {skipped} skipped")
    failures = re.findall(r"^\s*Test: (\S+) \.\.\.(?:.|\n)*?FAILED", out, re.M)
    assert failed == 0, "\n".join(failures) + out[-5000:]
    assert passed > 200, out[-3000:]
