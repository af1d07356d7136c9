"""The per-command execution context handed to every handler.

A :class:`Command` bundles the task from the fabric, the addressed logical
unit (None when the LUN is not configured and the opcode may still be served,
e.g. INQUIRY or REPORT LUNS), the dispatch-table entry and the device.  Its
helpers are the only way a handler touches Data-Out, so residual accounting
(``data_out_wanted``) and short-buffer handling live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from .command import Nexus, ScsiResult, ScsiTask
from .sense import Reason, ScsiError

if TYPE_CHECKING:
    from .lun import LogicalUnit
    from .opcodes import OpSpec
    from .target import ScsiTargetDevice

__all__ = ["Command", "Reply"]

#: What a handler returns: Data-In bytes (status GOOD), nothing (GOOD, no
#: data), or a complete result (e.g. CONDITION MET, RESERVATION CONFLICT).
Reply = Union[ScsiResult, bytes, bytearray, memoryview, None]


@dataclass(slots=True, eq=False)
class Command:
    task: ScsiTask
    lu: LogicalUnit | None
    device: ScsiTargetDevice
    spec: OpSpec | None = None
    # Why ``spec`` is None: reported after the LUN and UA checks.
    lookup_error: ScsiError | None = None
    data_out_wanted: int = 0

    @property
    def cdb(self) -> bytes:
        return self.task.cdb

    @property
    def nexus(self) -> Nexus:
        return self.task.nexus

    @property
    def unit(self) -> LogicalUnit:
        """The LU, for handlers of commands that need one (the LUN check ran)."""
        assert self.lu is not None
        return self.lu

    def data_out(self, length: int, *, exact: bool = False, partial: bool = False) -> memoryview:
        """The first ``length`` bytes of Data-Out the CDB asks for.

        Records ``length`` as the bytes wanted, so the fabric reports the
        residual.  When the initiator sent less than the CDB asks (SPDTL >
        EDTL) nothing is read past the buffer: with ``partial`` the bytes
        that did arrive are returned (FCP-4 §9.4.2 a: process the command
        normally but transfer no data beyond the expected length; what
        libiscsi 1.19's iSCSIResiduals tests require for whole blocks);
        otherwise the command ends with INVALID FIELD IN COMMAND INFORMATION
        UNIT and writes nothing (FCP-4 §9.4.2 b).  More
        data than needed (EDTL > SPDTL) is an underflow: the excess is ignored,
        unless ``exact`` (WRITE SAME / COMPARE AND WRITE, whose data length is
        fixed by the command, SBC-3 §5.2, §5.42): then any other length is
        INVALID FIELD IN CDB.
        """
        self.data_out_wanted = length
        buf = self.task.data_out
        have = len(buf)
        if exact and have != length:
            # The data length is implied by the CDB; a different amount
            # means the CDB does not describe what was sent (LIO answers the
            # same; libiscsi CompareAndWrite.Simple with 256 blocks = 0 in
            # the CDB expects it).
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB)
        if have < length:
            if not partial:
                raise ScsiError(Reason.INVALID_FIELD_IN_COMMAND_IU)
            length = have
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        return view[:length] if have != length else view

    @staticmethod
    def allocation(data: bytes | bytearray | memoryview, allocation_length: int) -> bytes | bytearray | memoryview:
        """Truncate parameter data to the ALLOCATION LENGTH (SPC-4 §4.2.5.6)."""
        if len(data) <= allocation_length:
            return data
        return memoryview(data)[:allocation_length]
