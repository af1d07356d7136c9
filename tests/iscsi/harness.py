"""Drive a sans-IO IscsiConnection in memory: PDUs in, PDUs and actions out."""

from __future__ import annotations

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.connection import IscsiConnection
from pyiscsi_target.iscsi.framing import PduReader, encode_pdu
from pyiscsi_target.iscsi.pdu import F_TRANSIT, LoginRequest
from pyiscsi_target.iscsi.session import PortalContext, TargetEntry

TARGET = "iqn.2026-11.test:disk"
ISID = bytes.fromhex("400001370000")
OFFERS = {
    "MaxRecvDataSegmentLength": "262144", "MaxBurstLength": "1048576", "FirstBurstLength": "262144",
    "ImmediateData": "Yes", "InitialR2T": "No", "MaxOutstandingR2T": "1", "HeaderDigest": "None,CRC32C",
    "DataDigest": "None,CRC32C", "DefaultTime2Wait": "2", "DefaultTime2Retain": "20",
    "MaxConnections": "1", "ErrorRecoveryLevel": "0", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
    "AuthMethod": "None",
}


class RecordingDevice:
    """Stands in for the SCSI core where only the fabric is under test."""

    def __init__(self):
        self.nexuses = []

    def add_nexus(self, nexus):
        self.nexuses.append(nexus)

    def remove_nexus(self, nexus):
        self.nexuses.remove(nexus)


def make_ctx(**kw) -> PortalContext:
    dev = RecordingDevice()
    ctx = PortalContext(targets={TARGET: TargetEntry(TARGET, dev, "disk")}, offers=dict(OFFERS), **kw)
    return ctx


class Wire:
    def __init__(self, ctx=None, now: float = 0.0):
        self.ctx = ctx or make_ctx()
        self.conn = IscsiConnection(self.ctx, ("127.0.0.1", 3260), ("127.0.0.1", 40000), now)
        self.reader = PduReader(1 << 24)
        self.actions = []

    def send(self, hdr, data: bytes = b"", now: float = 0.0):
        """Send one PDU; return the list of (pdu, data) the target answered."""
        raw = b"".join(bytes(b) for b in encode_pdu(hdr.encode(len(data)), data,
                                                    header_digest=self.conn.header_digest and self.conn.phase.value != "login",
                                                    data_digest=self.conn.data_digest and self.conn.phase.value != "login"))
        return self.send_raw(raw, now)

    def send_raw(self, raw: bytes, now: float = 0.0):
        self.conn.receive_data(raw, now)
        return self.drain()

    def drain(self):
        self.reader.header_digest = self.conn.header_digest
        self.reader.data_digest = self.conn.data_digest
        self.reader.feed(b"".join(bytes(b) for b in self.conn.take_output()))
        out = []
        while (rec := self.reader.next_pdu()) is not None:
            out.append((rec.bhs, rec.data))
        self.actions += self.conn.take_actions()
        return out

    def login(self, sec=None, ops=None, *, isid=ISID, tsih=0, cid=1, name="iqn.2026-11.test:init",
              target=TARGET, session_type="Normal"):
        first = [("InitiatorName", name), ("SessionType", session_type)]
        if target:
            first.append(("TargetName", target))
        r1 = self.send(LoginRequest(flags=F_TRANSIT | 0x01, isid=isid, tsih=tsih, itt=1, cid=cid, cmdsn=1),
                       keys.encode_text(first + (sec if sec is not None else [("AuthMethod", "None")])))
        if r1[0][0].status_class:
            return r1
        r2 = self.send(LoginRequest(flags=F_TRANSIT | 0x07, isid=isid, tsih=tsih, itt=1, cid=cid, cmdsn=1),
                       keys.encode_text(ops if ops is not None else [("MaxRecvDataSegmentLength", "65536")]))
        return r1 + r2
