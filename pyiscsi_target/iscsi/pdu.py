"""iSCSI PDUs (RFC 7143 §11): the fast ``struct`` codec used on every command.

Every Basic Header Segment is 48 bytes (§11.2.1).  Each PDU type below is a
slotted dataclass whose fields are, in order, the values of one precompiled
``struct.Struct``: decoding is one ``unpack_from`` and a constructor call, and
encoding one ``pack``.  Bit fields stay packed in ``flags`` (byte 1) with
properties to read them, so parsing never touches bits it does not need.

The normative, readable definition of every PDU is the ``construct`` grammar in
:mod:`pyiscsi_target.iscsi.pdu_spec`; ``tests/iscsi/test_pdu_codec.py`` proves
with hypothesis that both give identical fields and bytes.  construct is the
oracle, not the parser: its compiled form skips checks and is not meant for
untrusted input (construct docs, "compilation").

Common layout: byte 0 = ``.I`` (0x40) | opcode (6 bits); byte 1 flags (F=0x80
in most PDUs); bytes 4..7 = TotalAHSLength (1 byte, 4-byte words) and
DataSegmentLength (3 bytes), kept together as ``ahs_dsl``.  Reserved fields are
sent as zero and ignored on receipt (§11.2.1.1).
"""

from __future__ import annotations

import enum
import operator
import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

BHS_LEN = 48
ALL_ONES = 0xFFFFFFFF          # the reserved ITT/TTT value (§11.1, §11.18.1)


class Opcode(enum.IntEnum):
    # Initiator opcodes (§11.1.1)
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # Target opcodes (§11.1.2)
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(o for o in Opcode if o < 0x20)

# Flag bits of byte 1, by the names RFC 7143 gives them.
F_FINAL = 0x80
F_READ = 0x40            # SCSI Command R
F_WRITE = 0x20           # SCSI Command W
ATTR_MASK = 0x07         # SCSI Command task attributes
F_CONTINUE = 0x40        # Text / Login C
F_TRANSIT = 0x80         # Login T
F_ACK = 0x40             # Data-In A
F_BIDI_OVERFLOW = 0x10   # SCSI Response o
F_BIDI_UNDERFLOW = 0x08  # SCSI Response u
F_OVERFLOW = 0x04        # O (SCSI Response, Data-In)
F_UNDERFLOW = 0x02       # U
F_STATUS = 0x01          # Data-In S
IMMEDIATE = 0x40         # byte 0


class PduFormatError(ValueError):
    """The bytes are not a PDU we can parse; ``reason`` is a Reject reason."""

    def __init__(self, message: str, reason: int = 0x04):
        super().__init__(message)
        self.reason = reason


