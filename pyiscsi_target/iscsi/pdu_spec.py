"""iSCSI PDUs (RFC 7143 §11): the normative, readable ``construct`` grammar.

This module is the *specification*; :mod:`pyiscsi_target.iscsi.pdu` is the
fast ``struct`` codec the target actually runs.  ``tests/iscsi/test_pdu_codec.py``
proves with hypothesis that both agree on every field and every byte.

Conventions
-----------
* One ``Struct`` per opcode, laid out exactly as the RFC 7143 byte diagrams:
  byte 0 and byte 1 are ``BitStruct`` s with real bit fields (most significant
  bit first, as the RFC numbers them), everything else big-endian integers.
* Field names are the RFC's, written without blanks or hyphens
  (``ExpectedDataTransferLength``, ``InitiatorTaskTag``, ``VersionMax`` ...).
* Every reserved field or bit is a ``Padding``: built as zero, skipped on parse
  ("Any compliant sender MUST set all bits not defined and all reserved fields
  to 0 ... Any compliant receiver MUST ignore any bit not defined and all
  reserved fields", §11.1 / §11.2).
* Bits the RFC draws as a fixed ``1`` (the F bit of unsplit PDUs, I of Login)
  or fields it draws as ``0xffffffff`` are ordinary fields with that value as
  ``Default``: a receiver still has to see what was sent.
* The opcode is a ``Const``: ``SPECS[op].parse`` refuses any other opcode.

``SPECS`` maps opcode -> BHS grammar (48 bytes each, asserted at import);
``AHS``/``AHS_AREA``/``AHS_TYPES`` describe the Additional Header Segments
(§11.2.2) and ``PDU`` the whole PDU (§11.2: BHS, AHS, optional header digest,
data segment with padding, optional data digest).
"""

from __future__ import annotations

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Check,
    Const,
    Default,
    Error,
    FixedSized,
    Flag,
    FocusedSeq,
    GreedyRange,
    If,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Padding,
    Peek,
    Rebuild,
    Struct,
    Switch,
    Terminated,
    this,
)

BHS_LEN = 48
ALL_ONES = 0xFFFFFFFF


# --- Pieces shared by every BHS (§11.2.1) ----------------------------------

def _byte0(opcode: int, immediate: bool):
    """Byte 0: reserved bit, I (Immediate, §11.2.1.1) bit, 6-bit Opcode (§11.2.1.2).

    Target PDUs and the initiator PDUs that have no I bit (Data-Out, SNACK)
    draw bit 1 as reserved (``.``).  Login Request draws it as ``1``.
    """
    return "Byte0" / BitStruct(
        Padding(1),
        "I" / Default(Flag, True) if immediate else Padding(1),
        "Opcode" / Const(opcode, BitsInteger(6)),
    )


def _byte1(*fields):
    """Byte 1: the opcode-specific flags, one bit field each."""
    return "Byte1" / BitStruct(*fields)


_FINAL_ONE = "F" / Default(Flag, True)        # drawn as "1": F of an unsplit PDU (§11.2.1.3)
_LENGTHS = (
    "TotalAHSLength" / Int8ub,                 # in 4-byte words (§11.2.1.4)
    "DataSegmentLength" / Int24ub,             # in bytes, without padding (§11.2.1.5)
)


def _bhs(*fields) -> Struct:
    s = Struct(*fields)
    assert s.sizeof() == BHS_LEN, s
    return s


ISID = "ISID" / BitStruct(                      # §11.12.5
    "T" / BitsInteger(2),                       # format of the rest (OUI, EN, random)
    "A" / BitsInteger(6),
    "B" / BitsInteger(16),
    "C" / BitsInteger(8),
    "D" / BitsInteger(16),
)


# --- Initiator -> target (§11.1.1) ------------------------------------------

