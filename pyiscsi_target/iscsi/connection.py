"""One iSCSI connection, login through logout (RFC 7143) — sans-IO.

Bytes go in with :meth:`IscsiConnection.receive_data`; what to write comes
out of :meth:`take_output` (buffers for ``transport.writelines``) and what to
*do* out of :meth:`take_actions` (run a SCSI command, a task management
function, close).  Results come back through :meth:`scsi_done` and
:meth:`tmf_done`.  Time is passed in (``now``); nothing here reads a clock,
touches a socket or a file.

Routing is one table, opcode → handler (aioquic's frame table, asyncssh's
packet handlers); each handler owns one PDU type.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from ..payload import DeferredPayload
from ..scsi.command import ScsiResult, ScsiTask, Status, TaskAttribute
from . import keys as _keys
from .cmdsn import sn_add, sn_le
from .discovery import send_targets
from .framing import HeaderDigestError, PduReader, Received, encode_pdu
from .login import Login, LoginFailure, LoginStatus, peer_description
from .pdu import (
    ALL_ONES, IMMEDIATE, AhsType, decode_ahs, F_CONTINUE, F_FINAL, F_OVERFLOW, F_READ, F_STATUS,
    F_UNDERFLOW, F_WRITE, DataIn, DataOut,
    LoginRequest, LogoutRequest, LogoutResponse, NopIn, NopOut, Opcode, PduFormatError,
    R2T, Reject, RejectReason, ScsiCommand, ScsiResponse, SnackRequest, TaskMgmtRequest,
    TaskMgmtResponse, TextRequest, TextResponse, lun_to_int,
)
from .session import PortalContext, Session
from .task import DataOutError, WriteTransfer

log = logging.getLogger("pyiscsi_target.connection")
_PACK_DATA_IN = DataIn._S.pack
_PACK_SCSI_RESPONSE = ScsiResponse._S.pack
_UNPACK_SCSI_COMMAND = ScsiCommand._S.unpack

# The largest write a command may announce (Expected Data Transfer Length):
# twice the largest MAXIMUM TRANSFER LENGTH any LU reports (32 MiB).
MAX_WRITE_BUFFER = 64 * 1024 * 1024


class Phase(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    CLOSED = "closed"


# Module constants: an Enum member looked up on its class costs ~0.1 us more
# than a global (Python 3.11), and these are used for every PDU or command.
_LOGIN, _CLOSED = Phase.LOGIN, Phase.CLOSED
_GOOD = Status.GOOD
_OP_DATA_IN, _OP_SCSI_RESPONSE = int(Opcode.DATA_IN), int(Opcode.SCSI_RESPONSE)


class TmfFunction(enum.IntEnum):
    """§11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponseCode(enum.IntEnum):
    """§11.6.1."""

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


# --- actions for the I/O glue ------------------------------------------------

@dataclass(slots=True)
class Execute:
    itt: int
    device: Any
    task: ScsiTask


@dataclass(slots=True)
class TaskManagement:
    itt: int
    function: int
    device: Any
    nexus: Any
    lun: int
    rtt: int


@dataclass(slots=True)
class SessionStarted:
    session: Session
    reinstated: list          # connections the glue must close (reinstatement)


@dataclass(slots=True)
class Close:
    reason: str


# Opcodes as plain ints in frozensets: one hash lookup per PDU, where a tuple
# of enum members would be built and compared member by member.
_NOT_IN_DISCOVERY = frozenset(int(o) for o in (Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST, Opcode.DATA_OUT,
                                               Opcode.SNACK_REQUEST))
_WITHOUT_CMDSN = frozenset((int(Opcode.DATA_OUT), int(Opcode.SNACK_REQUEST)))

_SIMPLE = TaskAttribute.SIMPLE
_ATTR = {0: TaskAttribute.UNTAGGED, 1: TaskAttribute.SIMPLE, 2: TaskAttribute.ORDERED,
         3: TaskAttribute.HEAD_OF_QUEUE, 4: TaskAttribute.ACA}


