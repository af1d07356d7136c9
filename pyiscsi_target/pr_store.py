"""Where a LU's persistent reservations live across restarts (APTPL).

SPC-4 §5.12.5: when the last REGISTER (or REGISTER AND MOVE) set APTPL, the
registrations and the reservation must survive a power loss.  Each LU gets one
file, ``<state_dir>/pr/<target iqn, quoted>.lun<id>.json``, replaced
atomically on every change (temp file, fsync, rename, fsync of the
directory: :func:`~.identity.atomic_write_bytes`), so a crash at any moment
leaves the old or the new state, never a mix.  Without APTPL the file holds
``"aptpl": false`` (written once, when APTPL is turned off) and nothing is
restored: the state then survives session loss but not a restart.

The SCSI core never sees a path: it gets the restored state and a callback.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from .identity import atomic_write_bytes
from .scsi import pr

__all__ = ["PrStoreError", "pr_state_path", "load_persistent_reservations"]


class PrStoreError(RuntimeError):
    """The stored reservation state is unreadable: refuse to start rather than
    silently drop a cluster's keys."""


def pr_state_path(state_dir: str | os.PathLike[str], iqn: str, lun_id: int) -> Path:
    return Path(state_dir) / "pr" / f"{quote(iqn.lower(), safe='')}.lun{lun_id}.json"


def load_persistent_reservations(state_dir: str | os.PathLike[str], iqn: str,
                                 lun_id: int) -> pr.PersistentReservations:
    """The LU's reservations as restored from disk (blocking; small file I/O),
    with the callback that persists later changes."""
    path = pr_state_path(state_dir, iqn, lun_id)
    # Leftovers of a write a crash interrupted before its rename: never the state.
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    state = None
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        try:
            state = pr.decode(blob)
        except ValueError as e:
            raise PrStoreError(f"{path}: {e}; move the file away to start without these reservations") from None
        if not state.aptpl:
            state = None

    def persist(data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    return pr.PersistentReservations(state, persist)