class RejectReason(enum.IntEnum):
    """§11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class _Bhs:
    """Behaviour shared by every PDU dataclass below."""

    OPCODE: ClassVar[int]
    _S: ClassVar[struct.Struct]

    # opbyte/flags/ahs_dsl are the first dataclass fields of every PDU type.
    @property
    def opcode(self) -> int:
        return self.opbyte & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.opbyte & IMMEDIATE)

    @property
    def final(self) -> bool:
        return bool(self.flags & F_FINAL)

    @property
    def total_ahs_len(self) -> int:
        """TotalAHSLength in bytes (the field counts 4-byte words)."""
        return (self.ahs_dsl >> 24) * 4

    @property
    def data_len(self) -> int:
        return self.ahs_dsl & 0xFFFFFF

    def encode(self, data_len: int | None = None, ahs_len: int = 0) -> bytes:
        """The 48-byte BHS; ``data_len`` overrides DataSegmentLength."""
        if data_len is not None:
            self.ahs_dsl = ((ahs_len // 4) << 24) | data_len
        return self._S.pack(*self._values(self))

    @classmethod
    def decode(cls, buf, offset: int = 0):
        return cls(*cls._S.unpack_from(buf, offset))


def _pdu(opcode: Opcode, fmt: str):
    """Class decorator: dataclass + the struct whose values are its fields."""

    def wrap(cls):
        cls = dataclass(slots=True)(cls)
        cls.OPCODE = opcode
        cls._S = struct.Struct(fmt)
        cls._names = tuple(f.name for f in fields(cls))
        cls._values = operator.attrgetter(*cls._names)   # one C call gathers every field
        assert cls._S.size == BHS_LEN, (cls.__name__, cls._S.size)
        assert len(cls._names) == len(cls._S.unpack(bytes(BHS_LEN))), cls.__name__
        return cls

    return wrap


# --- Initiator → target -----------------------------------------------------

@_pdu(Opcode.NOP_OUT, ">BBxxIQIIII16x")
class NopOut(_Bhs):                       # §11.18
    opbyte: int = Opcode.NOP_OUT | IMMEDIATE
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = ALL_ONES
    ttt: int = ALL_ONES
    cmdsn: int = 0
    expstatsn: int = 0


@_pdu(Opcode.SCSI_COMMAND, ">BBxxIQIIII16s")
class ScsiCommand(_Bhs):                  # §11.3
    opbyte: int = Opcode.SCSI_COMMAND
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    expected_length: int = 0              # Expected Data Transfer Length
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)

    @property
    def read(self) -> bool:
        return bool(self.flags & F_READ)

    @property
    def write(self) -> bool:
        return bool(self.flags & F_WRITE)

    @property
    def attr(self) -> int:
        return self.flags & ATTR_MASK


@_pdu(Opcode.TASK_MGMT_REQUEST, ">BBxxIQIIIIII8x")
class TaskMgmtRequest(_Bhs):              # §11.5
    opbyte: int = Opcode.TASK_MGMT_REQUEST | IMMEDIATE
    flags: int = F_FINAL | 1
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    rtt: int = ALL_ONES                   # Referenced Task Tag
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0

    @property
    def function(self) -> int:
        return self.flags & 0x7F


@_pdu(Opcode.LOGIN_REQUEST, ">BBBBI6sHIH2xII16x")
class LoginRequest(_Bhs):                 # §11.12
    opbyte: int = Opcode.LOGIN_REQUEST | IMMEDIATE
    flags: int = 0
    version_max: int = 0
    version_min: int = 0
    ahs_dsl: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    @property
    def transit(self) -> bool:
        return bool(self.flags & F_TRANSIT)

    @property
    def cont(self) -> bool:
        return bool(self.flags & F_CONTINUE)

    @property
    def csg(self) -> int:
        return (self.flags >> 2) & 3

    @property
    def nsg(self) -> int:
        return self.flags & 3


@_pdu(Opcode.TEXT_REQUEST, ">BBxxIQIIII16x")
class TextRequest(_Bhs):                  # §11.10
    opbyte: int = Opcode.TEXT_REQUEST
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ALL_ONES
    cmdsn: int = 0
    expstatsn: int = 0

    @property
    def cont(self) -> bool:
        return bool(self.flags & F_CONTINUE)


@_pdu(Opcode.DATA_OUT, ">BBxxIQII4xI4xII4x")
class DataOut(_Bhs):                      # §11.7
    opbyte: int = Opcode.DATA_OUT
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ALL_ONES
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0


@_pdu(Opcode.LOGOUT_REQUEST, ">BBxxI8xIH2xII16x")
class LogoutRequest(_Bhs):                # §11.14
    opbyte: int = Opcode.LOGOUT_REQUEST
    flags: int = F_FINAL
    ahs_dsl: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    @property
    def reason(self) -> int:
        return self.flags & 0x7F


@_pdu(Opcode.SNACK_REQUEST, ">BBxxIQII4xI8xII")  # BegRun at 40, RunLength at 44
class SnackRequest(_Bhs):                 # §11.16
    opbyte: int = Opcode.SNACK_REQUEST
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ALL_ONES
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0

    @property
    def type(self) -> int:
        return self.flags & 0x0F


# --- Target → initiator -----------------------------------------------------

@_pdu(Opcode.NOP_IN, ">BBxxIQIIIII12x")
class NopIn(_Bhs):                        # §11.19
    opbyte: int = Opcode.NOP_IN
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = ALL_ONES
    ttt: int = ALL_ONES
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@_pdu(Opcode.SCSI_RESPONSE, ">BBBBI8xIIIIIIII")
class ScsiResponse(_Bhs):                 # §11.4
    opbyte: int = Opcode.SCSI_RESPONSE
    flags: int = F_FINAL
    response: int = 0
    status: int = 0
    ahs_dsl: int = 0
    itt: int = 0
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0


@_pdu(Opcode.TASK_MGMT_RESPONSE, ">BBBxI8xI4xIII12x")
class TaskMgmtResponse(_Bhs):             # §11.6
    opbyte: int = Opcode.TASK_MGMT_RESPONSE
    flags: int = F_FINAL
    response: int = 0
    ahs_dsl: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@_pdu(Opcode.LOGIN_RESPONSE, ">BBBBI6sHI4xIIIBB10x")
class LoginResponse(_Bhs):                # §11.13
    opbyte: int = Opcode.LOGIN_RESPONSE
    flags: int = 0
    version_max: int = 0
    version_active: int = 0
    ahs_dsl: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0

    @property
    def transit(self) -> bool:
        return bool(self.flags & F_TRANSIT)

    @property
    def csg(self) -> int:
        return (self.flags >> 2) & 3

    @property
    def nsg(self) -> int:
        return self.flags & 3


@_pdu(Opcode.TEXT_RESPONSE, ">BBxxIQIIIII12x")
class TextResponse(_Bhs):                 # §11.11
    opbyte: int = Opcode.TEXT_RESPONSE
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ALL_ONES
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@_pdu(Opcode.DATA_IN, ">BBxBIQIIIIIIII")
class DataIn(_Bhs):                       # §11.7
    opbyte: int = Opcode.DATA_IN
    flags: int = 0
    status: int = 0
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = ALL_ONES
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual: int = 0


@_pdu(Opcode.LOGOUT_RESPONSE, ">BBBxI8xI4xIII4xHH4x")
class LogoutResponse(_Bhs):               # §11.15
    opbyte: int = Opcode.LOGOUT_RESPONSE
    flags: int = F_FINAL
    response: int = 0
    ahs_dsl: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0


@_pdu(Opcode.R2T, ">BBxxIQIIIIIIII")
class R2T(_Bhs):                          # §11.8
    opbyte: int = Opcode.R2T
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0


@_pdu(Opcode.ASYNC_MESSAGE, ">BBxxIQI4xIIIBBHHH4x")
class AsyncMessage(_Bhs):                 # §11.9
    opbyte: int = Opcode.ASYNC_MESSAGE
    flags: int = F_FINAL
    ahs_dsl: int = 0
    lun: int = 0
    itt: int = ALL_ONES
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    async_event: int = 0
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0


@_pdu(Opcode.REJECT, ">BBBxI8xI4xIIII8x")
class Reject(_Bhs):                       # §11.17
    opbyte: int = Opcode.REJECT
    flags: int = F_FINAL
    reason: int = 0
    ahs_dsl: int = 0
    itt: int = ALL_ONES
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0                       # DataSN/R2TSN or reserved


PDU_TYPES: dict[int, type] = {
    cls.OPCODE: cls
    for cls in (NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut,
                LogoutRequest, SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse,
                LoginResponse, TextResponse, DataIn, LogoutResponse, R2T, AsyncMessage, Reject)
}


def decode_bhs(buf, offset: int = 0):
    """Decode a BHS of any opcode; unknown opcodes raise :class:`PduFormatError`."""
    cls = PDU_TYPES.get(buf[offset] & 0x3F)
    if cls is None:
        raise PduFormatError(f"unknown opcode 0x{buf[offset] & 0x3F:02x}",
                             RejectReason.COMMAND_NOT_SUPPORTED)
    return cls(*cls._S.unpack_from(buf, offset))


# --- Additional Header Segments (§11.2.2) ----------------------------------

class AhsType(enum.IntEnum):
    EXTENDED_CDB = 1
    BIDI_READ_EXPECTED_LENGTH = 2


@dataclass(slots=True)
class Ahs:
    type: int
    body: bytes = field(default=b"")   # AHS-specific bytes (after the reserved byte)


_AHS_HDR = struct.Struct(">HBx")


def decode_ahs(buf) -> list[Ahs]:
    """Split the AHS area; AHSLength counts the specific bytes incl. the reserved one."""
    out: list[Ahs] = []
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < 4:
            raise PduFormatError("truncated AHS header", RejectReason.INVALID_PDU_FIELD)
        length, typ = _AHS_HDR.unpack_from(buf, pos)[:2]
        if length == 0 or pos + 3 + length > end:
            raise PduFormatError("AHSLength out of range", RejectReason.INVALID_PDU_FIELD)
        # AHSType bits 0-1 are reserved (§11.2.2.2): ignored on receipt.
        out.append(Ahs(typ & 0x3F, bytes(buf[pos + 4: pos + 3 + length])))
        pos += 3 + length
        pos += -pos % 4
    return out


def encode_ahs(items: list[Ahs]) -> bytes:
    out = bytearray()
    for a in items:
        out += _AHS_HDR.pack(len(a.body) + 1, a.type) + a.body
        out += bytes(-len(out) % 4)
    return bytes(out)


def lun_to_int(lun_field: int) -> int:
    """The 8-byte LUN field (SAM-5 §4.7) → LUN number.

    Peripheral (00b) and flat (01b) single-level addressing both carry the LUN
    in the first two bytes; we accept either, as initiators use both.
    """
    first = lun_field >> 48
    method = first >> 14
    if method in (0, 1):
        return first & 0x3FFF
    return 0xFFFF_FFFF  # an addressing method we do not export: "no such LUN"


def int_to_lun(lun: int) -> int:
    """LUN number → 8-byte field; flat space addressing above 255 (SAM-5 §4.7.7)."""
    if lun < 256:
        return lun << 48
    return ((0x4000 | lun) << 48)
