"""iSCSI text keys, target side (RFC 7143 §6, §12, §13). Sans-IO.

Three parts:

* the text codec: ``decode_text`` / ``encode_text`` for the NUL-separated
  ``key=value`` data of Login and Text PDUs (§6.1);
* ``KEYS``: one ``KeyDef`` row per key of §13, plus the security keys of §12
  that the security stage must recognise (AuthMethod, CHAP_*);
* ``Negotiation``: the target's half of one connection's login negotiation,
  across every Login Request PDU of both stages (§6.2, §6.3).

Decisions where the RFC leaves a choice (each is tested):

* An offered value outside the key's range, or of the wrong type, is answered
  ``Reject`` (§6.2.2 allows it); the key keeps its default. A
  MaxRecvDataSegmentLength declaration below 512 or not a number cannot be
  rejected (it is declarative) and ends the login; one above 2**24-1 is
  clamped (we then send less, which is always safe).
* A key sent twice in one login, a key not allowed in the current stage
  (§6.3: "a protocol error"), a key only the target may send, a FFPO key
  (SendTargets) during login, or a reserved constant used as an offer all end
  the login with 0x02/0x00 (initiator error).
* Unknown keys, ``X-`` private and unregistered ``X#`` keys are answered
  ``NotUnderstood`` (§6.2). X#NodeArchitecture (§13.26) is a recognised
  declaration and not answered.
* IFMarker/OFMarker (obsolete, §13.25) are answered ``No`` (the RFC's
  alternative to ``Reject``, understood by RFC 3720 initiators too);
  IFMarkInt/OFMarkInt are answered ``Reject`` as §13.25 requires.
* Leading-only keys on a non-leading connection are answered ``Irrelevant``;
  the session's values stand.
* In a Discovery session the keys that §13 calls irrelevant are still answered
  with the result-function value (what LIO does; always legal, and it never
  exercises an initiator's rarely used ``Irrelevant`` path). The target never
  offers those keys there.
* Optional answers (AND offered No, OR offered Yes) are always sent.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "TextFormatError",
    "decode_text",
    "encode_text",
    "parse_number",
    "parse_binary",
    "NegotiationError",
    "Kind",
    "KeyDef",
    "KEYS",
    "SessionParams",
    "Negotiation",
]

# --------------------------------------------------------------------------
# constants

YES = "Yes"
NO = "No"
NONE = "None"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
#: §6.2: reserved constants that are answers only; offering one is a protocol error.
RESERVED_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})
#: Identity declarations an initiator may repeat, unchanged, later in the same login.
REPEATABLE_DECLARATIONS = frozenset({"InitiatorName", "SessionType", "TargetName", "InitiatorAlias"})

KEY_NAME_MAX = 63  # §6.1
VALUE_MAX = 255  # §6.1: a simple value (each list item), delimiter excluded
LARGE_VALUE_MAX = 8192  # cap for one value of any key (large-binary CHAP_C/CHAP_R fit)
NUMERIC_LIMIT = 2**64  # §6.1: numerical values are < 2**64

# Login Response status (§11.13.5) used here.
STATUS_INITIATOR_ERROR = (0x02, 0x00)
STATUS_MISSING_PARAMETER = (0x02, 0x07)
STATUS_SESSION_TYPE_UNSUPPORTED = (0x02, 0x09)

SECURITY = "security"
OPERATIONAL = "operational"
_STAGES = {SECURITY: SECURITY, OPERATIONAL: OPERATIONAL, 0: SECURITY, 1: OPERATIONAL}


# --------------------------------------------------------------------------
# text codec (§6.1)


class TextFormatError(ValueError):
    """Malformed text data: a pair without '=', bad UTF-8, a bad key name,
    a value over the §6.1 length limits, or a misplaced NUL."""


# key-name: letters, digits, '.', '-', '+', '@', '_'; begins with a capital
# letter (§6.1). "X#" starts a public extension key. iSCSIProtocolLevel breaks
# the capital-letter rule and is accepted because it is a defined key.
_KEY_RE = re.compile(r"(?:X#[A-Za-z0-9.+@_-]+|[A-Z][A-Za-z0-9.+@_-]*)")


def _check_key(key: str) -> None:
    if len(key.encode()) > KEY_NAME_MAX:
        raise TextFormatError(f"key name longer than {KEY_NAME_MAX} bytes: {key[:80]!r}")
    if key not in KEYS and not _KEY_RE.fullmatch(key):
        raise TextFormatError(f"invalid key name {key!r}")


def _check_value(key: str, value: str) -> None:
    if "\0" in value:
        raise TextFormatError(f"NUL inside the value of {key}")
    raw = value.encode()
    if len(raw) > LARGE_VALUE_MAX:
        raise TextFormatError(f"value of {key} longer than {LARGE_VALUE_MAX} bytes")
    kd = KEYS.get(key)
    if kd is not None and kd.large:
        return
    if len(raw) > VALUE_MAX and any(len(item) > VALUE_MAX for item in raw.split(b",")):
        raise TextFormatError(f"value of {key} longer than {VALUE_MAX} bytes")


def decode_text(data: bytes | bytearray | memoryview, *, strict: bool = False) -> list[tuple[str, str]]:
    """Split Login/Text data into ``(key, value)`` pairs, order preserved.

    Trailing NULs (the pair terminator plus zero padding) are ignored. With
    ``strict=False`` a last pair without its NUL terminator is accepted (LIO
    does the same); ``strict=True`` rejects it. Duplicate keys are returned
    as they are: detecting them is the negotiation's job.
    """
    raw = bytes(data)
    body = raw.rstrip(b"\0")
    if not body:
        return []
    if strict and len(body) == len(raw):
        raise TextFormatError("last key=value pair is not NUL-terminated")
    pairs: list[tuple[str, str]] = []
    for chunk in body.split(b"\0"):
        if not chunk:
            raise TextFormatError("empty key=value pair (two NULs in a row)")
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextFormatError(f"text is not UTF-8: {exc}") from None
        key, sep, value = text.partition("=")
        if not sep:
            raise TextFormatError(f"no '=' in {text[:80]!r}")
        _check_key(key)
        _check_value(key, value)
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` each; the same checks as decoding."""
    out = bytearray()
    for key, value in pairs:
        _check_key(key)
        _check_value(key, value)
        out += key.encode()
        out += b"="
        out += value.encode()
        out += b"\0"
    return bytes(out)