# §11.18 NOP-Out
NOP_OUT = _bhs(
    _byte0(0x00, immediate=True),
    _byte1(_FINAL_ONE, Padding(7)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,
    Padding(16),
)

# §11.3 SCSI Command
SCSI_COMMAND = _bhs(
    _byte0(0x01, immediate=True),
    _byte1(
        "F" / Flag,
        "R" / Flag,                              # §11.3.1 Flags and Task Attributes
        "W" / Flag,
        Padding(2),
        "ATTR" / BitsInteger(3),
    ),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,
    "InitiatorTaskTag" / Int32ub,
    "ExpectedDataTransferLength" / Int32ub,
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,
    "CDB" / Bytes(16),                          # §11.3.5, longer ones continue in an AHS
)

# §11.5 Task Management Function Request
TASK_MGMT_REQUEST = _bhs(
    _byte0(0x02, immediate=True),
    _byte1(_FINAL_ONE, "Function" / BitsInteger(7)),   # §11.5.1
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "ReferencedTaskTag" / Int32ub,              # or 0xffffffff
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,
    "RefCmdSN" / Int32ub,                       # or Reserved
    "ExpDataSN" / Int32ub,                      # or Reserved
    Padding(8),
)

# §11.12 Login Request
LOGIN_REQUEST = _bhs(
    _byte0(0x03, immediate=True),               # I is drawn as 1
    _byte1(
        "T" / Flag,                             # Transit
        "C" / Flag,                             # Continue
        Padding(2),
        "CSG" / BitsInteger(2),                 # Current Stage
        "NSG" / BitsInteger(2),                 # Next Stage
    ),
    "VersionMax" / Int8ub,
    "VersionMin" / Int8ub,
    *_LENGTHS,
    ISID,
    "TSIH" / Int16ub,
    "InitiatorTaskTag" / Int32ub,
    "CID" / Int16ub,
    Padding(2),
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,                      # or Reserved
    Padding(16),
)

# §11.10 Text Request
TEXT_REQUEST = _bhs(
    _byte0(0x04, immediate=True),
    _byte1("F" / Flag, "C" / Flag, Padding(6)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,              # or 0xffffffff
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,
    Padding(16),
)

# §11.7.1 SCSI Data-Out
DATA_OUT = _bhs(
    _byte0(0x05, immediate=False),
    _byte1("F" / Flag, Padding(7)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,              # or 0xffffffff
    Padding(4),
    "ExpStatSN" / Int32ub,
    Padding(4),
    "DataSN" / Int32ub,
    "BufferOffset" / Int32ub,
    Padding(4),
)

# §11.14 Logout Request
LOGOUT_REQUEST = _bhs(
    _byte0(0x06, immediate=True),
    _byte1(_FINAL_ONE, "ReasonCode" / BitsInteger(7)),  # §11.14.1
    Padding(2),
    *_LENGTHS,
    Padding(8),
    "InitiatorTaskTag" / Int32ub,
    "CID" / Int16ub,                            # or Reserved
    Padding(2),
    "CmdSN" / Int32ub,
    "ExpStatSN" / Int32ub,
    Padding(16),
)

# §11.16 SNACK Request
SNACK_REQUEST = _bhs(
    _byte0(0x10, immediate=False),
    _byte1(_FINAL_ONE, Padding(3), "Type" / BitsInteger(4)),   # §11.16.1
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,               # or 0xffffffff
    "TargetTransferTag" / Int32ub,              # or SNACK Tag or 0xffffffff
    Padding(4),
    "ExpStatSN" / Int32ub,
    Padding(8),
    "BegRun" / Int32ub,
    "RunLength" / Int32ub,
)


# --- Target -> initiator (§11.1.2) ------------------------------------------

# §11.19 NOP-In
NOP_IN = _bhs(
    _byte0(0x20, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Default(Int32ub, ALL_ONES),   # or 0xffffffff
    "TargetTransferTag" / Int32ub,              # or 0xffffffff
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    Padding(12),
)

# §11.4 SCSI Response
SCSI_RESPONSE = _bhs(
    _byte0(0x21, immediate=False),
    _byte1(
        _FINAL_ONE,
        Padding(2),
        "o" / Flag,                             # Bidirectional Read Residual Overflow
        "u" / Flag,                             # Bidirectional Read Residual Underflow
        "O" / Flag,                             # Residual Overflow
        "U" / Flag,                             # Residual Underflow
        Padding(1),
    ),
    "Response" / Int8ub,                        # §11.4.3
    "Status" / Int8ub,                          # §11.4.2
    *_LENGTHS,
    Padding(8),
    "InitiatorTaskTag" / Int32ub,
    "SNACKTag" / Int32ub,                       # or Reserved
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "ExpDataSN" / Int32ub,                      # or Reserved
    "BidirectionalReadResidualCount" / Int32ub,  # or Reserved
    "ResidualCount" / Int32ub,                  # or Reserved
)

# §11.6 Task Management Function Response
TASK_MGMT_RESPONSE = _bhs(
    _byte0(0x22, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    "Response" / Int8ub,                        # §11.6.1
    Padding(1),
    *_LENGTHS,
    Padding(8),
    "InitiatorTaskTag" / Int32ub,
    Padding(4),
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    Padding(12),
)

# §11.13 Login Response
LOGIN_RESPONSE = _bhs(
    _byte0(0x23, immediate=False),
    _byte1(
        "T" / Flag,
        "C" / Flag,
        Padding(2),
        "CSG" / BitsInteger(2),
        "NSG" / BitsInteger(2),
    ),
    "VersionMax" / Int8ub,
    "VersionActive" / Int8ub,
    *_LENGTHS,
    ISID,
    "TSIH" / Int16ub,
    "InitiatorTaskTag" / Int32ub,
    Padding(4),
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "StatusClass" / Int8ub,                     # §11.13.5
    "StatusDetail" / Int8ub,
    Padding(10),
)

# §11.11 Text Response
TEXT_RESPONSE = _bhs(
    _byte0(0x24, immediate=False),
    _byte1("F" / Flag, "C" / Flag, Padding(6)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,              # or 0xffffffff
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    Padding(12),
)

# §11.7.1 SCSI Data-In
DATA_IN = _bhs(
    _byte0(0x25, immediate=False),
    _byte1(
        "F" / Flag,
        "A" / Flag,                             # Acknowledge (§11.7.2)
        Padding(3),                             # drawn as 0 0 0
        "O" / Flag,                             # Residual Overflow
        "U" / Flag,                             # Residual Underflow
        "S" / Flag,                             # Status (§11.7.4)
    ),
    Padding(1),
    "Status" / Int8ub,                          # or Reserved
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,              # or 0xffffffff
    "StatSN" / Int32ub,                         # or Reserved
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "DataSN" / Int32ub,
    "BufferOffset" / Int32ub,
    "ResidualCount" / Int32ub,
)

# §11.15 Logout Response
LOGOUT_RESPONSE = _bhs(
    _byte0(0x26, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    "Response" / Int8ub,                        # §11.15.1
    Padding(1),
    *_LENGTHS,
    Padding(8),
    "InitiatorTaskTag" / Int32ub,
    Padding(4),
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    Padding(4),
    "Time2Wait" / Int16ub,
    "Time2Retain" / Int16ub,
    Padding(4),
)

# §11.8 Ready To Transfer (R2T)
R2T = _bhs(
    _byte0(0x31, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,
    "InitiatorTaskTag" / Int32ub,
    "TargetTransferTag" / Int32ub,
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "R2TSN" / Int32ub,
    "BufferOffset" / Int32ub,
    "DesiredDataTransferLength" / Int32ub,
)

# §11.9 Asynchronous Message
ASYNC_MESSAGE = _bhs(
    _byte0(0x32, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    Padding(2),
    *_LENGTHS,
    "LUN" / Int64ub,                            # LUN or Reserved
    "InitiatorTaskTag" / Default(Int32ub, ALL_ONES),   # drawn as 0xffffffff
    Padding(4),
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "AsyncEvent" / Int8ub,                      # §11.9.1
    "AsyncVCode" / Int8ub,
    "Parameter1" / Int16ub,                     # or Reserved
    "Parameter2" / Int16ub,                     # or Reserved
    "Parameter3" / Int16ub,                     # or Reserved
    Padding(4),
)

# §11.17 Reject
REJECT = _bhs(
    _byte0(0x3F, immediate=False),
    _byte1(_FINAL_ONE, Padding(7)),
    "Reason" / Int8ub,                          # §11.17.1
    Padding(1),
    *_LENGTHS,
    Padding(8),
    "InitiatorTaskTag" / Default(Int32ub, ALL_ONES),   # drawn as 0xffffffff
    Padding(4),
    "StatSN" / Int32ub,
    "ExpCmdSN" / Int32ub,
    "MaxCmdSN" / Int32ub,
    "DataSNOrR2TSN" / Int32ub,                  # DataSN/R2TSN or Reserved
    Padding(8),
)


SPECS: dict[int, Struct] = {
    0x00: NOP_OUT,
    0x01: SCSI_COMMAND,
    0x02: TASK_MGMT_REQUEST,
    0x03: LOGIN_REQUEST,
    0x04: TEXT_REQUEST,
    0x05: DATA_OUT,
    0x06: LOGOUT_REQUEST,
    0x10: SNACK_REQUEST,
    0x20: NOP_IN,
    0x21: SCSI_RESPONSE,
    0x22: TASK_MGMT_RESPONSE,
    0x23: LOGIN_RESPONSE,
    0x24: TEXT_RESPONSE,
    0x25: DATA_IN,
    0x26: LOGOUT_RESPONSE,
    0x31: R2T,
    0x32: ASYNC_MESSAGE,
    0x3F: REJECT,
}

for _op, _s in SPECS.items():
    assert _s.sizeof() == BHS_LEN, (hex(_op), _s.sizeof())


# --- Additional Header Segments (§11.2.2) ----------------------------------
#
#   0| AHSLength (2 bytes)           | AHSType       | AHS-Specific  |
#   4/ AHS-Specific ...                                              /
#
# AHSLength counts the AHS-Specific bytes (from byte 3 on), not AHSLength,
# AHSType or the padding to the next 4-byte boundary.  AHSType: bits 0-1
# reserved, bits 2-7 the AHS code (§11.2.2.2).

AHS_CODE_EXTENDED_CDB = 1
AHS_CODE_BIDI_READ_LENGTH = 2

_AHS_TYPE = "AHSType" / BitStruct(Padding(2), "AHSCode" / BitsInteger(6))
_AHS_PAD = Padding(lambda this: -(3 + this.AHSLength) % 4)

# Generic AHS: what every AHS looks like, whatever its code.
AHS = Struct(
    "AHSLength" / Rebuild(Int16ub, lambda this: len(this.AHSSpecific)),
    Check(this.AHSLength > 0),
    _AHS_TYPE,
    "AHSSpecific" / Bytes(this.AHSLength),
    _AHS_PAD,
)

# §11.2.2.3 Extended CDB AHS: AHSLength = CDB length - 15, i.e. the bytes of
# the CDB beyond the first 16 (carried in the BHS) plus the reserved byte.
EXTENDED_CDB_AHS = Struct(
    "AHSLength" / Rebuild(Int16ub, lambda this: len(this.ExtendedCDB) + 1),
    "AHSType" / BitStruct(Padding(2), "AHSCode" / Const(AHS_CODE_EXTENDED_CDB, BitsInteger(6))),
    Padding(1),
    "ExtendedCDB" / Bytes(this.AHSLength - 1),
    _AHS_PAD,
)

# §11.2.2.4 Bidirectional Read Expected Data Transfer Length AHS.
BIDI_READ_LENGTH_AHS = Struct(
    "AHSLength" / Const(5, Int16ub),
    "AHSType" / BitStruct(Padding(2), "AHSCode" / Const(AHS_CODE_BIDI_READ_LENGTH, BitsInteger(6))),
    Padding(1),
    "BidirectionalReadExpectedDataTransferLength" / Int32ub,
)

AHS_TYPES: dict[int, Struct] = {
    AHS_CODE_EXTENDED_CDB: EXTENDED_CDB_AHS,
    AHS_CODE_BIDI_READ_LENGTH: BIDI_READ_LENGTH_AHS,
}

# The AHS area of a PDU (TotalAHSLength * 4 bytes): whole AHSs to the end.
AHS_AREA = FocusedSeq("AHS", "AHS" / GreedyRange(AHS), Terminated)


# --- A whole PDU (§11.2) ----------------------------------------------------
#
# BHS | AHS ... | Header-Digest? | Data Segment | pad to 4 | Data-Digest?
#
# The digests (CRC32C, present when HeaderDigest/DataDigest were negotiated)
# are selected with parse/build keywords: ``PDU.parse(buf, header_digest=True,
# data_digest=True)``; a data digest exists only if there is a data segment.
# Building needs ``Opcode`` (the opcode) besides the ``BHS`` values.

PDU = Struct(
    "Opcode" / Peek(Int8ub),                    # byte 0, to pick the BHS grammar
    "BHS" / Switch(lambda this: this.Opcode & 0x3F, SPECS, default=Error),  # unknown opcode
    "AHS" / FixedSized(this.BHS.TotalAHSLength * 4, AHS_AREA),
    "HeaderDigest" / Default(If(lambda this: this._params.get("header_digest", False), Int32ub), None),
    "DataSegment" / Bytes(this.BHS.DataSegmentLength),
    Padding(lambda this: -this.BHS.DataSegmentLength % 4),
    "DataDigest" / Default(If(
        lambda this: this._params.get("data_digest", False) and this.BHS.DataSegmentLength > 0,
        Int32ub,
    ), None),
)
