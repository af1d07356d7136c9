"""What the SCSI core receives from a fabric and gives back to it.

The fabric (iSCSI here; a test harness or another transport elsewhere) turns a
transport command into a :class:`ScsiTask`, gathers all Data-Out first, then
awaits :meth:`pyiscsi_target.scsi.target.ScsiTargetDevice.execute`.  The core
answers with a :class:`ScsiResult`.  Nothing here knows about PDUs, ITTs or
sockets: the ``tag`` is an opaque per-nexus task tag (SAM-5 §4.6), the
``nexus`` an I_T nexus identity (SAM-5 §4.5).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TaskAttribute(enum.IntEnum):
    """SAM-5 §8.6 task attributes (values as iSCSI's ATTR field carries them)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class Status(enum.IntEnum):
    """SAM-5 §5.3 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: initiator port and target port identifiers (SPC-4 §4.3.4).

    For iSCSI the initiator port name is ``<InitiatorName>,i,0x<ISID>`` and the
    target port name ``<TargetName>,t,0x<TPGT>`` (RFC 7143 §4.4.4 / SAM-5
    annex); the core only compares and stores them.
    """

    initiator_port: str
    target_port: str
    relative_port_id: int = 1
    # The TransportID the initiator port would be named by in PR commands
    # (SPC-4 §7.6.4); filled by the fabric, opaque to everything but PR.
    transport_id: bytes = b""
    # A nexus keys UA queues, task sets and PR state several times per
    # command: hash it once, not on every lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.initiator_port, self.target_port,
                                                self.relative_port_id, self.transport_id)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(slots=True)
class ScsiTask:
    nexus: Nexus
    lun: int
    cdb: bytes
    tag: int
    attribute: TaskAttribute = TaskAttribute.SIMPLE
    # All Data-Out the initiator sent for this command (len == expected length
    # for writes; empty for reads).  A memoryview avoids copying big writes.
    data_out: bytes | bytearray | memoryview = b""
    # The initiator's Expected Data Transfer Length for the command's direction.
    expected_length: int = 0


@dataclass(slots=True)
class ScsiResult:
    status: int = Status.GOOD
    # Data-In as produced by the command; the fabric sends min(len, expected)
    # and reports residual over/underflow itself.
    data_in: bytes | bytearray | memoryview = b""
    sense: bytes = b""
    # Bytes the CDB asked the initiator to send (Data-Out direction), so the
    # fabric can report residuals for writes (RFC 7143 §11.4.5).
    data_out_wanted: int = 0

    @property
    def good(self) -> bool:
        return self.status == Status.GOOD


class TmfResponse(enum.IntEnum):
    """Outcome of a task management function (SAM-5 §7.1)."""

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    NOT_SUPPORTED = 5
    REJECTED = 255