_DEC_RE = re.compile(r"[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")


def parse_number(text: str) -> int | None:
    """A §6.1 numerical-value (decimal or 0x hex, < 2**64), else None.

    Leading zeros in decimal are accepted although §6.1 does not produce them.
    """
    if _HEX_RE.fullmatch(text):
        value = int(text[2:], 16)
    elif _DEC_RE.fullmatch(text):
        value = int(text)
    else:
        return None
    return value if value < NUMERIC_LIMIT else None


def parse_binary(text: str) -> bytes | None:
    """A §6.1 binary value (0x hex, 0b base64, or decimal) as bytes, else None.

    For CHAP_C/CHAP_R (large-binary) and other binary items.
    """
    if len(text) > 2 and text[:2] in ("0x", "0X"):
        digits = text[2:]
        if len(digits) % 2:
            digits = "0" + digits
        try:
            return bytes.fromhex(digits)
        except ValueError:
            return None
    if len(text) > 2 and text[:2] in ("0b", "0B"):
        try:
            return base64.b64decode(text[2:], validate=True)
        except (binascii.Error, ValueError):
            return None
    number = parse_number(text)
    if number is None:
        return None
    return number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")


def _parse_bool(text: str) -> bool | None:
    return True if text == YES else False if text == NO else None


def _bool_text(value: bool) -> str:
    return YES if value else NO


# --------------------------------------------------------------------------
# errors


