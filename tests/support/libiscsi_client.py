"""A real libiscsi client for tests, driven through ctypes.

Debian's ``libiscsi7`` (a dependency of ``libiscsi-bin``) is the same library
the iscsi-test-cu suite, QEMU and the libiscsi tools use; calling it from
Python needs no compiler and no headers.  Only the stable public API is used:
the ``*_sync`` command functions, ``scsi_task_get_status`` for status and
sense, and ``scsi_datain_unmarshall`` for PERSISTENT RESERVE IN data.

Login is ``iscsi_connect_sync`` + ``iscsi_login_sync`` (not
``iscsi_full_connect_sync``, which swallows every unit attention with TEST
UNIT READY), so a test sees exactly the unit attentions the target queued.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from dataclasses import dataclass

_lib = None


def lib():
    global _lib
    if _lib is None:
        path = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
        L = ctypes.CDLL(path)
        P, I, U32, U64, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_char_p
        sig = {
            "iscsi_create_context": (P, [S]),
            "iscsi_destroy_context": (I, [P]),
            "iscsi_set_targetname": (I, [P, S]),
            "iscsi_set_session_type": (I, [P, I]),
            "iscsi_set_header_digest": (I, [P, I]),
            "iscsi_set_isid_oui": (I, [P, U32, U32]),
            "iscsi_set_noautoreconnect": (None, [P, I]),
            "iscsi_set_timeout": (I, [P, I]),
            "iscsi_connect_sync": (I, [P, S]),
            "iscsi_login_sync": (I, [P]),
            "iscsi_logout_sync": (I, [P]),
            "iscsi_get_error": (S, [P]),
            "iscsi_testunitready_sync": (P, [P, I]),
            "iscsi_read16_sync": (P, [P, I, U64, U32, I, I, I, I, I, I]),
            "iscsi_write16_sync": (P, [P, I, U64, P, U32, I, I, I, I, I, I]),
            "iscsi_persistent_reserve_in_sync": (P, [P, I, I, ctypes.c_uint16]),
            "iscsi_persistent_reserve_out_sync": (P, [P, I, I, I, I, P]),
            "scsi_task_get_status": (I, [P, P]),
            "scsi_create_task": (P, [I, P, I, I]),
            "iscsi_scsi_command_sync": (P, [P, I, P, P]),
            "scsi_datain_unmarshall": (P, [P]),
            "scsi_free_scsi_task": (None, [P]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(L, name)
            fn.restype, fn.argtypes = res, args
        _lib = L
    return _lib


class _ProutBasic(ctypes.Structure):
    # struct scsi_persistent_reserve_out_basic (scsi-lowlevel.h)
    _fields_ = [("reservation_key", ctypes.c_uint64), ("service_action_reservation_key", ctypes.c_uint64),
                ("spec_i_pt", ctypes.c_uint8), ("all_tg_pt", ctypes.c_uint8), ("aptpl", ctypes.c_uint8)]


class _ScsiTaskHead(ctypes.Structure):
    # The leading members of struct scsi_task (scsi-lowlevel.h, libiscsi 1.19)
    # up to datain: what a raw command's Data-In needs.
    class _Sense(ctypes.Structure):
        # GCC packs the three 1-bit "unsigned" fields into one byte and
        # bit_pointer into the next (sizeof 16); ctypes would give the
        # bitfields a whole c_uint, so they are declared on a byte here.
        _fields_ = [("error_type", ctypes.c_ubyte), ("key", ctypes.c_int), ("ascq", ctypes.c_int),
                    ("sense_specific", ctypes.c_ubyte, 1), ("ill_param_in_cdb", ctypes.c_ubyte, 1),
                    ("bit_pointer_valid", ctypes.c_ubyte, 1), ("bit_pointer", ctypes.c_ubyte),
                    ("field_pointer", ctypes.c_uint16)]

    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int), ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int), ("cdb", ctypes.c_ubyte * 16), ("residual_status", ctypes.c_int),
                ("residual", ctypes.c_size_t), ("sense", _Sense),
                ("datain_size", ctypes.c_int), ("datain_data", ctypes.POINTER(ctypes.c_ubyte))]


SCSI_XFER_NONE, SCSI_XFER_READ = 0, 1
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18


@dataclass
class Reply:
    status: int
    sense: tuple[int, int, int] = (0, 0, 0)  # key, asc, ascq
    data: object = None


class LibIscsiError(RuntimeError):
    pass


class LibIscsi:
    """One libiscsi session (one I_T nexus): ``name`` + an ISID fixed by ``qualifier``."""

    def __init__(self, portal: str, target: str, name: str, *, qualifier: int = 1, lun: int = 0) -> None:
        L = lib()
        self.lun = lun
        self.ctx = L.iscsi_create_context(name.encode())
        if not self.ctx:
            raise LibIscsiError("iscsi_create_context failed")
        L.iscsi_set_targetname(self.ctx, target.encode())
        L.iscsi_set_session_type(self.ctx, 2)  # ISCSI_SESSION_NORMAL
        L.iscsi_set_header_digest(self.ctx, 0)  # ISCSI_HEADER_DIGEST_NONE
        L.iscsi_set_isid_oui(self.ctx, 0x0A5049, qualifier)  # same qualifier = same ISID = same nexus
        L.iscsi_set_noautoreconnect(self.ctx, 1)  # a dropped connection stays dropped
        L.iscsi_set_timeout(self.ctx, 10)
        if L.iscsi_connect_sync(self.ctx, portal.encode()) or L.iscsi_login_sync(self.ctx):
            err = L.iscsi_get_error(self.ctx)
            L.iscsi_destroy_context(self.ctx)
            self.ctx = None
            raise LibIscsiError(f"login failed: {err.decode(errors='replace') if err else '?'}")

    # -- session --------------------------------------------------------------------------
    def drop(self) -> None:
        """Destroy the context without logging out: the target sees the TCP
        connection vanish (what a crashed or partitioned node looks like)."""
        if self.ctx:
            lib().iscsi_destroy_context(self.ctx)
            self.ctx = None

    def logout(self) -> None:
        if self.ctx:
            lib().iscsi_logout_sync(self.ctx)
            self.drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.drop()

    # -- commands ---------------------------------------------------------------------------
    def _finish(self, task, parse=None) -> Reply:
        L = lib()
        if not task:
            raise LibIscsiError(f"command failed: {L.iscsi_get_error(self.ctx)!r}")
        sense = ctypes.create_string_buffer(64)
        try:
            status = L.scsi_task_get_status(task, sense)
            key, asc_ascq = struct.unpack_from("<ii", sense.raw, 4)  # struct scsi_sense: key, ascq
            data = parse(task) if parse is not None and status == GOOD else None
        finally:
            L.scsi_free_scsi_task(task)
        if status > 0xFF:  # SCSI_STATUS_ERROR / CANCELLED / TIMEOUT: no SCSI status, transport gone
            raise LibIscsiError(f"transport error (libiscsi status {status:#x})")
        return Reply(status, (key, asc_ascq >> 8, asc_ascq & 0xFF) if status == CHECK_CONDITION else (0, 0, 0), data)

    def command_in(self, cdb: bytes, length: int) -> Reply:
        """Any CDB libiscsi has no function for, as a raw SCSI command reading
        up to ``length`` bytes (0: no data): ``data`` is the Data-In received."""
        L = lib()
        raw = (ctypes.c_ubyte * len(cdb)).from_buffer_copy(cdb)
        task = L.scsi_create_task(len(cdb), raw, SCSI_XFER_READ if length else SCSI_XFER_NONE, length)
        if not task:
            raise LibIscsiError("scsi_create_task failed")
        if not L.iscsi_scsi_command_sync(self.ctx, self.lun, task, None):
            L.scsi_free_scsi_task(task)
            raise LibIscsiError(f"command failed: {L.iscsi_get_error(self.ctx)!r}")

        def parse(t):
            head = _ScsiTaskHead.from_address(t)
            return ctypes.string_at(head.datain_data, head.datain_size) if head.datain_size > 0 else b""

        return self._finish(task, parse)

    def tur(self) -> Reply:
        return self._finish(lib().iscsi_testunitready_sync(self.ctx, self.lun))

    def unit_attentions(self, tries: int = 10) -> list[tuple[int, int]]:
        """TEST UNIT READY until GOOD: the (ASC, ASCQ) of each UA on the way."""
        seen = []
        for _ in range(tries):
            r = self.tur()
            if r.status == GOOD:
                return seen
            assert r.status == CHECK_CONDITION and r.sense[0] == 6, r
            seen.append(r.sense[1:])
        raise AssertionError(f"unit attentions never cleared: {seen}")

    def read16(self, lba: int, blocks: int = 1, block_size: int = 512) -> Reply:
        """Status only: the data stays in libiscsi's task (compare it with another client)."""
        n = blocks * block_size
        return self._finish(lib().iscsi_read16_sync(self.ctx, self.lun, lba, n, block_size, 0, 0, 0, 0, 0))

    def write16(self, lba: int, data: bytes, block_size: int = 512) -> Reply:
        buf = ctypes.create_string_buffer(data, len(data))
        return self._finish(lib().iscsi_write16_sync(self.ctx, self.lun, lba, buf, len(data), block_size,
                                                     0, 0, 0, 0, 0))

    def prout(self, sa: int, rk: int = 0, sark: int = 0, type_: int = 0, *, aptpl: bool = False,
              all_tg_pt: bool = False) -> Reply:
        p = _ProutBasic(rk, sark, 0, 1 if all_tg_pt else 0, 1 if aptpl else 0)
        return self._finish(lib().iscsi_persistent_reserve_out_sync(self.ctx, self.lun, sa, 0, type_,
                                                                    ctypes.byref(p)))

    def read_keys(self) -> tuple[int, list[int]]:
        def parse(task):
            p = lib().scsi_datain_unmarshall(task)
            gen, _length, n = struct.unpack_from("<IIi", ctypes.string_at(p, 12))
            keys = struct.unpack_from(f"<{n}Q", ctypes.string_at(p + 16, 8 * n)) if n else ()
            return gen, list(keys)

        r = self._finish(lib().iscsi_persistent_reserve_in_sync(self.ctx, self.lun, 0, 4096), parse)
        assert r.status == GOOD, r
        return r.data

    def read_reservation(self) -> tuple[int, int, int] | None:
        """(generation, key, type), or None without a reservation."""
        def parse(task):
            # libiscsi fills prgeneration, reserved (1 = ADDITIONAL LENGTH > 0), key, scope, type.
            raw = ctypes.string_at(lib().scsi_datain_unmarshall(task), 26)
            gen, _length, present = struct.unpack_from("<IIi", raw)
            key, _scope, type_ = struct.unpack_from("<QBB", raw, 16)
            return (gen, key, type_) if present else None

        r = self._finish(lib().iscsi_persistent_reserve_in_sync(self.ctx, self.lun, 1, 4096), parse)
        assert r.status == GOOD, r
        return r.data

    def report_capabilities(self) -> bytes:
        """libiscsi's unmarshalled struct: length (u16), crh, sip_c, atp_c,
        ptpl_c, tmv, allow_commands, ptpl_a (never filled by libiscsi 1.19),
        pad, type mask (u16 at offset 10)."""
        def parse(task):
            return ctypes.string_at(lib().scsi_datain_unmarshall(task), 16)

        r = self._finish(lib().iscsi_persistent_reserve_in_sync(self.ctx, self.lun, 2, 8), parse)
        assert r.status == GOOD, r
        return r.data
