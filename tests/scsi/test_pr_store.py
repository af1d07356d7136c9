"""APTPL persistence (pyiscsi_target/pr_store.py): restore at start only with
APTPL, refuse a damaged file, never leave a half-written one."""

from __future__ import annotations

import os

import pytest

from pyiscsi_target import identity
from pyiscsi_target.pr_store import PrStoreError, load_persistent_reservations, pr_state_path
from pyiscsi_target.scsi import pr
from pyiscsi_target.scsi.command import Nexus

from .test_pr_state import KA, KB, params

IQN = "iqn.2026-11.org.example:quorum"
A = Nexus("iqn.1991-05.com.microsoft:node1,i,0x400001370000", IQN + ",t,0x0001")


def apply(p: pr.PersistentReservations, *args) -> None:
    new, _ = p.pr_out(A, *args)
    if p.needs_persist(new):
        p.persist(pr.encode(new))
    p.state = new


def test_restore_with_aptpl_only(tmp_path):
    p = load_persistent_reservations(tmp_path, IQN, 0)
    assert p.ptpl_capable and p.state == pr.PrState()
    apply(p, 0, 0, 0, params(0, KA, aptpl=True))
    apply(p, 1, 0, 5, params(KA))
    again = load_persistent_reservations(tmp_path, IQN, 0)
    assert again.state == p.state and again.state.res_type == pr.PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
    # Turning APTPL off is persisted too, and then nothing is restored.
    apply(p, 0, 0, 0, params(KA, KB, aptpl=False))
    assert load_persistent_reservations(tmp_path, IQN, 0).state == pr.PrState()
    assert load_persistent_reservations(tmp_path, IQN, 1).state == pr.PrState()  # per LU


def test_damaged_file_refuses_to_start(tmp_path):
    path = pr_state_path(tmp_path, IQN, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"format": 1, "registr')
    with pytest.raises(PrStoreError):
        load_persistent_reservations(tmp_path, IQN, 0)


def test_interrupted_write_leaves_old_state_and_temp_is_cleaned(tmp_path, monkeypatch):
    p = load_persistent_reservations(tmp_path, IQN, 0)
    apply(p, 0, 0, 0, params(0, KA, aptpl=True))
    path = pr_state_path(tmp_path, IQN, 0)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("power lost before rename")

    monkeypatch.setattr(identity.os, "replace", crash)
    with pytest.raises(OSError):
        apply(p, 0, 0, 0, params(KA, KB, aptpl=True))
    monkeypatch.undo()
    assert path.read_bytes() == before
    # A temp file a SIGKILL left behind (no cleanup ran) is removed at start.
    stale = path.with_name(f".{path.name}.{os.getpid()}.1.tmp")
    stale.write_bytes(b"partial")
    restored = load_persistent_reservations(tmp_path, IQN, 0)
    assert not stale.exists() and restored.state.registrations[0].key == KA