class NegotiationError(Exception):
    """A negotiation failure that ends the login.

    ``status_class``/``status_detail`` are the Login Response status
    (RFC 7143 §11.13.5) to send before closing the connection.
    """

    def __init__(self, status_class: int, status_detail: int, message: str, *, key: str | None = None):
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail
        self.message = message
        self.key = key

    @property
    def status(self) -> tuple[int, int]:
        return (self.status_class, self.status_detail)

    @classmethod
    def protocol(cls, message: str, key: str | None = None) -> NegotiationError:
        """Initiator error 0x02/0x00: the initiator broke a §6 rule."""
        return cls(*STATUS_INITIATOR_ERROR, message, key=key)

    @classmethod
    def missing(cls, key: str) -> NegotiationError:
        """Missing parameter 0x02/0x07."""
        return cls(*STATUS_MISSING_PARAMETER, f"missing parameter {key}", key=key)

    def __repr__(self) -> str:
        return f"NegotiationError(0x{self.status_class:02x}, 0x{self.status_detail:02x}, {self.message!r})"


# --------------------------------------------------------------------------
# the key table (§12, §13)


class Kind(enum.Enum):
    LIST = "list"  # §6.2.1: first value of the proposer's list that we support
    AND = "and"  # boolean, result = offer AND ours
    OR = "or"  # boolean, result = offer OR ours
    MIN = "min"  # numerical, result = min(offer, ours)
    MAX = "max"  # numerical, result = max(offer, ours)
    DECLARATIVE = "declarative"  # stated by the sender, never answered
    NUM_DECLARATIVE = "num-declarative"  # numerical declaration (MaxRecvDataSegmentLength)
    RANGE = "range"  # obsolete IFMarkInt/OFMarkInt: numerical range a~b
    AUTH = "auth"  # security exchange (CHAP_*), handed to the authentication module


@dataclass(frozen=True)
class KeyDef:
    """One key as RFC 7143 defines it.

    scope: "SW" session-wide or "CO" connection-only.
    use: "LO" leading connection only, "IO" initialize (login) only, "ALL" login
    and full-feature phase, "FFPO" full-feature phase only.
    phase: login stage the key may appear in: "security", "operational",
    "any" (§13 "Any-Stage"), or "ffp" (not in login at all).
    sender: "initiator", "target" or "both".
    """

    name: str
    kind: Kind
    default: str | None = None
    lo: int | None = None
    hi: int | None = None
    scope: str = "SW"
    use: str = "LO"
    phase: str = OPERATIONAL
    sender: str = "both"
    irrelevant_in_discovery: bool = False
    values: tuple[str, ...] = ()  # the values the RFC defines (enumerations, lists)
    attr: str | None = None  # SessionParams field holding the result
    obsolete: bool = False
    large: bool = False  # large-binary values allowed past 255 bytes

    @property
    def discovery(self) -> bool:
        """Alias: True when the key is irrelevant in a Discovery session."""
        return self.irrelevant_in_discovery


_SEGMENT_MAX = 2**24 - 1


