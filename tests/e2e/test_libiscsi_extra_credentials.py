"""libiscsi given CHAP credentials for a target that does not ask for CHAP
repeats InitiatorName/SessionType in its next login PDU; the login must work."""

from __future__ import annotations

import subprocess

from tests.conftest import require
from tests.support.target import DATA, QUORUM


def test_iscsi_ls_with_unneeded_chap_credentials_logs_in(target):
    p = subprocess.run([require("iscsi-ls"), "-s", f"iscsi://someuser%somesecret12@{target.portal}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Target:{QUORUM}" in p.stdout and f"Target:{DATA}" in p.stdout
    assert "Lun:0" in p.stdout
