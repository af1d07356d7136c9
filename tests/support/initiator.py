"""A small blocking iSCSI initiator for tests — for what real clients cannot send.

Real initiators (libiscsi tools, qemu) prove interoperability; this client adds
cases no real client produces: malformed PDUs, windows outside the CmdSN
window, Windows' exact login key sets.  It is built on the project's own PDU
codec, so the wire format it speaks is the one the property tests pin to the
construct definitions.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.framing import PduReader, encode_pdu
from pyiscsi_target.iscsi.pdu import (
    ALL_ONES, F_FINAL, F_READ, F_TRANSIT, F_WRITE, DataIn, DataOut, LoginRequest, LoginResponse,
    LogoutRequest, NopIn, NopOut, R2T, Reject, ScsiCommand, ScsiResponse, TextRequest, TextResponse,
    int_to_lun,
)

WINDOWS_ISID = bytes.fromhex("400001370000")


class LoginRefused(Exception):
    def __init__(self, status_class: int, status_detail: int):
        super().__init__(f"login refused 0x{status_class:02x}{status_detail:02x}")
        self.status_class = status_class
        self.status_detail = status_detail


@dataclass
class CommandResult:
    status: int
    data: bytes = b""
    sense: bytes = b""
    residual: int = 0
    flags: int = 0
    pdus: list = field(default_factory=list)


class Initiator:
    def __init__(self, host: str, port: int, *, name: str = "iqn.2026-11.test:client",
                 isid: bytes = WINDOWS_ISID, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.name = name
        self.isid = isid
        self.reader = PduReader(16 * 1024 * 1024)
        self.itt = 0x1000
        self.cmdsn = 1
        self.expstatsn = 0
        self.tsih = 0
        self.params: dict[str, str] = {}
        self.header_digest = False
        self.data_digest = False
        self.max_send = 8192

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- raw I/O ----------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, hdr, data: bytes = b"") -> None:
        bufs = encode_pdu(hdr.encode(len(data)), data, header_digest=self.header_digest,
                          data_digest=self.data_digest)
        self.sock.sendall(b"".join(bytes(b) for b in bufs))

    def recv(self):
        while True:
            rec = self.reader.next_pdu()
            if rec is not None:
                pdu = rec.bhs
                if hasattr(pdu, "statsn") and not isinstance(pdu, (DataIn, R2T)):
                    self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
                return rec
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("target closed the connection")
            self.reader.feed(chunk)

    def closed_by_target(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # -- login ------------------------------------------------------------------
    def login(self, target: str | None, *, session_type: str = "Normal", security_keys=None,
              operational_keys=None, tsih: int = 0, cid: int = 1, skip_security: bool = False) -> dict[str, str]:
        """Security stage then operational stage, like Windows does (§0 of the reference)."""
        itt = self.next_itt()
        first = [("InitiatorName", self.name), ("SessionType", session_type)]
        if target is not None and session_type == "Normal":
            first.append(("TargetName", target))
        answers: dict[str, str] = {}
        if not skip_security:
            sec = first + (security_keys if security_keys is not None else [("AuthMethod", "None")])
            rsp = self._login_step(itt, 0, 1, sec, tsih, cid, answers)
            ops = operational_keys if operational_keys is not None else default_operational_keys()
        else:
            ops = first + (operational_keys if operational_keys is not None else default_operational_keys())
        rsp = self._login_step(itt, 1, 3, ops, tsih, cid, answers)
        while not (rsp.transit and rsp.nsg == 3):
            rsp = self._login_step(itt, 1, 3, [], tsih, cid, answers)
        self.tsih = rsp.tsih
        self.params = answers
        self.header_digest = answers.get("HeaderDigest") == "CRC32C"
        self.data_digest = answers.get("DataDigest") == "CRC32C"
        self.reader.header_digest = self.header_digest
        self.reader.data_digest = self.data_digest
        self.max_send = int(answers.get("MaxRecvDataSegmentLength", "8192"))
        return answers

    def _login_step(self, itt, csg, nsg, pairs, tsih, cid, answers) -> LoginResponse:
        req = LoginRequest(flags=F_TRANSIT | (csg << 2) | nsg, isid=self.isid, tsih=tsih, itt=itt,
                           cid=cid, cmdsn=self.cmdsn, expstatsn=self.expstatsn)
        self.send(req, keys.encode_text(pairs))
        rec = self.recv()
        rsp = rec.bhs
        assert isinstance(rsp, LoginResponse), rsp
        if rsp.status_class:
            raise LoginRefused(rsp.status_class, rsp.status_detail)
        answers.update(keys.decode_text(rec.data))
        return rsp

    # -- full feature -------------------------------------------------------------
    def text(self, pairs) -> list[tuple[str, str]]:
        itt = self.next_itt()
        self.send(TextRequest(itt=itt, cmdsn=self.cmdsn, expstatsn=self.expstatsn), keys.encode_text(pairs))
        self.cmdsn += 1
        blob = b""
        while True:
            rec = self.recv()
            rsp = rec.bhs
            assert isinstance(rsp, TextResponse), rsp
            blob += rec.data
            if rsp.final:
                return keys.decode_text(blob)
            self.send(TextRequest(itt=itt, ttt=rsp.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn))
            self.cmdsn += 1

    def nop(self, data: bytes = b"") -> bytes:
        itt = self.next_itt()
        self.send(NopOut(itt=itt, cmdsn=self.cmdsn, expstatsn=self.expstatsn), data)
        rec = self.recv()
        assert isinstance(rec.bhs, NopIn) and rec.bhs.itt == itt, rec.bhs
        return rec.data

    def command(self, cdb: bytes, *, lun: int = 0, read: int = 0, write: bytes = b"",
                expected: int | None = None, cmdsn: int | None = None, immediate_data: bool = True) -> CommandResult:
        itt = self.next_itt()
        flags = F_FINAL | 1
        if read:
            flags |= F_READ
        if write:
            flags |= F_WRITE
        edtl = expected if expected is not None else (read or len(write))
        imm = b""
        if write and immediate_data and self.params.get("ImmediateData", "Yes") == "Yes":
            fbl = int(self.params.get("FirstBurstLength", "65536"))
            imm = write[:min(fbl, self.max_send)]
        sn = self.cmdsn if cmdsn is None else cmdsn
        self.send(ScsiCommand(flags=flags, lun=int_to_lun(lun), itt=itt, expected_length=edtl, cmdsn=sn,
                              expstatsn=self.expstatsn, cdb=cdb.ljust(16, b"\0")), imm)
        if cmdsn is None:
            self.cmdsn += 1
        data = bytearray()
        pdus = []
        while True:
            rec = self.recv()
            pdu = rec.bhs
            pdus.append(pdu)
            if isinstance(pdu, R2T):
                off, n = pdu.buffer_offset, pdu.desired_length
                datasn = 0
                while n > 0:
                    k = min(n, self.max_send)
                    last = k == n
                    self.send(DataOut(flags=F_FINAL if last else 0, lun=int_to_lun(lun), itt=itt, ttt=pdu.ttt,
                                      expstatsn=self.expstatsn, datasn=datasn, buffer_offset=off),
                              write[off:off + k])
                    datasn += 1
                    off += k
                    n -= k
            elif isinstance(pdu, DataIn):
                assert pdu.buffer_offset == len(data), (pdu.buffer_offset, len(data))
                data += rec.data
                if pdu.flags & 0x01:
                    return CommandResult(pdu.status, bytes(data), b"", pdu.residual, pdu.flags, pdus)
            elif isinstance(pdu, ScsiResponse):
                sense = b""
                if rec.data:
                    (n,) = struct.unpack_from(">H", rec.data)
                    sense = rec.data[2:2 + n]
                return CommandResult(pdu.status, bytes(data), sense, pdu.residual, pdu.flags, pdus)
            elif isinstance(pdu, Reject):
                return CommandResult(-1, rec.data, b"", 0, pdu.reason, pdus)
            elif isinstance(pdu, NopIn):
                if pdu.ttt != ALL_ONES:
                    self.send(NopOut(itt=ALL_ONES, ttt=pdu.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn))
            else:
                raise AssertionError(f"unexpected {pdu}")

    def clear_unit_attentions(self, lun: int = 0, tries: int = 8) -> list[bytes]:
        """TEST UNIT READY until GOOD; returns the ASC/ASCQ pairs of the UAs seen."""
        seen = []
        for _ in range(tries):
            r = self.command(bytes(6), lun=lun)
            if r.status == 0:
                return seen
            assert r.status == 2 and r.sense[2] & 0x0F == 6, r
            seen.append(bytes(r.sense[12:14]))
        raise AssertionError(f"unit attentions never cleared: {seen}")

    def logout(self) -> int:
        itt = self.next_itt()
        self.send(LogoutRequest(opbyte=0x46, flags=F_FINAL, itt=itt, cid=1, cmdsn=self.cmdsn,
                                expstatsn=self.expstatsn))
        rec = self.recv()
        return rec.bhs.response


def default_operational_keys() -> list[tuple[str, str]]:
    """What the Microsoft initiator negotiates (reference §2; values as seen)."""
    return [
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("ErrorRecoveryLevel", "2"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"), ("MaxConnections", "4"), ("MaxOutstandingR2T", "1"),
        ("DefaultTime2Wait", "0"), ("DefaultTime2Retain", "20"), ("MaxRecvDataSegmentLength", "65536"),
        ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
    ]