def _table() -> dict[str, KeyDef]:
    K = Kind
    rows = [
        # §12 security keys: recognised in the security stage.
        KeyDef("AuthMethod", K.LIST, NONE, scope="CO", use="IO", phase=SECURITY,
               values=("KRB5", "SRP", "SPKM1", "SPKM2", "CHAP", NONE), attr="auth_method"),
        KeyDef("CHAP_A", K.AUTH, scope="CO", use="IO", phase=SECURITY),
        KeyDef("CHAP_I", K.AUTH, scope="CO", use="IO", phase=SECURITY),
        KeyDef("CHAP_C", K.AUTH, scope="CO", use="IO", phase=SECURITY, large=True),
        KeyDef("CHAP_N", K.AUTH, scope="CO", use="IO", phase=SECURITY),
        KeyDef("CHAP_R", K.AUTH, scope="CO", use="IO", phase=SECURITY, large=True),
        # §13.1
        KeyDef("HeaderDigest", K.LIST, NONE, scope="CO", use="IO", values=("CRC32C", NONE), attr="header_digest"),
        KeyDef("DataDigest", K.LIST, NONE, scope="CO", use="IO", values=("CRC32C", NONE), attr="data_digest"),
        # §13.2
        KeyDef("MaxConnections", K.MIN, "1", 1, 65535, irrelevant_in_discovery=True, attr="max_connections"),
        # §13.3 - §13.9
        KeyDef("SendTargets", K.DECLARATIVE, use="FFPO", phase="ffp", sender="initiator"),
        KeyDef("TargetName", K.DECLARATIVE, use="IO", phase="any", attr="target_name"),
        KeyDef("InitiatorName", K.DECLARATIVE, use="IO", phase="any", sender="initiator", attr="initiator_name"),
        KeyDef("TargetAlias", K.DECLARATIVE, use="ALL", phase="any", sender="target"),
        KeyDef("InitiatorAlias", K.DECLARATIVE, use="ALL", phase="any", sender="initiator", attr="initiator_alias"),
        KeyDef("TargetAddress", K.DECLARATIVE, use="ALL", phase="any", sender="target"),
        KeyDef("TargetPortalGroupTag", K.DECLARATIVE, None, 0, 65535, use="IO", phase="any", sender="target"),
        # §13.10 - §13.20
        KeyDef("InitialR2T", K.OR, YES, irrelevant_in_discovery=True, attr="initial_r2t"),
        KeyDef("ImmediateData", K.AND, YES, irrelevant_in_discovery=True, attr="immediate_data"),
        KeyDef("MaxRecvDataSegmentLength", K.NUM_DECLARATIVE, "8192", 512, _SEGMENT_MAX, scope="CO", use="ALL",
               attr="max_recv_data_segment_length"),
        KeyDef("MaxBurstLength", K.MIN, "262144", 512, _SEGMENT_MAX, irrelevant_in_discovery=True,
               attr="max_burst_length"),
        KeyDef("FirstBurstLength", K.MIN, "65536", 512, _SEGMENT_MAX, irrelevant_in_discovery=True,
               attr="first_burst_length"),
        KeyDef("DefaultTime2Wait", K.MAX, "2", 0, 3600, attr="default_time2wait"),
        KeyDef("DefaultTime2Retain", K.MIN, "20", 0, 3600, attr="default_time2retain"),
        KeyDef("MaxOutstandingR2T", K.MIN, "1", 1, 65535, irrelevant_in_discovery=True, attr="max_outstanding_r2t"),
        KeyDef("DataPDUInOrder", K.OR, YES, irrelevant_in_discovery=True, attr="data_pdu_in_order"),
        KeyDef("DataSequenceInOrder", K.OR, YES, irrelevant_in_discovery=True, attr="data_sequence_in_order"),
        KeyDef("ErrorRecoveryLevel", K.MIN, "0", 0, 2, attr="error_recovery_level"),
        # §13.21
        KeyDef("SessionType", K.DECLARATIVE, "Normal", phase="any", sender="initiator",
               values=("Discovery", "Normal"), attr="session_type"),
        # §13.23, §13.24
        KeyDef("TaskReporting", K.LIST, "RFC3720", irrelevant_in_discovery=True,
               values=("RFC3720", "ResponseFence", "FastAbort"), attr="task_reporting"),
        KeyDef("iSCSIProtocolLevel", K.MIN, "1", 0, 31, attr="iscsi_protocol_level"),
        # §13.25 obsolete keys
        KeyDef("IFMarker", K.AND, NO, scope="CO", use="IO", obsolete=True),
        KeyDef("OFMarker", K.AND, NO, scope="CO", use="IO", obsolete=True),
        KeyDef("IFMarkInt", K.RANGE, "2048~2048", 1, 65535, scope="CO", use="IO", obsolete=True),
        KeyDef("OFMarkInt", K.RANGE, "2048~2048", 1, 65535, scope="CO", use="IO", obsolete=True),
        # §13.26 (RFC 4850)
        KeyDef("X#NodeArchitecture", K.DECLARATIVE, phase="any"),
    ]
    return {row.name: row for row in rows}


KEYS: dict[str, KeyDef] = _table()


# --------------------------------------------------------------------------
# negotiated parameters


