"""The login phase of one connection (RFC 7143 §6.3, §11.12–11.13) — sans-IO.

:class:`Login` takes Login Request PDUs and returns Login Response PDUs.  It
walks the stages (0 security, 1 operational, 3 full feature), gathers
multi-PDU text (C bit), hands the keys to :mod:`.keys` for negotiation, and on
the final transit creates or joins the session.  Failures carry their status
class/detail (§11.13.5) as :class:`LoginFailure`; the caller sends the
response and closes the connection.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from . import keys as _keys
from .chap import ChapExchange, ChapFailure
from .discovery import _normalize
from .pdu import F_TRANSIT, LoginRequest, LoginResponse
from .session import PortalContext, Session

log = logging.getLogger("pyiscsi_target.login")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
ISCSI_DRAFT20_VERSION = 0x00   # the only version ever assigned (§11.12.4)


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail (§11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class LoginFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class LoginResult:
    """What the connection does once the login completed successfully."""

    session: Session
    cid: int
    reinstated: list          # old connections that must be closed (session/connection reinstatement)
    new_session: bool


class Login:
    """Target side of one connection's login.  Feed :meth:`receive`."""

    def __init__(self, ctx: PortalContext, local: tuple[str, int], peer: tuple[str, int]):
        self.ctx = ctx
        self.local = local
        self.peer = peer
        self.stage: int | None = None
        self.first: LoginRequest | None = None
        self.statsn = 0
        self.neg: _keys.Negotiation | None = None
        self._text = bytearray()            # multi-PDU text being gathered (C bit)
        self._sent_tpgt = False
        self._existing: Session | None = None   # non-leading login: the session joined
        self._auth: str | None = None           # our answer to AuthMethod, once given
        self._creds = None                      # ChapCredentials required here, or None
        self._chap: ChapExchange | None = None
        self.chap_user: str | None = None       # the CHAP name the initiator proved
        self.failure: LoginFailure | None = None   # why this login was refused (for the server's slow-down)
        self.result: LoginResult | None = None

    # -- helpers -------------------------------------------------------------
    def _response(self, req: LoginRequest, *, flags: int = 0, status: int = 0, tsih: int = 0) -> LoginResponse:
        cmdsn = req.cmdsn
        if self._existing is not None:
            exp, mx = self._existing.window.exp_cmdsn, self._existing.window.max_cmdsn
        else:
            exp, mx = cmdsn, (cmdsn + self.ctx.queue_depth - 1) & 0xFFFFFFFF
        rsp = LoginResponse(flags=flags, version_max=ISCSI_DRAFT20_VERSION,
                            version_active=ISCSI_DRAFT20_VERSION, isid=req.isid, tsih=tsih,
                            itt=req.itt, statsn=self.statsn, expcmdsn=exp, maxcmdsn=mx,
                            status_class=status >> 8, status_detail=status & 0xFF)
        return rsp

    def failure_response(self, req: LoginRequest, failure: LoginFailure) -> LoginResponse:
        return self._response(req, status=failure.status)

    # -- the state machine ----------------------------------------------------
    def receive(self, req: LoginRequest, data: bytes) -> tuple[LoginResponse, bytes]:
        """One Login Request → one Login Response (header, text data).

        Raises :class:`LoginFailure` (also kept in :attr:`failure`);
        :attr:`result` is set once the response returned carries the final
        transit to full feature phase.
        """
        try:
            return self._receive(req, data)
        except LoginFailure as exc:
            self.failure = exc
            raise

    def _receive(self, req: LoginRequest, data: bytes) -> tuple[LoginResponse, bytes]:
        if self.first is None:
            self._start(req)
        else:
            self._check_same_login(req)
        csg, nsg = req.csg, req.nsg
        if csg not in (SECURITY, OPERATIONAL) or (req.transit and nsg not in (OPERATIONAL, FULL_FEATURE)) \
                or (req.transit and nsg <= csg) or (req.transit and req.cont):
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"invalid stage transition CSG={csg} NSG={nsg}")
        if csg < self.stage:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"login went back to stage {csg}")
        self.stage = csg

        self._text += data
        if req.cont:
            # §6.3: more text follows; answer with an empty response, same stage, no transit.
            return self._response(req, flags=csg << 2), b""
        try:
            pairs = _keys.decode_text(bytes(self._text))
        except _keys.TextFormatError as exc:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"malformed login text: {exc}") from None
        finally:
            self._text.clear()
        if self.neg is None:
            self.neg = self._negotiation(pairs)
        stage_name = "security" if csg == SECURITY else "operational"
        try:
            answers = self.neg.respond(pairs, stage_name)
        except _keys.NegotiationError as exc:
            raise LoginFailure((exc.status_class << 8) | exc.status_detail, exc.message) from None
        for k, v in answers:
            if k == "AuthMethod":
                self._auth = v
        answers = self._check_identity(pairs, answers)
        answers += self._security(pairs, csg, req.transit)

        transit = req.transit and not self.neg.pending()
        if csg == SECURITY and self._chap is not None and not self._chap.done:
            transit = False                      # CHAP still under way: stay in the security stage
        nsg_out = nsg
        if transit and csg == SECURITY:
            self._check_auth()
            must_declare = int(self.ctx.offers.get("MaxRecvDataSegmentLength", "8192")) != 8192
            if nsg == FULL_FEATURE and must_declare:
                # We still have to declare values (e.g. our MaxRecvDataSegmentLength):
                # go through the operational stage first (§6.3: a target may
                # answer with a lower NSG).
                nsg_out = OPERATIONAL
        if transit and csg == OPERATIONAL:
            answers += self.neg.target_declarations("operational")
        flags = (csg << 2)
        tsih = self._existing.tsih if self._existing else 0
        if transit:
            flags |= F_TRANSIT | nsg_out
            if nsg_out == FULL_FEATURE:
                self.result = self._complete(req)
                tsih = self.result.session.tsih
            else:
                self.stage = nsg_out
        rsp = self._response(req, flags=flags, tsih=tsih)
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return rsp, _keys.encode_text(answers)

    def _start(self, req: LoginRequest) -> None:
        self.first = req
        self.statsn = req.expstatsn     # the first response starts the connection's StatSN
        if req.version_min > ISCSI_DRAFT20_VERSION:
            raise LoginFailure(LoginStatus.UNSUPPORTED_VERSION,
                               f"version {req.version_min}..{req.version_max} not supported")
        self.stage = req.csg
        leading = req.tsih == 0
        if not leading:
            s = self.ctx.sessions.by_tsih.get(req.tsih)
            if s is None or s.isid != req.isid:
                raise LoginFailure(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session with TSIH {req.tsih}")
            self._existing = s

    def _negotiation(self, pairs) -> _keys.Negotiation:
        """The negotiation, once the first text is known: AuthMethod depends on
        the target (or discovery) the initiator asks for."""
        offers = dict(self.ctx.offers)
        self._creds = self._required_credentials(pairs)
        offers["AuthMethod"] = "CHAP" if self._creds is not None else "None"
        return _keys.Negotiation(offers, leading=self._existing is None)

    def _required_credentials(self, pairs):
        if self._existing is not None:
            s = self._existing
            return self.ctx.discovery_chap if s.discovery else getattr(s.target, "chap", None)
        first = {}
        for k, v in pairs:
            first.setdefault(k, v)
        if first.get("SessionType", "Normal") == "Discovery":
            return self.ctx.discovery_chap
        target = self.ctx.targets.get(first.get("TargetName", ""))
        return getattr(target, "chap", None)

    def _check_same_login(self, req: LoginRequest) -> None:
        f = self.first
        if req.isid != f.isid or req.tsih != f.tsih or req.cid != f.cid:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID changed during login")

    def _check_identity(self, pairs, answers):
        """Names, session type and target: checked as soon as they are known."""
        p = self.neg.params
        sent = {k for k, _ in pairs}
        if self.first is not None and self._sent_tpgt is False:
            if p.initiator_name is None:
                raise LoginFailure(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
            if p.session_type not in ("Normal", "Discovery"):
                raise LoginFailure(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {p.session_type}")
            if self._existing is not None:
                s = self._existing
                if p.initiator_name != s.initiator_name or p.session_type != s.session_type:
                    raise LoginFailure(LoginStatus.INITIATOR_ERROR, "connection does not match its session")
            elif p.session_type == "Normal":
                if not p.target_name:
                    raise LoginFailure(LoginStatus.MISSING_PARAMETER, "TargetName missing")
                if p.target_name not in self.ctx.targets:
                    raise LoginFailure(LoginStatus.NOT_FOUND, f"target {p.target_name} not found")
            if p.session_type == "Normal":
                self._check_access(self.ctx.targets.get(p.target_name) if self._existing is None
                                   else self._existing.target)
            if p.session_type == "Normal":
                # §13.9: returned in the first Login Response of a normal session.
                answers = answers + [("TargetPortalGroupTag", str(self.ctx.tpgt))]
                target = self.ctx.targets.get(p.target_name) if self._existing is None else self._existing.target
                if target is not None and target.alias and "TargetAlias" not in sent:
                    answers.append(("TargetAlias", target.alias))
            self._sent_tpgt = True
        return answers

    def _check_access(self, target) -> None:
        """The target's ACL: initiator name and source address (0x0202)."""
        acl = getattr(target, "acl", None)
        if acl is None:
            return
        why = acl.why_not(self.neg.params.initiator_name, _normalize(self.peer[0]))
        if why is not None:
            raise LoginFailure(LoginStatus.AUTHORIZATION_FAILURE, f"{why} of {target.name}")

    def _security(self, pairs, csg: int, transit: bool) -> list[tuple[str, str]]:
        """Run CHAP when the target requires it (RFC 7143 §12.1.3)."""
        if self._creds is None:
            return []
        if csg != SECURITY:
            if self._chap is None or not self._chap.done:
                raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE,
                                   "CHAP required, but the initiator skipped the security stage")
            return []
        if self._auth == _keys.REJECT:
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE,
                               "CHAP required, but the initiator does not offer AuthMethod=CHAP")
        chap_keys = {k: v for k, v in pairs if k.startswith("CHAP_")}
        if self._auth == "CHAP" and self._chap is None:
            self._chap = ChapExchange(self._creds)
        if not chap_keys:
            return []
        try:
            out = self._chap.step(chap_keys)
        except ChapFailure as exc:
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, exc.message) from None
        if self._chap.done:
            self.chap_user = self._chap.user
        return out

    def _check_auth(self) -> None:
        """Leaving the security stage: the required method must have succeeded."""
        if self._creds is not None:
            if self._chap is None or not self._chap.done:
                raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE,
                                   "CHAP required, but the initiator did not authenticate")
            return
        # Only "None" is offered: an initiator that insists on another method
        # got "Reject" and cannot leave the security stage.
        if self._auth is not None and self._auth != "None":
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, "no acceptable AuthMethod")

    def _complete(self, req: LoginRequest) -> LoginResult:
        ctx, p = self.ctx, self.neg.params
        if self._existing is not None:
            s = self._existing
            old = s.connections.get(req.cid)
            if old is None and len(s.connections) >= max(1, s.params.max_connections):
                raise LoginFailure(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections reached")
            # Connection reinstatement (§6.3.4): same CID logs in again; at ERL 0
            # the old connection's tasks are simply terminated with it.
            return LoginResult(s, req.cid, [old] if old is not None else [], False)
        target = ctx.targets.get(p.target_name) if p.session_type == "Normal" else None
        key = (p.initiator_name, req.isid, target.name if target else None, ctx.tpgt)
        old_session = ctx.sessions.find(key)
        reinstated = []
        if old_session is not None:
            # Session reinstatement (§6.3.5): close the old one first, same nexus.
            reinstated = list(old_session.connections.values())
            ctx.sessions.remove(old_session)
            log.info("session reinstatement: %s ISID %s replaces TSIH %d", p.initiator_name,
                     req.isid.hex(), old_session.tsih)
        elif len(ctx.sessions) >= ctx.max_sessions:
            raise LoginFailure(LoginStatus.OUT_OF_RESOURCES, "too many sessions")
        s = Session(ctx.sessions.new_tsih(), req.isid, p.initiator_name, p.session_type, target,
                    ctx.tpgt, p, req.cmdsn, ctx.queue_depth)
        ctx.sessions.add(s)
        return LoginResult(s, req.cid, reinstated, True)


def peer_description(peer: tuple[str, int]) -> str:
    host = _normalize(peer[0])
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
