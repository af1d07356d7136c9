"""Find Ceph's Python bindings (``rados``, ``rbd``).

There are no usable bindings on PyPI: they come with Ceph itself (Debian:
``python3-rados``, ``python3-rbd``), built for the distribution's CPython and
installed in ``/usr/lib/python3/dist-packages``.  A virtualenv or a pyenv
interpreter of the same minor version (3.11 for Debian 12's Ceph 16) can load
those extension modules, but that directory is not on its ``sys.path``, and
putting it there would shadow the environment's own pip packages with the
distribution's older copies.  So only the two ``.so`` files are loaded, by
file name, and registered as ``rados`` / ``rbd`` in ``sys.modules`` (``rbd``
does ``import rados`` and must get the same module object).
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["CephBindingsError", "import_rados_rbd", "DIST_PACKAGES"]

#: Where Debian/Ubuntu install the bindings.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


class CephBindingsError(ImportError):
    """The Ceph bindings cannot be imported; the message says how to get them."""


def _hint(detail: str) -> str:
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"the Ceph Python bindings (rados, rbd) are not available: {detail}. "
        "Install them with `apt-get install python3-rados python3-rbd` (Debian/Ubuntu); "
        "they are built for the distribution's Python (3.11 on Debian 12), so run pyiscsi-target "
        f"with a Python of that same minor version (this one is {v})"
    )


def _load_extension(name: str, directory: str) -> ModuleType:
    """Load exactly ``directory/<name>.<abi-tag>.so`` as module ``name``."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES  # e.g. .cpython-311-x86_64-linux-gnu.so, .abi3.so, .so
    for suffix in suffixes:
        path = os.path.join(directory, name + suffix)
        if os.path.exists(path):
            break
    else:
        others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, f"{name}.*.so")))
        found = f" (found {', '.join(others)}: built for another Python)" if others else ""
        raise CephBindingsError(_hint(f"no {name} module for this Python in {directory}{found}"))
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_rados_rbd(directory: str = DIST_PACKAGES) -> tuple[ModuleType, ModuleType]:
    """Return the ``(rados, rbd)`` modules.

    A normal import first (bindings on ``sys.path``, e.g. the system Python or
    a venv with a ``.pth`` file); else the extension modules from
    ``directory``; else :class:`CephBindingsError` with installation advice.
    """
    try:
        import rados  # type: ignore[import-not-found]
        import rbd  # type: ignore[import-not-found]

        return rados, rbd
    except ImportError:
        pass
    try:
        rados = sys.modules.get("rados") or _load_extension("rados", directory)
        rbd = sys.modules.get("rbd") or _load_extension("rbd", directory)
    except CephBindingsError:
        raise
    except ImportError as e:  # e.g. librados.so.2 missing, or an ABI mismatch
        raise CephBindingsError(_hint(str(e))) from e
    return rados, rbd
