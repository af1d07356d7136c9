"""Stable logical-unit identity: unit serial (VPD 0x80) and NAA-6 (VPD 0x83).

Windows failover clustering, MPIO and VMware match disks by these values, so
they must be identical on every portal and session and unchanged across
restarts and config reloads.  They are never derived from the image path (a
moved image would become a new disk) nor from a random number drawn at start.

Three sources, per LUN:

* ``serial`` set in the config: the NAA is *derived* from (target name, LUN id,
  serial).  Several gateways sharing one config therefore present the same
  disk identity with no shared state.
* no ``serial``: 128 random bits are drawn **once**, and the serial and NAA
  derived from them are stored in ``<state_dir>/identity.json`` under
  ``"<iqn>/<lun id>"`` (written atomically).  Later starts read them back.
  Deleting that file (or adding ``serial`` to a LUN later) gives the disk a
  new identity -- initiators then see a different disk.
* an RBD image (``path = "rbd:pool/image"``) without ``serial``: derived from
  the Ceph cluster fsid, pool id and image id (:func:`derive_shared_image_identity`),
  so every gateway exporting the image presents the same disk; nothing stored.

The stored file is the authority: stored serial/NAA are used as stored, so a
future change of the derivation cannot change existing disks.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:  # POSIX: keep two processes on one state_dir from racing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "IDENTITY_FILE",
    "PROJECT_CID",
    "IdentityError",
    "LuIdentityRecord",
    "atomic_write_bytes",
    "derive_from_seed",
    "derive_naa",
    "derive_shared_image_identity",
    "load_or_create_identity",
    "naa6",
]

IDENTITY_FILE = "identity.json"

#: The 24-bit "IEEE company id" field of our NAA-6 identifiers.  The project
#: owns no OUI, so this is a CID-format value (second hex digit of the first
#: octet is 0xA, i.e. the locally administered "X" bit set, M=0): it cannot
#: collide with any IEEE-assigned OUI.  0x0A5049 = "\x0aPI" (PyIscsi);
#: fixed for the project -- changing it would change every disk's identity.
PROJECT_CID = 0x0A5049

_FORMAT_VERSION = 1
_lock = threading.Lock()


class IdentityError(RuntimeError):
    """The identity store is unreadable or inconsistent (never silently reset)."""


@dataclass(frozen=True, slots=True)
class LuIdentityRecord:
    serial: str  # ASCII, VPD page 0x80
    naa: bytes  # 16 bytes, NAA-6 (IEEE Registered Extended), VPD page 0x83


def naa6(company_id: int, vendor_id: int, extension: int) -> bytes:
    """NAA-6: 4-bit NAA (6) | 24-bit company id | 36-bit vendor id | 64-bit extension."""
    if not 0 <= company_id < 1 << 24 or not 0 <= vendor_id < 1 << 36 or not 0 <= extension < 1 << 64:
        raise ValueError("NAA-6 field out of range")
    value = (0x6 << 124) | (company_id << 100) | (vendor_id << 64) | extension
    return value.to_bytes(16, "big")


def _naa_from_digest(d: bytes) -> bytes:
    vendor = int.from_bytes(d[0:5], "big") >> 4  # 36 bits
    ext = int.from_bytes(d[5:13], "big")  # 64 bits
    return naa6(PROJECT_CID, vendor, ext)


def derive_naa(iqn: str, lun_id: int, serial: str) -> bytes:
    """Deterministic NAA-6 for a LUN with a configured serial."""
    d = hashlib.sha256(f"pyiscsi-target naa v1\0{iqn.lower()}\0{lun_id}\0{serial}".encode()).digest()
    return _naa_from_digest(d)


def derive_from_seed(seed: bytes) -> LuIdentityRecord:
    """Serial (20 upper-case hex chars, 80 bits) and NAA-6 from a 16-byte seed."""
    if len(seed) != 16:
        raise ValueError("seed must be 16 bytes")
    d = hashlib.sha256(b"pyiscsi-target identity v1\0" + seed).digest()
    return LuIdentityRecord(serial=d[16:26].hex().upper(), naa=_naa_from_digest(d))


def derive_shared_image_identity(cluster_fsid: str, pool_id: int, image_id: str) -> LuIdentityRecord:
    """Serial and NAA-6 of a LUN on a shared image (Ceph RBD), from what every
    gateway reads from the cluster itself: the cluster fsid, the pool id and
    the image id (ids, not names: a renamed pool or image stays the same
    disk).  Every gateway exporting the image thus presents one identity
    with no shared state_dir; nothing is stored."""
    key = f"pyiscsi-target rbd identity v1\0{cluster_fsid.lower()}\0{pool_id}\0{image_id}".encode()
    return derive_from_seed(hashlib.sha256(key).digest()[:16])


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file:
    temp file in the same directory, fsync, rename, fsync of the directory."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_store(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"version": _FORMAT_VERSION, "luns": {}}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("luns"), dict):
            raise ValueError("no 'luns' table")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
    except ValueError as e:
        raise IdentityError(
            f"{path}: unreadable LU identity store ({e}); refusing to invent new disk identities - "
            "restore the file from a backup or remove it knowingly"
        ) from None
    return data


def _record_from_entry(path: Path, key: str, entry: object) -> LuIdentityRecord:
    try:
        assert isinstance(entry, dict)
        serial = entry["serial"]
        naa = bytes.fromhex(entry["naa"])
        assert isinstance(serial, str) and 1 <= len(serial) <= 32 and serial.isascii()
        assert len(naa) == 16 and naa[0] >> 4 == 6
    except (AssertionError, KeyError, TypeError, ValueError):
        raise IdentityError(f"{path}: entry {key!r} is damaged; refusing to replace a disk identity") from None
    return LuIdentityRecord(serial=serial, naa=naa)


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "_FileLock":
        if fcntl is not None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def load_or_create_identity(
    state_dir: str | os.PathLike[str], iqn: str, lun_id: int, serial: str | None
) -> LuIdentityRecord:
    """The identity of LUN ``lun_id`` of target ``iqn`` (blocking; small file I/O).

    With ``serial``: derived, nothing stored.  Without: read from, or created
    once in, ``<state_dir>/identity.json``.
    """
    if serial is not None:
        return LuIdentityRecord(serial=serial, naa=derive_naa(iqn, lun_id, serial))
    sd = Path(state_dir)
    key = f"{iqn.lower()}/{lun_id}"
    path = sd / IDENTITY_FILE
    with _lock:
        sd.mkdir(parents=True, exist_ok=True)
        with _FileLock(sd / f".{IDENTITY_FILE}.lock"):
            store = _read_store(path)
            luns = store["luns"]
            if key in luns:
                return _record_from_entry(path, key, luns[key])
            used = {e.get("serial") for e in luns.values() if isinstance(e, dict)}
            while True:
                seed = secrets.token_bytes(16)
                rec = derive_from_seed(seed)
                if rec.serial not in used:
                    break
            luns[key] = {
                "seed": seed.hex(),
                "serial": rec.serial,
                "naa": rec.naa.hex(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            body = json.dumps(store, indent=2, sort_keys=True).encode() + b"\n"
            atomic_write_bytes(path, body)
            return rec