class IscsiConnection:
    # scsi_done packs the usual outcomes (GOOD read in one Data-In, GOOD
    # without data) in one call; False takes the general code for every
    # command (tests compare both).
    one_pdu_answers = True
    # A usual SCSI Command goes from the reader to Execute in one step
    # (_scsi_command_quick); False: every PDU takes the general path (tests
    # compare both).
    quick_commands = True
    _commands_ok = False        # the quick lane is open: full feature phase, not discovery
    # get_timer's answer may have moved earlier (phase, NOP-In ping sent or
    # answered) since the glue last asked; cleared by the glue.  Only
    # last_rx moves it otherwise, and always later.
    timer_moved = True

    def __init__(self, ctx: PortalContext, local: tuple[str, int], peer: tuple[str, int], now: float = 0.0):
        self.ctx = ctx
        self.local = local
        self.peer = peer
        self.phase = Phase.LOGIN
        self.reader = PduReader(8192)
        self.login = Login(ctx, local, peer)
        self.session: Session | None = None
        self.cid = 0
        self.statsn = 0
        self.header_digest = False
        self.data_digest = False
        self.max_send_data = 8192        # the initiator's MaxRecvDataSegmentLength
        self._out: list = []
        self._actions: list = []
        self.transfers: dict[int, WriteTransfer] = {}   # writes still gathering Data-Out
        # ITTs handed to the SCSI core → (command PDU, R2Ts sent): one dict
        # for "in use" and what its response needs, one lookup per command.
        self.running: dict[int, tuple] = {}
        self._ttt = 0
        self._text: dict[int, list] = {}                # pending multi-PDU text responses by TTT
        self._text_in: bytearray = bytearray()          # initiator text with C bit
        self.last_rx = now
        self.login_deadline = now + ctx.login_timeout
        self.nop_ttt: int | None = None
        self.nop_deadline = 0.0
        self.logged_out = False
        self._tmf_pending: dict[int, TaskMgmtRequest] = {}

    # -- bytes in / out -------------------------------------------------------
    def take_output(self) -> list:
        out, self._out = self._out, []
        return out

    def take_actions(self) -> list:
        a, self._actions = self._actions, []
        return a

    def _send(self, hdr, data=b"") -> None:
        self._out.extend(encode_pdu(hdr.encode(len(data)), data,
                                    header_digest=self.header_digest, data_digest=self.data_digest))

    def close(self, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self.timer_moved = True
            self._actions.append(Close(reason))

    def receive_data(self, data, now: float = 0.0) -> None:
        """Bytes from the peer (a copy the caller may reuse afterwards)."""
        if self.phase is _CLOSED:
            return
        self.reader.feed(data)
        self._process(now)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """For asyncio.BufferedProtocol: where the socket should read into."""
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int, now: float = 0.0) -> None:
        """``nbytes`` were read into the last :meth:`get_buffer`."""
        if self.phase is _CLOSED:
            return
        self.reader.buffer_updated(nbytes)
        self._process(now)

    def _process(self, now: float) -> None:
        self.last_rx = now
        next_pdu = self.reader.next_pdu
        next_command = self.reader.next_command
        while self.phase is not _CLOSED:
            if self.phase is _LOGIN:
                if not self._login_header_ok():
                    return
            elif self._commands_ok:
                cmd = next_command()
                if cmd is not None:
                    raw, data, rest = cmd
                    self._scsi_command_quick(raw, data)
                    if not rest:            # the usual end of a chunk: no call to find nothing
                        return
                    continue
            try:
                rec = next_pdu()
            except HeaderDigestError:
                # §7.8: at ERL 0 a header digest error is a connection failure.
                log.warning("%s: header digest error, closing connection", self._who())
                self.close("header digest error")
                return
            except PduFormatError as exc:
                self._protocol_reject(getattr(exc, "raw_bhs", b""), exc.reason, str(exc))
                continue
            if rec is None:
                return
            if self.phase is _LOGIN:
                self._login_pdu(rec)
            else:
                self._ffp_pdu(rec)

    def _who(self) -> str:
        name = self.session.initiator_name if self.session else None
        if name is None and self.login.neg is not None:
            name = self.login.neg.params.initiator_name
        return f"{name or '?'} from {peer_description(self.peer)}"

    def log_fields(self, event: str, **more: Any) -> dict[str, Any]:
        """Structured fields of a log line about this connection (``extra=``;
        JSON logs show them): event, initiator name, address, and ``more``."""
        name = self.session.initiator_name if self.session else None
        if name is None and self.login.neg is not None:
            name = self.login.neg.params.initiator_name
        return {"event": event, "initiator": name, "address": peer_description(self.peer), **more}

    # -- login phase ------------------------------------------------------------
    def _login_header_ok(self) -> bool:
        """Before login completes only Login Requests of at most 8192 bytes of
        text are valid (§6.3, §13.12): anything else closes the connection at
        once, without waiting for (or buffering) the data it announces."""
        raw = self.reader.peek_header()
        if raw is None:
            return True
        if raw[0] & 0x3F != Opcode.LOGIN_REQUEST or int.from_bytes(raw[5:8], "big") > self.reader.max_data_len \
                or raw[4]:
            if raw[0] & 0x3F == Opcode.LOGIN_REQUEST and self.login.first is not None:
                self._send(self.login.failure_response(LoginRequest.decode(raw), LoginFailure(
                    LoginStatus.INITIATOR_ERROR, "oversized login PDU")))
            log.warning("%s: not a valid Login Request during login (opcode 0x%02x), closing", self._who(),
                        raw[0] & 0x3F)
            self.close("invalid PDU during login")
            return False
        return True

    def _login_pdu(self, rec: Received) -> None:
        req = rec.bhs
        if not isinstance(req, LoginRequest):
            # §6.3: only Login Requests are valid until login completes.
            if isinstance(req, (ScsiCommand, TextRequest, NopOut, LogoutRequest, TaskMgmtRequest, DataOut,
                                SnackRequest)):
                first = self.login.first
                if first is not None:
                    self._send(self.login.failure_response(first, LoginFailure(
                        LoginStatus.INVALID_DURING_LOGIN, "non-login PDU")))
            log.warning("%s: %s during login, closing", self._who(), type(req).__name__)
            self.close("non-login PDU during login")
            return
        if rec.oversized or not rec.data_digest_ok:
            self._send(self.login.failure_response(req, LoginFailure(LoginStatus.INITIATOR_ERROR, "bad data")))
            self.close("bad login data")
            return
        try:
            rsp, text = self.login.receive(req, rec.data)
        except LoginFailure as exc:
            log.warning("login refused: %s: %s (status 0x%04x)", self._who(), exc.message, exc.status,
                        extra=self.log_fields("login_refused", reason=exc.message, status=f"0x{exc.status:04x}"))
            self._send(self.login.failure_response(req, exc))
            self.close(exc.message)
            return
        self._send(rsp, text)
        result = self.login.result
        if result is None:
            return
        self._enter_full_feature(result)

    def _enter_full_feature(self, result) -> None:
        s: Session = result.session
        p = self.login.neg.params
        self.session = s
        self.cid = result.cid
        self.statsn = self.login.statsn
        self.phase = Phase.FULL_FEATURE
        self.timer_moved = True
        # Digests and segment limits apply from the first full-feature PDU on (§6.3).
        self.header_digest = self.reader.header_digest = bool(p.header_digest)
        self.data_digest = self.reader.data_digest = bool(p.data_digest)
        self.reader.max_data_len = p.target_max_recv_data_segment_length
        self.max_send_data = p.max_recv_data_segment_length
        self._commands_ok = self.quick_commands and not s.discovery
        for old in result.reinstated:
            if old is not self:
                old.session_reinstated()
        s.connections[self.cid] = self
        if result.new_session and s.nexus is not None:
            s.target.device.add_nexus(s.nexus)
        self._actions.append(SessionStarted(s, [c for c in result.reinstated if c is not self]))
        log.info("login: %s %s session to %s, ISID %s TSIH %d CID %d, digests %s/%s", self._who(),
                 s.session_type, s.target.name if s.target else "discovery", s.isid.hex(), s.tsih,
                 self.cid, "CRC32C" if self.header_digest else "None", "CRC32C" if self.data_digest else "None",
                 extra=self.log_fields("login", session_type=s.session_type,
                                       target=s.target.name if s.target else None, isid=s.isid.hex(),
                                       tsih=s.tsih, cid=self.cid))

    def session_reinstated(self) -> None:
        """This connection's session was replaced by a new login (§6.3.5)."""
        self.close("session reinstated")

    # -- full feature phase -----------------------------------------------------
    def _window(self) -> tuple[int, int]:
        w = self.session.window
        return w.exp_cmdsn, w.max_cmdsn

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    def _protocol_reject(self, raw_bhs: bytes, reason: int, why: str, datasn: int = 0) -> None:
        log.warning("%s: rejecting PDU: %s", self._who(), why)
        if self.phase is Phase.LOGIN:
            self.close(why)
            return
        exp, mx = self._window()
        self._send(Reject(reason=reason, statsn=self._next_statsn(), expcmdsn=exp, maxcmdsn=mx, datasn=datasn),
                   raw_bhs)

    def _ffp_pdu(self, rec: Received) -> None:
        pdu = rec.bhs
        handler = self._HANDLERS.get(pdu.opcode if pdu is not None else -1)
        if rec.oversized:
            self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR,
                                  f"data segment longer than MaxRecvDataSegmentLength {self.reader.max_data_len}")
            self._consume_cmdsn(pdu)
            return
        if handler is None:
            self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR, f"{type(pdu).__name__} not valid here")
            return
        if not rec.data_digest_ok:
            # §7.8 at ERL 0: Reject the PDU; the initiator recovers the task.
            self._protocol_reject(rec.raw_bhs, RejectReason.DATA_DIGEST_ERROR, "data digest error")
            self._consume_cmdsn(pdu)
            return
        op = pdu.opbyte & 0x3F
        if self.session.discovery and op in _NOT_IN_DISCOVERY:
            self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR, "not allowed in a discovery session")
            return
        if op in _WITHOUT_CMDSN or pdu.opbyte & IMMEDIATE:
            handler(self, rec)
            return
        ready = self.session.window.accept(pdu.cmdsn, rec)
        if ready is None:
            # §4.2.2.1: outside the window, or a duplicate: silently ignored.
            exp, mx = self._window()
            log.warning("%s: %s with CmdSN %d outside window [%d, %d], ignored", self._who(),
                        type(pdu).__name__, pdu.cmdsn, exp, mx)
            return
        for r in ready:
            self._HANDLERS[r.bhs.opcode](self, r)

    def _consume_cmdsn(self, pdu) -> None:
        """A rejected non-immediate command still uses up its CmdSN: at ERL 0 the
        initiator does not retry it, and a hole would stall every later command."""
        if pdu is not None and not pdu.immediate and pdu.opcode not in (Opcode.DATA_OUT, Opcode.SNACK_REQUEST) \
                and hasattr(pdu, "cmdsn"):
            self.session.window.accept(pdu.cmdsn, None)

    # NOP-Out → NOP-In (§11.18, §11.19)
    def _on_nop_out(self, rec: Received) -> None:
        pdu: NopOut = rec.bhs
        if pdu.itt == ALL_ONES:
            # An answer to our ping (or a ping that wants no answer).
            if pdu.ttt != ALL_ONES and pdu.ttt == self.nop_ttt:
                self.nop_ttt = None
                self.timer_moved = True
            return
        exp, mx = self._window()
        data = rec.data[:self.max_send_data]
        if not pdu.immediate:
            self.session.window.done()
            exp, mx = self._window()
        self._send(NopIn(lun=pdu.lun, itt=pdu.itt, ttt=ALL_ONES, statsn=self._next_statsn(),
                         expcmdsn=exp, maxcmdsn=mx), data)

    # Text (§11.10, §11.11) — SendTargets, with C-bit continuation both ways
    def _on_text(self, rec: Received) -> None:
        pdu: TextRequest = rec.bhs
        if not pdu.immediate:
            self.session.window.done()
        exp, mx = self._window()
        if pdu.ttt != ALL_ONES:
            pending = self._text.pop(pdu.ttt, None)
            if pending is None:
                self._protocol_reject(rec.raw_bhs, RejectReason.INVALID_PDU_FIELD, "Text Request for unknown TTT")
                return
            self._send_text_chunk(pdu, pending)
            return
        self._text_in += rec.data
        if pdu.cont:
            # More initiator text follows: empty response, C=0 F=0 (§11.10.2).
            ttt = self._new_ttt()
            self._text[ttt] = []
            self._send(TextResponse(flags=0, lun=pdu.lun, itt=pdu.itt, ttt=ttt, statsn=self._next_statsn(),
                                    expcmdsn=exp, maxcmdsn=mx))
            return
        try:
            pairs = _keys.decode_text(bytes(self._text_in))
        except _keys.TextFormatError as exc:
            self._text_in.clear()
            self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR, f"malformed text: {exc}")
            return
        self._text_in.clear()
        answers: list[tuple[str, str]] = []
        for k, v in pairs:
            if k == "SendTargets":
                who = {"initiator": self.session.initiator_name, "peer": self.peer[0]}   # ACL filter
                if self.session.discovery:
                    answers += send_targets(self.ctx, v, self.local, **who)
                else:
                    # In a normal session only the session's own target is reported.
                    own = self.session.target.name
                    val = "" if v == "All" else v
                    answers += send_targets(self.ctx, val, self.local, only=own, **who) if val in ("", own) else []
            elif k.startswith(("X-", "X#")):
                answers.append((k, "NotUnderstood"))
            else:
                answers.append((k, "NotUnderstood" if k not in _keys.KEYS else "Irrelevant"))
        blob = _keys.encode_text(answers)
        self._send_text_chunk(pdu, [blob])

    def _send_text_chunk(self, pdu: TextRequest, pending: list) -> None:
        exp, mx = self._window()
        blob = b"".join(pending)
        chunk, rest = blob[:self.max_send_data], blob[self.max_send_data:]
        if rest:
            ttt = self._new_ttt()
            self._text[ttt] = [rest]
            flags = F_CONTINUE
        else:
            ttt, flags = ALL_ONES, F_FINAL
        self._send(TextResponse(flags=flags, lun=pdu.lun, itt=pdu.itt, ttt=ttt, statsn=self._next_statsn(),
                                expcmdsn=exp, maxcmdsn=mx), chunk)

    def _new_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF
        return self._ttt or self._new_ttt()

    # Logout (§11.14, §11.15)
    def _on_logout(self, rec: Received) -> None:
        pdu: LogoutRequest = rec.bhs
        if not pdu.immediate:
            self.session.window.done()
        exp, mx = self._window()
        p = self.session.params
        response = 0
        if pdu.reason == 0:              # close the session
            targets = list(self.session.connections.values())
        elif pdu.reason == 1:            # close a connection
            c = self.session.connections.get(pdu.cid)
            targets = [c] if c is not None else []
            response = 0 if c is not None else 1
        else:                            # remove the connection for recovery: needs ERL 2
            targets, response = [], 2
        self._send(LogoutResponse(response=response, itt=pdu.itt, statsn=self._next_statsn(), expcmdsn=exp,
                                  maxcmdsn=mx, time2wait=p.default_time2wait, time2retain=p.default_time2retain))
        log.info("logout: %s reason %d response %d", self._who(), pdu.reason, response,
                 extra=self.log_fields("logout", target=self.session.target.name if self.session.target else None,
                                       tsih=self.session.tsih, cid=self.cid, reason=pdu.reason, response=response))
        for c in targets:
            if c is not self:
                c.close("logged out by another connection")
        if self in targets:
            self.logged_out = True
            self.close("logout")

    # SCSI Command (§11.3)
    def _scsi_command_quick(self, raw: bytes, data: bytes) -> None:
        """A SCSI Command PDU as PduReader.next_command gives it.  The usual
        case goes straight to Execute, in one step: a non-immediate command
        with the next CmdSN and a free ITT that is a read or carries no data,
        or a write whose data all came as immediate data (F set, within
        FirstBurstLength, ImmediateData=Yes).  That is what _ffp_pdu,
        CmdWindow.accept, _on_scsi_command and _execute do for it; anything
        else (a gap in CmdSN, an ITT in use, unsolicited Data-Out to come, an
        error to reject) takes that general path, which decides it."""
        pdu = ScsiCommand(*_UNPACK_SCSI_COMMAND(raw))
        flags = pdu.flags
        itt = pdu.itt
        expected = pdu.expected_length
        s = self.session
        if flags & F_WRITE:
            p = s.params
            usual = flags & (F_FINAL | F_READ) == F_FINAL and len(data) == expected \
                and p.immediate_data and expected <= p.first_burst_length
        else:
            usual = not data
        if usual and not pdu.opbyte & IMMEDIATE and itt not in self.running and itt not in self.transfers \
                and s.window.accept_next(pdu.cmdsn):
            self.running[itt] = (pdu, 0)
            self._actions.append(Execute(itt, s.target.device, ScsiTask(
                s.nexus, lun_to_int(pdu.lun), pdu.cdb, itt, _ATTR.get(flags & 0x07, _SIMPLE), data, expected)))
            return
        self._ffp_pdu(Received(pdu, raw, b"", data))

    def _on_scsi_command(self, rec: Received) -> None:
        pdu: ScsiCommand = rec.bhs
        s = self.session
        p = s.params
        itt = pdu.itt
        if itt in self.transfers or itt in self.running:
            self._protocol_reject(rec.raw_bhs, RejectReason.TASK_IN_PROGRESS, f"ITT 0x{itt:08x} already in use")
            if not pdu.immediate:
                s.window.done()
            return
        cdb = pdu.cdb
        if rec.ahs:
            cdb = self._extended_cdb(rec, cdb)
            if cdb is None:
                return
        lun = lun_to_int(pdu.lun)
        data = rec.data
        expected = pdu.expected_length
        write = pdu.flags & F_WRITE
        if not write and not data:
            # A read or no-data command, everything checked: the usual case.
            self._execute(pdu, lun, cdb, data)
            return
        if data and not write:
            self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR, "immediate data without W bit")
            if not pdu.immediate:
                s.window.done()
            return
        if pdu.write and expected > MAX_WRITE_BUFFER:
            # Far above any LU's MAXIMUM TRANSFER LENGTH (VPD B0): only a broken
            # or hostile initiator asks, and buffering it would cost that much memory.
            return self._reject_cmd(rec, f"Expected Data Transfer Length {expected} above {MAX_WRITE_BUFFER}",
                                    RejectReason.INVALID_PDU_FIELD)
        if pdu.write and expected:
            if data and not p.immediate_data:
                return self._reject_cmd(rec, "immediate data, but ImmediateData=No")
            if len(data) > min(p.first_burst_length, expected):
                return self._reject_cmd(rec, "immediate data beyond FirstBurstLength/expected length")
            more_unsolicited = not pdu.final
            if more_unsolicited and p.initial_r2t:
                return self._reject_cmd(rec, "unsolicited data with InitialR2T=Yes")
            if len(data) == expected and not more_unsolicited:
                # All the data came as immediate data (the usual case for writes
                # up to FirstBurstLength): hand the PDU's own buffer over, no copy.
                self._execute(pdu, lun, cdb, data)
                return
            t = WriteTransfer(itt, lun, expected, data, more_unsolicited, p.first_burst_length, pdu, rec)
            if not t.complete:
                self.transfers[itt] = t
                self._send_r2ts(t)
                return
            data = t.buf
        elif pdu.write:
            data = b""
        self._execute(pdu, lun, cdb, data)

    def _reject_cmd(self, rec: Received, why: str, reason: int = RejectReason.PROTOCOL_ERROR) -> None:
        self._protocol_reject(rec.raw_bhs, reason, why)
        if not rec.bhs.immediate:
            self.session.window.done()

    def _extended_cdb(self, rec: Received, cdb: bytes) -> bytes | None:
        try:
            items = decode_ahs(rec.ahs)
        except PduFormatError as exc:
            self._reject_cmd(rec, str(exc))
            return None
        for a in items:
            if a.type == AhsType.EXTENDED_CDB:
                return cdb + a.body
        return cdb

    def _send_r2ts(self, t: WriteTransfer) -> None:
        p = self.session.params
        exp, mx = self._window()
        for b in t.next_r2ts(p.max_outstanding_r2t, p.max_burst_length, self._new_ttt):
            self._send(R2T(lun=t.cmd.lun, itt=t.itt, ttt=b.ttt, statsn=self.statsn, expcmdsn=exp, maxcmdsn=mx,
                           r2tsn=b.r2tsn, buffer_offset=b.offset, desired_length=b.length))

    def _on_data_out(self, rec: Received) -> None:
        pdu: DataOut = rec.bhs
        t = self.transfers.get(pdu.itt)
        if t is None:
            # Data for a task we no longer have (aborted), or garbage: §11.7 at ERL 0.
            self._protocol_reject(rec.raw_bhs, RejectReason.INVALID_PDU_FIELD,
                                  f"Data-Out for unknown ITT 0x{pdu.itt:08x}")
            return
        try:
            t.data_out(pdu.ttt, pdu.datasn, pdu.buffer_offset, rec.data, pdu.final)
        except DataOutError as exc:
            self._protocol_reject(rec.raw_bhs, exc.reason, str(exc))
            return
        if t.complete:
            del self.transfers[pdu.itt]
            self._execute(t.cmd, t.lun, t.cmd.cdb if not t.rec.ahs else self._extended_cdb(t.rec, t.cmd.cdb),
                          memoryview(t.buf), r2ts=t.r2tsn)
        else:
            self._send_r2ts(t)

    def _execute(self, pdu: ScsiCommand, lun: int, cdb: bytes, data, r2ts: int = 0) -> None:
        s = self.session
        task = ScsiTask(s.nexus, lun, bytes(cdb), pdu.itt, _ATTR.get(pdu.flags & 0x07, _SIMPLE),
                        data, pdu.expected_length)
        self.running[pdu.itt] = (pdu, r2ts)
        self._actions.append(Execute(pdu.itt, s.target.device, task))


    def scsi_done(self, itt: int, result: ScsiResult) -> None:
        """The SCSI core finished ITT: Data-In and/or SCSI Response (§11.4, §11.7)."""
        meta = self.running.pop(itt, None)
        if meta is None:
            return
        if self.phase is _CLOSED:
            return
        pdu, r2ts = meta
        s = self.session
        w = s.window
        if not pdu.opbyte & IMMEDIATE:
            w.done()
        exp, mx = w.exp_cmdsn, w.max_cmdsn
        expected = pdu.expected_length
        data = result.data_in
        if result.status == _GOOD and not result.sense and not (self.header_digest or self.data_digest) \
                and self.one_pdu_answers:
            # The usual outcomes, each one PDU packed in one call; the general
            # code below gives the same bytes for them.
            rw = pdu.flags & (F_READ | F_WRITE)
            if rw == F_READ:
                n = len(data)
                if n == expected and 0 < n <= self.max_send_data and n <= s.params.max_burst_length \
                        and not n & 3:
                    # All the data in one Data-In with the status (S bit), no residual.
                    sn = self.statsn
                    self.statsn = (sn + 1) & 0xFFFFFFFF
                    self._out += (_PACK_DATA_IN(_OP_DATA_IN, F_FINAL | F_STATUS, 0, n, pdu.lun, itt, ALL_ONES,
                                                sn, exp, mx, 0, 0, 0), data)
                    return
            elif not len(data) and (not rw or (rw == F_WRITE and result.data_out_wanted == expected)):
                # No data: a SCSI Response without residual.
                sn = self.statsn
                self.statsn = (sn + 1) & 0xFFFFFFFF
                self._out.append(_PACK_SCSI_RESPONSE(_OP_SCSI_RESPONSE, F_FINAL, 0, 0, 0, itt, 0, sn, exp, mx,
                                                     r2ts, 0, 0))
                return
        if isinstance(data, DeferredPayload):
            # Segmented, digested or with a residual: the general path wants
            # bytes, and the payload is no longer pending once it has them.
            deferred, data = data, data.materialize()
            deferred.done()
        flags = F_FINAL
        residual = 0
        if pdu.read:
            n = len(data)
            if n < expected:
                flags |= F_UNDERFLOW
                residual = expected - n
            elif n > expected:
                flags |= F_OVERFLOW
                residual = n - expected
                data = memoryview(data)[:expected]
        else:
            if len(data):
                flags |= F_OVERFLOW
                residual = len(data)
            data = b""
        if pdu.write and not pdu.read:
            wanted = result.data_out_wanted
            if wanted < expected:
                flags, residual = F_FINAL | F_UNDERFLOW, expected - wanted
            elif wanted > expected:
                flags, residual = F_FINAL | F_OVERFLOW, wanted - expected
            else:
                flags, residual = F_FINAL, 0
        datasn = 0
        if len(data):
            datasn = self._send_data_in(pdu, data, result, flags, residual, exp, mx)
            if result.status == Status.GOOD and not result.sense:
                return
        sense = result.sense
        payload = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        hdr = _PACK_SCSI_RESPONSE(Opcode.SCSI_RESPONSE, flags, 0, result.status, len(payload), itt, 0,
                                  self._next_statsn(), exp, mx, datasn or r2ts, 0, residual)
        self._out.extend(encode_pdu(hdr, payload, header_digest=self.header_digest, data_digest=self.data_digest))

    def _send_data_in(self, pdu: ScsiCommand, data, result: ScsiResult, rflags: int, residual: int,
                      exp: int, mx: int) -> int:
        """Segment Data-In by the initiator's MaxRecvDataSegmentLength; F ends each
        MaxBurstLength sequence; status rides on the last PDU when there is no
        sense (§11.7.4 S bit)."""
        view = memoryview(data)
        total = len(view)
        seg = self.max_send_data
        burst = self.session.params.max_burst_length
        with_status = result.status == Status.GOOD and not result.sense
        datasn = 0
        off = 0
        hd, dd = self.header_digest, self.data_digest
        out = self._out
        while off < total:
            n = min(seg, total - off, burst - (off % burst))
            last = off + n >= total
            flags = 0
            if last or (off + n) % burst == 0:
                flags = F_FINAL
            statsn = 0
            status = 0
            res = 0
            if last and with_status:
                flags |= F_STATUS | (rflags & (F_OVERFLOW | F_UNDERFLOW))
                statsn = self._next_statsn()
                status = result.status
                res = residual
            # Packed straight from the DataIn layout (pdu.DataIn field order): no
            # dataclass per PDU on the hottest path.
            hdr = _PACK_DATA_IN(Opcode.DATA_IN, flags, status, n, pdu.lun, pdu.itt, ALL_ONES, statsn,
                                exp, mx, datasn, off, res)
            if hd or dd or n & 3:
                out.extend(encode_pdu(hdr, view[off:off + n], header_digest=hd, data_digest=dd))
            else:
                out.append(hdr)
                out.append(view[off:off + n])
            datasn += 1
            off += n
        return datasn

    def task_aborted(self, itt: int) -> None:
        """The SCSI core aborted ITT (TMF or reset): no response is sent for it (§4.2.3)."""
        meta = self.running.pop(itt, None)
        if meta is not None:
            pdu, _ = meta
            if not pdu.immediate and self.session is not None:
                self.session.window.done()

    # Task management (§11.5, §11.6)
    def _on_tmf(self, rec: Received) -> None:
        pdu: TaskMgmtRequest = rec.bhs
        s = self.session
        fn = pdu.function
        lun = lun_to_int(pdu.lun)
        if fn == TmfFunction.TASK_REASSIGN:
            return self._tmf_respond(pdu, TmfResponseCode.REASSIGNMENT_NOT_SUPPORTED)   # ERL 0 (§11.5.1)
        if fn not in TmfFunction.__members__.values() or fn == TmfFunction.CLEAR_ACA:
            return self._tmf_respond(pdu, TmfResponseCode.NOT_SUPPORTED)
        if fn == TmfFunction.ABORT_TASK:
            t = self.transfers.pop(pdu.rtt, None)
            if t is not None:
                # Still gathering Data-Out: the SCSI core never saw it.
                if not t.cmd.immediate:
                    s.window.done()
                return self._tmf_respond(pdu, TmfResponseCode.COMPLETE)
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET,
                    TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            for itt, t in list(self.transfers.items()):
                if fn >= TmfFunction.TARGET_WARM_RESET or t.lun == lun:
                    del self.transfers[itt]
                    if not t.cmd.immediate:
                        s.window.done()
        self._tmf_pending[pdu.itt] = pdu
        self._actions.append(TaskManagement(pdu.itt, fn, s.target.device, s.nexus, lun, pdu.rtt))


    def tmf_done(self, itt: int, response: int) -> None:
        pdu = self._tmf_pending.pop(itt, None)
        if pdu is None or self.phase is Phase.CLOSED:
            return
        if pdu.function == TmfFunction.ABORT_TASK and response == TmfResponseCode.TASK_DOES_NOT_EXIST:
            # §11.5.1: a task not yet received (RefCmdSN still ahead of ExpCmdSN) is
            # treated as aborted: answer "Function complete".
            if sn_le(self.session.window.exp_cmdsn, pdu.refcmdsn):
                response = TmfResponseCode.COMPLETE
        self._tmf_respond(pdu, response)
        if pdu.function == TmfFunction.TARGET_COLD_RESET and response == TmfResponseCode.COMPLETE:
            self.close("target cold reset")

    def _tmf_respond(self, pdu: TaskMgmtRequest, response: int) -> None:
        if not pdu.immediate:
            self.session.window.done()
        exp, mx = self._window()
        self._send(TaskMgmtResponse(response=int(response), itt=pdu.itt, statsn=self._next_statsn(),
                                    expcmdsn=exp, maxcmdsn=mx))

    def _on_snack(self, rec: Received) -> None:
        # SNACK needs ERL >= 1; we negotiate 0 (§7.1.? / §11.16): Reject it.
        self._protocol_reject(rec.raw_bhs, RejectReason.SNACK_REJECT, "SNACK at ErrorRecoveryLevel 0")

    def _on_login_in_ffp(self, rec: Received) -> None:
        self._protocol_reject(rec.raw_bhs, RejectReason.PROTOCOL_ERROR, "Login Request in full feature phase")

    _HANDLERS = {
        Opcode.NOP_OUT: _on_nop_out,
        Opcode.SCSI_COMMAND: _on_scsi_command,
        Opcode.TASK_MGMT_REQUEST: _on_tmf,
        Opcode.TEXT_REQUEST: _on_text,
        Opcode.DATA_OUT: _on_data_out,
        Opcode.LOGOUT_REQUEST: _on_logout,
        Opcode.SNACK_REQUEST: _on_snack,
        Opcode.LOGIN_REQUEST: _on_login_in_ffp,
    }

    # -- timers (NOP-In keepalive, login timeout) --------------------------------
    def get_timer(self) -> float | None:
        if self.phase is _CLOSED:
            return None
        if self.phase is _LOGIN:
            return self.login_deadline
        if self.nop_ttt is not None:
            return self.nop_deadline
        if self.ctx.nop_interval > 0:
            return self.last_rx + self.ctx.nop_interval
        return None

    def handle_timer(self, now: float) -> None:
        if self.phase is Phase.LOGIN:
            if now >= self.login_deadline:
                log.warning("%s: login not finished within %.0fs, closing", self._who(), self.ctx.login_timeout)
                self.close("login timeout")
            return
        if self.phase is not Phase.FULL_FEATURE:
            return
        if self.nop_ttt is not None:
            if now >= self.nop_deadline:
                log.warning("%s: no answer to NOP-In ping within %.0fs, dropping connection", self._who(),
                            self.ctx.nop_timeout)
                self.close("nop timeout")
            return
        if self.ctx.nop_interval > 0 and now >= self.last_rx + self.ctx.nop_interval:
            # §11.19: a NOP-In with a TTT asks the initiator to answer with a NOP-Out.
            self.nop_ttt = self._new_ttt()
            self.nop_deadline = now + self.ctx.nop_timeout
            self.timer_moved = True
            exp, mx = self._window()
            self._send(NopIn(itt=ALL_ONES, ttt=self.nop_ttt, statsn=self.statsn, expcmdsn=exp, maxcmdsn=mx))