@dataclass
class SessionParams:
    """Operational parameters after negotiation; RFC defaults until changed."""

    header_digest: bool = False  # per connection: CRC32C on header segments
    data_digest: bool = False  # per connection: CRC32C on data segments
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    #: the INITIATOR's declaration: the largest data segment WE may send (per connection)
    max_recv_data_segment_length: int = 8192
    #: OUR declaration (once sent): the largest data segment the initiator may send us
    target_max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536  # kept <= max_burst_length
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    iscsi_protocol_level: int = 1
    task_reporting: str = "RFC3720"
    initiator_name: str | None = None
    initiator_alias: str | None = None
    target_name: str | None = None
    session_type: str = "Normal"  # "Normal" or "Discovery"
    auth_method: str = NONE  # per connection


def _to_param(kd: KeyDef, text: str) -> object:
    if kd.name in ("HeaderDigest", "DataDigest"):
        return text == "CRC32C"
    if kd.kind in (Kind.AND, Kind.OR):
        return text == YES
    if kd.kind in (Kind.MIN, Kind.MAX, Kind.NUM_DECLARATIVE):
        return parse_number(text)
    return text


# Order of processing inside one PDU: SessionType first (it decides what else
# means), FirstBurstLength after MaxBurstLength (its answer is capped by it).
_PRIORITY = {"SessionType": 0, "FirstBurstLength": 2}


@dataclass
class _Offer:
    value: str  # what we offered
    required: bool  # an answer is required (§6.2.2: not for AND=No / OR=Yes)


