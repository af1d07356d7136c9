"""Stable LU identity (VPD 0x80 serial, VPD 0x83 NAA-6)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pyiscsi_target import identity as idm
from pyiscsi_target.identity import (
    PROJECT_CID,
    IdentityError,
    LuIdentityRecord,
    atomic_write_bytes,
    derive_naa,
    load_or_create_identity,
)

IQN = "iqn.2026-11.org.example:quorum"


def naa_fields(naa: bytes):
    v = int.from_bytes(naa, "big")
    return v >> 124, (v >> 100) & 0xFFFFFF, (v >> 64) & ((1 << 36) - 1), v & ((1 << 64) - 1)


def test_generated_identity_is_stable_and_stored(tmp_path):
    a = load_or_create_identity(tmp_path, IQN, 0, None)
    b = load_or_create_identity(tmp_path, IQN, 0, None)
    assert a == b and isinstance(a, LuIdentityRecord)
    assert len(a.naa) == 16
    assert 16 <= len(a.serial) <= 24 and int(a.serial, 16) >= 0
    stored = json.loads((tmp_path / "identity.json").read_text())
    entry = stored["luns"][f"{IQN}/0"]
    assert entry["serial"] == a.serial and bytes.fromhex(entry["naa"]) == a.naa
    assert len(bytes.fromhex(entry["seed"])) == 16
    # a "restart": drop any in-process state; only the file remains
    assert load_or_create_identity(str(tmp_path), IQN, 0, None) == a


def test_naa6_layout_uses_locally_administered_cid(tmp_path):
    rec = load_or_create_identity(tmp_path, IQN, 0, None)
    naa, cid, vendor, ext = naa_fields(rec.naa)
    assert naa == 6 and cid == PROJECT_CID
    assert (cid >> 16) & 0x0F == 0x0A  # CID format: X (local) bit set, M clear
    assert vendor or ext


def test_identities_differ_per_lun_and_target(tmp_path):
    recs = [
        load_or_create_identity(tmp_path, IQN, 0, None),
        load_or_create_identity(tmp_path, IQN, 1, None),
        load_or_create_identity(tmp_path, "iqn.2026-11.org.example:data", 0, None),
    ]
    assert len({r.serial for r in recs}) == 3
    assert len({r.naa for r in recs}) == 3
    # all three kept, earlier ones untouched
    assert load_or_create_identity(tmp_path, IQN, 0, None) == recs[0]


def test_not_derived_from_a_fresh_random_or_path(tmp_path):
    # Two separate state dirs (two fresh installs) get different identities,
    # the same state dir always the same one.
    a = load_or_create_identity(tmp_path / "s1", IQN, 0, None)
    b = load_or_create_identity(tmp_path / "s2", IQN, 0, None)
    assert a != b
    assert load_or_create_identity(tmp_path / "s1", IQN, 0, None) == a


def test_configured_serial_is_deterministic_and_stateless(tmp_path):
    a = load_or_create_identity(tmp_path / "gw1", IQN, 0, "QUORUM0001")
    b = load_or_create_identity(tmp_path / "gw2", IQN, 0, "QUORUM0001")
    assert a == b and a.serial == "QUORUM0001"
    assert naa_fields(a.naa)[:2] == (6, PROJECT_CID)
    assert not (tmp_path / "gw1" / "identity.json").exists()
    assert load_or_create_identity(tmp_path, IQN, 1, "QUORUM0001").naa != a.naa
    assert load_or_create_identity(tmp_path, "iqn.2026-11.org.example:data", 0, "QUORUM0001").naa != a.naa
    assert load_or_create_identity(tmp_path, IQN, 0, "QUORUM0002").naa != a.naa
    # pinned: the derivation is part of the on-wire identity and must not drift
    assert derive_naa(IQN, 0, "QUORUM0001") == a.naa


def test_derivation_is_pinned():
    # Changing these values changes every disk in the field: fail loudly.
    assert derive_naa(IQN, 0, "QUORUM0001").hex() == PINNED_NAA
    assert idm.derive_from_seed(bytes(16)) == PINNED_SEED_RECORD


PINNED_NAA = "60a5049f825ec51315023dab6a66f824"
PINNED_SEED_RECORD = LuIdentityRecord(
    serial="C89D98965841977F6692", naa=bytes.fromhex("60a504917244" "62d286dfdd34e0f16760")
)


def test_corrupt_store_is_an_error_not_a_new_identity(tmp_path):
    load_or_create_identity(tmp_path, IQN, 0, None)
    before = (tmp_path / "identity.json").read_bytes()
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(IdentityError, match="refusing"):
        load_or_create_identity(tmp_path, IQN, 0, None)
    (tmp_path / "identity.json").write_bytes(before.replace(b'"naa": "6', b'"naa": "x'))
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_identity(tmp_path, IQN, 0, None)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"old")

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write_bytes(tmp_path / "g.json", b"x")
    assert any(s.endswith(".tmp") for s in synced) and str(tmp_path) in synced


def test_concurrent_creation_agrees(tmp_path):
    out = []
    ts = [threading.Thread(target=lambda: out.append(load_or_create_identity(tmp_path, IQN, 7, None))) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(out)) == 1
