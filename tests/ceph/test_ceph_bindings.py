"""Finding Debian's rados/rbd modules from a Python whose sys.path lacks them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyiscsi_target.storage import ceph_bindings
from pyiscsi_target.storage.ceph_bindings import CephBindingsError

ROOT = Path(__file__).resolve().parents[2]


def test_fresh_interpreter_loads_only_the_two_extension_modules():
    code = (
        "import sys; before = list(sys.path)\n"
        "from pyiscsi_target.storage.ceph_bindings import import_rados_rbd\n"
        "rados, rbd = import_rados_rbd()\n"
        "assert sys.path == before, 'sys.path changed'\n"
        "assert rbd.RBD and rados.Rados and sys.modules['rados'] is rados\n"
        "print(rados.__file__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(ceph_bindings.DIST_PACKAGES), p.stdout


def test_missing_bindings_say_how_to_install(tmp_path):
    with pytest.raises(CephBindingsError, match="apt-get install python3-rados python3-rbd"):
        ceph_bindings._load_extension("rados", str(tmp_path))
    (tmp_path / "rados.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(CephBindingsError, match="built for another Python"):
        ceph_bindings._load_extension("rados", str(tmp_path))