class Negotiation:
    """Target side of one login's (one connection's) text negotiation.

    ``offers`` are the target's configured values keyed by RFC key name, e.g.
    ``{"MaxRecvDataSegmentLength": "262144", "HeaderDigest": "None,CRC32C",
    "AuthMethod": "None", "TargetPortalGroupTag": "1"}``. A key left out
    takes its RFC default as the target's value. ``leading`` is False for a
    connection added to an existing session; pass that session's ``params``
    as ``session`` so session-wide values carry over.

    Per Login Request: ``answers = respond(pairs, stage)``, then append
    ``target_declarations(stage)``; set T=1 only if the initiator asked to
    transit and ``pending()`` is False. Before leaving the login, check
    ``missing_required()``. Results are in ``params`` (and ``values`` as
    text). Answers to target offers arrive through ``respond`` like any key.
    """

    def __init__(
        self,
        offers: Mapping[str, str],
        *,
        leading: bool = True,
        session: SessionParams | None = None,
    ):
        self.leading = leading
        self._config: dict[str, str] = {}
        self._ours: dict[str, object] = {}
        for name, text in offers.items():
            self._ours[name] = self._parse_config(name, text)
            self._config[name] = text
        if session is not None and not leading:
            # Session-wide values come from the session; connection-only ones restart at defaults.
            self.params = dataclasses.replace(
                session,
                header_digest=False,
                data_digest=False,
                max_recv_data_segment_length=8192,
                target_max_recv_data_segment_length=8192,
                auth_method=NONE,
            )
        else:
            self.params = SessionParams()
        #: text result of every key exchanged so far (negotiated, declared or answered)
        self.values: dict[str, str] = {}
        #: security-exchange keys (CHAP_*) the initiator sent, for the authentication module
        self.auth_keys: dict[str, str] = {}
        self._received: set[str] = set()  # keys the initiator has sent (offer, declaration or answer)
        self._first_values: dict[str, str] = {}   # values of REPEATABLE_DECLARATIONS as first sent
        self._sent: set[str] = set()  # keys the target has sent
        self._awaiting: dict[str, _Offer] = {}  # target offers not yet answered

    # ---------------------------------------------------------------- config

    @staticmethod
    def _parse_config(name: str, text: str) -> object:
        kd = KEYS.get(name)
        if kd is None:
            raise ValueError(f"unknown iSCSI key in target configuration: {name}")
        if kd.kind is Kind.LIST:
            items = tuple(text.split(","))
            bad = [item for item in items if item not in kd.values]
            if bad or not text:
                raise ValueError(f"{name}={text!r}: values must be from {', '.join(kd.values)}")
            return items
        if kd.kind in (Kind.AND, Kind.OR) and not kd.obsolete:
            value = _parse_bool(text)
            if value is None:
                raise ValueError(f"{name}={text!r}: must be Yes or No")
            return value
        if kd.kind in (Kind.MIN, Kind.MAX, Kind.NUM_DECLARATIVE):
            number = parse_number(text)
            if number is None or not kd.lo <= number <= kd.hi:
                raise ValueError(f"{name}={text!r}: must be a number from {kd.lo} to {kd.hi}")
            return number
        if name == "TargetPortalGroupTag":
            number = parse_number(text)
            if number is None or not 0 <= number <= 65535:
                raise ValueError(f"{name}={text!r}: must be a number from 0 to 65535")
            return number
        if name == "TargetAlias":
            return text
        raise ValueError(f"{name} is not a key the target configures")

    def _our(self, name: str) -> object:
        if name in self._ours:
            return self._ours[name]
        kd = KEYS[name]
        if kd.kind is Kind.LIST:
            return (kd.default,)
        if kd.kind in (Kind.AND, Kind.OR):
            return kd.default == YES
        return parse_number(kd.default)

    # -------------------------------------------------------------- results

    def _set(self, kd: KeyDef, text: str) -> None:
        self.values[kd.name] = text
        if kd.attr is not None:
            setattr(self.params, kd.attr, _to_param(kd, text))
            if kd.name in ("MaxBurstLength", "FirstBurstLength"):
                self._apply_burst_fixup()

    def _apply_burst_fixup(self) -> None:
        # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
        if self.params.first_burst_length > self.params.max_burst_length:
            self.params.first_burst_length = self.params.max_burst_length

    def _burst_cap(self) -> int:
        """Upper bound for a FirstBurstLength answer: the MaxBurstLength result,
        or, while that is still open, what it can at most become."""
        if "MaxBurstLength" in self.values:
            return self.params.max_burst_length
        cap = self._our("MaxBurstLength")
        offer = self._awaiting.get("MaxBurstLength")
        if offer is None:  # silent initiator -> the default
            cap = min(cap, parse_number(KEYS["MaxBurstLength"].default))
        return cap

    @property
    def discovery(self) -> bool:
        return self.params.session_type == "Discovery"

    # ---------------------------------------------------------- negotiation

    def respond(self, pairs: Iterable[tuple[str, str]], stage: str | int) -> list[tuple[str, str]]:
        """Process the pairs of one Login Request; return the target's answers.

        ``stage`` is "security" or "operational" (or the CSG code 0/1).
        Answers keep the order of the request. Raises ``NegotiationError``
        when the login must end.
        """
        stage = _stage(stage)
        pairs = list(pairs)
        order = sorted(range(len(pairs)), key=lambda i: _PRIORITY.get(pairs[i][0], 1))
        answers: dict[int, tuple[str, str]] = {}
        for i in order:
            key, value = pairs[i]
            answer = self._one(key, value, stage)
            if answer is not None:
                answers[i] = (key, answer)
                self._sent.add(key)
        return [answers[i] for i in sorted(answers)]

    def receive_answers(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Process answers to target offers only (``respond`` already does
        this for mixed PDUs); a pair that answers nothing is an error."""
        for key, value in pairs:
            if key not in self._awaiting:
                raise NegotiationError.protocol(f"{key} is not an answer to a target offer", key)
            self._answer(key, value)

    def _one(self, key: str, value: str, stage: str) -> str | None:
        if key in self._awaiting:
            self._answer(key, value)
            return None
        if key in self._received:
            if key in REPEATABLE_DECLARATIONS and self._first_values.get(key) == value:
                # libiscsi, when given CHAP credentials for a target that does
                # not ask for CHAP, repeats InitiatorName/SessionType/TargetName
                # with the same values in its operational-stage PDU.  Repeating
                # a declaration unchanged negotiates nothing; only a changed
                # value is the protocol error of §6.3.  Accept, answer nothing.
                return None
            raise NegotiationError.protocol(f"{key} sent twice in one login (RFC 7143 §6.3)", key)
        self._received.add(key)
        if key in REPEATABLE_DECLARATIONS:
            self._first_values[key] = value
        if value in RESERVED_ANSWERS:
            raise NegotiationError.protocol(f"{key}={value}: reserved constant used as an offer (§6.2)", key)
        kd = KEYS.get(key)
        if kd is None:
            return NOT_UNDERSTOOD
        if kd.sender == "target":
            raise NegotiationError.protocol(f"{key} may be sent by the target only", key)
        if kd.use == "FFPO":
            raise NegotiationError.protocol(f"{key} is allowed in the full-feature phase only", key)
        if kd.phase != "any" and kd.phase != stage:
            raise NegotiationError.protocol(f"{key} is not allowed in the {stage} stage (§6.3)", key)

        if kd.kind is Kind.AUTH:
            if self.values.get("AuthMethod") != "CHAP":
                raise NegotiationError.protocol(f"{key} without AuthMethod=CHAP", key)
            self.auth_keys[key] = value
            return None
        if kd.kind is Kind.DECLARATIVE:
            self._declared(kd, value)
            return None
        if kd.kind is Kind.NUM_DECLARATIVE:
            return self._mrdsl(kd, value)
        if kd.use == "LO" and not self.leading:
            return IRRELEVANT
        if kd.obsolete:
            if kd.kind is Kind.RANGE:
                return REJECT  # §13.25: IFMarkInt/OFMarkInt MUST be answered Reject
            if _parse_bool(value) is None:
                return REJECT
            self.values[key] = NO
            return NO  # §13.25: Reject, or alternatively No
        if kd.kind is Kind.LIST:
            ours = self._our(key)
            choice = next((item for item in value.split(",") if item in ours), None)
            if choice is None:
                return REJECT
            self._set(kd, choice)
            return choice
        if kd.kind in (Kind.AND, Kind.OR):
            theirs = _parse_bool(value)
            if theirs is None:
                return REJECT
            ours = self._our(key)
            result = _bool_text(theirs and ours if kd.kind is Kind.AND else theirs or ours)
            self._set(kd, result)
            return result
        if kd.kind in (Kind.MIN, Kind.MAX):
            theirs = parse_number(value)
            if theirs is None or not kd.lo <= theirs <= kd.hi:
                return REJECT
            ours = self._our(key)
            result = min(theirs, ours) if kd.kind is Kind.MIN else max(theirs, ours)
            if key == "FirstBurstLength":
                result = max(kd.lo, min(result, self._burst_cap()))
            self._set(kd, str(result))
            return str(result)
        raise AssertionError(f"unhandled key kind {kd.kind}")  # pragma: no cover

    def _declared(self, kd: KeyDef, value: str) -> None:
        if kd.name == "SessionType":
            if value not in kd.values:
                raise NegotiationError(*STATUS_SESSION_TYPE_UNSUPPORTED, f"SessionType={value!r} not supported",
                                       key=kd.name)
            if not self.leading:
                return  # the session's type stands
        self._set(kd, value)

    def _mrdsl(self, kd: KeyDef, value: str) -> str | None:
        theirs = parse_number(value)
        if theirs is None or theirs < kd.lo:
            raise NegotiationError.protocol(f"MaxRecvDataSegmentLength={value!r} is not a valid declaration", kd.name)
        self._set(kd, str(min(theirs, kd.hi)))
        if kd.name in self._sent:
            return None
        ours = self._our(kd.name)
        self.params.target_max_recv_data_segment_length = ours
        return str(ours)

    def _answer(self, key: str, value: str) -> None:
        """The initiator's answer to a target offer (§6.2)."""
        offer = self._awaiting.pop(key)
        self._received.add(key)
        kd = KEYS[key]
        if value == NOT_UNDERSTOOD:
            raise NegotiationError.protocol(f"{key}=NotUnderstood: every RFC 7143 key must be understood", key)
        if value == IRRELEVANT:
            return  # §6.2: not a failure; the key keeps its value
        if value == REJECT:
            if not offer.required:
                return
            raise NegotiationError.protocol(
                f"initiator rejected {key}={offer.value} and the default {kd.default} is not acceptable", key)
        ok: bool
        if kd.kind is Kind.LIST:
            ok = value in offer.value.split(",")
        elif kd.kind in (Kind.AND, Kind.OR):
            theirs, offered = _parse_bool(value), _parse_bool(offer.value)
            # The answer must be a possible result: offered AND x, or offered OR x.
            possible = {offered and x for x in (True, False)} if kd.kind is Kind.AND else {
                offered or x for x in (True, False)}
            ok = theirs is not None and theirs in possible
        else:
            theirs = parse_number(value)
            offered = parse_number(offer.value)
            ok = theirs is not None and kd.lo <= theirs <= kd.hi and (
                theirs <= offered if kd.kind is Kind.MIN else theirs >= offered)
            if ok:
                value = str(theirs)
        if not ok:
            raise NegotiationError.protocol(f"{key}={value!r} is not an admissible answer to {offer.value}", key)
        self._set(kd, value)

    # --------------------------------------------------- target's own keys

    def target_declarations(self, stage: str | int) -> list[tuple[str, str]]:
        """Keys the target sends on its own initiative; each at most once.

        Any stage: TargetPortalGroupTag and TargetAlias when configured in
        ``offers`` (call on the first response so TPGT goes out with it,
        §13.9). Operational stage: our MaxRecvDataSegmentLength if not yet
        declared and not the 8192 default, and offers for configured keys
        whose RFC default the target cannot accept (a digest list without
        None, MIN values below the default, MAX values above it,
        ImmediateData=No). Those offers need answers: see ``pending()``.
        """
        stage = _stage(stage)
        out: list[tuple[str, str]] = []
        for name in ("TargetPortalGroupTag", "TargetAlias"):
            if name in self._config and name not in self._sent:
                out.append((name, self._config[name]))
        if stage == OPERATIONAL:
            mrdsl = "MaxRecvDataSegmentLength"
            ours = self._our(mrdsl)
            if mrdsl not in self._sent and ours != 8192:
                out.append((mrdsl, str(ours)))
                self.params.target_max_recv_data_segment_length = ours
            for name in self._config:
                offer = self._needed_offer(name)
                if offer is not None:
                    self._awaiting[name] = offer
                    out.append((name, offer.value))
                    if not offer.required:  # the result is decided by our offer alone
                        self._set(KEYS[name], offer.value)
        self._sent.update(name for name, _ in out)
        return out

    def _needed_offer(self, name: str) -> _Offer | None:
        kd = KEYS[name]
        if name in self._received or name in self._sent or name in self._awaiting:
            return None
        if kd.phase != OPERATIONAL or kd.obsolete:
            return None
        if kd.use == "LO" and not self.leading:
            return None
        if self.discovery and kd.irrelevant_in_discovery:
            return None
        ours = self._our(name)
        if kd.kind is Kind.LIST:
            if kd.default in ours:
                return None
            return _Offer(",".join(ours), required=True)
        if kd.kind is Kind.AND:
            return None if ours else _Offer(NO, required=False)
        if kd.kind is Kind.OR:
            return _Offer(YES, required=False) if ours and kd.default != YES else None
        if kd.kind in (Kind.MIN, Kind.MAX):
            default = parse_number(kd.default)
            if name == "FirstBurstLength":
                ours = min(ours, self._burst_cap())
            if (ours < default) if kd.kind is Kind.MIN else (ours > default):
                return _Offer(str(ours), required=True)
        return None

    def pending(self) -> bool:
        """True while a target offer still needs the initiator's answer; the
        target must not set T=1 then (§6.3: no parameters that require another
        Login Request in a response with T=1)."""
        return any(offer.required for offer in self._awaiting.values())

    def missing_required(self, session_type: str | None = None) -> str | None:
        """The first mandatory key the initiator has not sent, else None.

        InitiatorName always; TargetName unless the session is a Discovery
        session (§6.3). Report it as ``NegotiationError.missing(key)`` (0x02/0x07).
        """
        session_type = session_type or self.params.session_type
        if not self.params.initiator_name:
            return "InitiatorName"
        if session_type != "Discovery" and not self.params.target_name:
            return "TargetName"
        return None


def _stage(stage: str | int) -> str:
    try:
        return _STAGES[stage]
    except (KeyError, TypeError):
        raise ValueError(f"login stage must be 'security' or 'operational', not {stage!r}") from None
