"""Sense keys, additional sense codes and the one builder of sense data.

Handlers never build sense bytes: they raise :class:`ScsiError` with a
:class:`Reason` (the idea of LIO's ``TCM_*`` / ``sense_detail_table``), and
the dispatcher turns it into fixed-format sense data (SPC-4 §4.5.3) with
:func:`build_sense`.  Fixed format is the one every initiator parses (Windows
disk.sys, Linux sd, libiscsi), so we never send descriptor format (D_SENSE=0).
"""

from __future__ import annotations

import enum

__all__ = ["SenseKey", "Reason", "ScsiError", "build_sense", "parse_sense"]


class SenseKey(enum.IntEnum):
    """SPC-4 §4.5.6 table 28."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


_K = SenseKey


class Reason(enum.Enum):
    """Every condition the core reports: (sense key, ASC, ASCQ) (SPC-4 §4.5.6 table 29)."""

    NO_ADDITIONAL_SENSE = (_K.NO_SENSE, 0x00, 0x00)
    # NOT READY
    NOT_READY_INITIALIZING_COMMAND_REQUIRED = (_K.NOT_READY, 0x04, 0x02)
    # SPC-4 §5.16.2.4.4: a command other than those the standby state
    # allows, received through a target port group in standby (ALUA).
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE = (_K.NOT_READY, 0x04, 0x0B)
    LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION = (_K.NOT_READY, 0x04, 0x0A)
    # MEDIUM ERROR: backend failures (SBC-3 §4.11)
    WRITE_ERROR = (_K.MEDIUM_ERROR, 0x0C, 0x00)
    UNRECOVERED_READ_ERROR = (_K.MEDIUM_ERROR, 0x11, 0x00)
    # HARDWARE ERROR
    INTERNAL_TARGET_FAILURE = (_K.HARDWARE_ERROR, 0x44, 0x00)
    # ILLEGAL REQUEST
    INVALID_FIELD_IN_COMMAND_IU = (_K.ILLEGAL_REQUEST, 0x0E, 0x03)
    PARAMETER_LIST_LENGTH_ERROR = (_K.ILLEGAL_REQUEST, 0x1A, 0x00)
    INVALID_COMMAND_OPERATION_CODE = (_K.ILLEGAL_REQUEST, 0x20, 0x00)
    LBA_OUT_OF_RANGE = (_K.ILLEGAL_REQUEST, 0x21, 0x00)
    INVALID_FIELD_IN_CDB = (_K.ILLEGAL_REQUEST, 0x24, 0x00)
    LOGICAL_UNIT_NOT_SUPPORTED = (_K.ILLEGAL_REQUEST, 0x25, 0x00)
    INVALID_FIELD_IN_PARAMETER_LIST = (_K.ILLEGAL_REQUEST, 0x26, 0x00)
    # SPC-4 §5.12.11.2.2: RELEASE by the holder with another type or scope.
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (_K.ILLEGAL_REQUEST, 0x26, 0x04)
    SAVING_PARAMETERS_NOT_SUPPORTED = (_K.ILLEGAL_REQUEST, 0x39, 0x00)
    MEDIUM_REMOVAL_PREVENTED = (_K.ILLEGAL_REQUEST, 0x53, 0x02)
    # SPC-4 §5.12.7: the registration table is full.
    INSUFFICIENT_REGISTRATION_RESOURCES = (_K.ILLEGAL_REQUEST, 0x55, 0x04)
    # UNIT ATTENTION (SAM-5 §5.14 / SPC-4 §5.14)
    POWER_ON_RESET_OR_BUS_DEVICE_RESET = (_K.UNIT_ATTENTION, 0x29, 0x00)
    POWER_ON_OCCURRED = (_K.UNIT_ATTENTION, 0x29, 0x01)
    SCSI_BUS_RESET_OCCURRED = (_K.UNIT_ATTENTION, 0x29, 0x02)
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = (_K.UNIT_ATTENTION, 0x29, 0x03)
    I_T_NEXUS_LOSS_OCCURRED = (_K.UNIT_ATTENTION, 0x29, 0x07)
    MODE_PARAMETERS_CHANGED = (_K.UNIT_ATTENTION, 0x2A, 0x01)
    RESERVATIONS_PREEMPTED = (_K.UNIT_ATTENTION, 0x2A, 0x03)
    RESERVATIONS_RELEASED = (_K.UNIT_ATTENTION, 0x2A, 0x04)
    REGISTRATIONS_PREEMPTED = (_K.UNIT_ATTENTION, 0x2A, 0x05)
    CAPACITY_DATA_HAS_CHANGED = (_K.UNIT_ATTENTION, 0x2A, 0x09)
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (_K.UNIT_ATTENTION, 0x2F, 0x00)
    INQUIRY_DATA_HAS_CHANGED = (_K.UNIT_ATTENTION, 0x3F, 0x03)
    REPORTED_LUNS_DATA_HAS_CHANGED = (_K.UNIT_ATTENTION, 0x3F, 0x0E)
    # DATA PROTECT
    WRITE_PROTECTED = (_K.DATA_PROTECT, 0x27, 0x00)
    # ABORTED COMMAND
    OVERLAPPED_COMMANDS_ATTEMPTED = (_K.ABORTED_COMMAND, 0x4E, 0x00)
    # MISCOMPARE (SBC-3 §5.2 COMPARE AND WRITE, §5.34 VERIFY)
    MISCOMPARE_DURING_VERIFY = (_K.MISCOMPARE, 0x1D, 0x00)

    @property
    def key(self) -> SenseKey:
        return self.value[0]

    @property
    def asc(self) -> int:
        return self.value[1]

    @property
    def ascq(self) -> int:
        return self.value[2]

    @property
    def is_reset(self) -> bool:
        """Power on / reset class (ASC 29h): supersedes other queued UAs."""
        return self.key == SenseKey.UNIT_ATTENTION and self.asc == 0x29


class ScsiError(Exception):
    """Raised by a handler or check: the command ends in CHECK CONDITION.

    ``field_pointer``/``bit`` locate the offending field (SPC-4 §4.5.2.4.2):
    the byte in the CDB (``in_cdb=True``) or in the parameter list, and the
    bit within it (its most significant bit for a multi-bit field).
    ``information`` fills the INFORMATION field (e.g. the miscompare offset).
    """

    __slots__ = ("reason", "field_pointer", "bit", "in_cdb", "information")

    def __init__(
        self,
        reason: Reason,
        *,
        field_pointer: int | None = None,
        bit: int | None = None,
        in_cdb: bool = True,
        information: int | None = None,
    ) -> None:
        super().__init__(reason.name)
        self.reason = reason
        self.field_pointer = field_pointer
        self.bit = bit
        self.in_cdb = in_cdb
        self.information = information

    @property
    def sense(self) -> bytes:
        return build_sense(
            self.reason,
            field_pointer=self.field_pointer,
            bit=self.bit,
            in_cdb=self.in_cdb,
            information=self.information,
        )


FIXED_SENSE_LENGTH = 18


def build_sense(
    reason: Reason,
    *,
    field_pointer: int | None = None,
    bit: int | None = None,
    in_cdb: bool = True,
    information: int | None = None,
) -> bytes:
    """Fixed-format (70h, current error) sense data, SPC-4 §4.5.3 table 27."""
    buf = bytearray(FIXED_SENSE_LENGTH)
    buf[0] = 0x70
    buf[2] = reason.key
    # INFORMATION is 4 bytes in fixed format; a larger value cannot be
    # represented, so VALID stays 0 then (SPC-4 §4.5.3).
    if information is not None and 0 <= information <= 0xFFFFFFFF:
        buf[0] |= 0x80
        buf[3:7] = information.to_bytes(4, "big")
    buf[7] = FIXED_SENSE_LENGTH - 8  # ADDITIONAL SENSE LENGTH
    buf[12] = reason.asc
    buf[13] = reason.ascq
    if field_pointer is not None:
        # Sense-key specific field pointer (SPC-4 §4.5.2.4.2 table 31):
        # SKSV, C/D (1 = CDB, 0 = parameter list), BPV + BIT POINTER.
        sks = 0x80 | (0x40 if in_cdb else 0)
        if bit is not None:
            sks |= 0x08 | (bit & 0x07)
        buf[15] = sks
        buf[16:18] = field_pointer.to_bytes(2, "big")
    return bytes(buf)


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed-format sense: for tests and logging."""
    return sense[2] & 0x0F, sense[12], sense[13]
