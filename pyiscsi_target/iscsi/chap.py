"""CHAP for iSCSI logins, target side (RFC 7143 §12.1.3, RFC 1994) — sans-IO.

One-way: the target challenges, the initiator proves it knows the secret.
Mutual: the initiator also sends a challenge, and the target answers it with
its own name and the *mutual* secret.  The exchange, one Login Request each::

    I: AuthMethod=CHAP,None            T: AuthMethod=CHAP
    I: CHAP_A=7,5                      T: CHAP_A=7 CHAP_I=<id> CHAP_C=0x<challenge>
    I: CHAP_N=<user> CHAP_R=0x<rsp>    T: (mutual only) CHAP_N=<target user> CHAP_R=0x<rsp>
       [CHAP_I=<id> CHAP_C=0x<c>]

Response = H(id byte || secret || challenge), H = MD5 (CHAP_A=5) or SHA-256
(CHAP_A=7).  Every login gets a fresh random identifier and challenge from
:mod:`secrets`; responses and names are compared in constant time; an
initiator challenge equal to ours (a reflection attack: it would make us
compute the response it owes us) is refused.  Secrets never appear in a
message, a repr or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from .keys import parse_binary, parse_number

__all__ = ["ALGORITHMS", "ChapCredentials", "ChapFailure", "ChapExchange", "chap_response"]

#: CHAP_A value → (name, hash constructor); IANA "PPP Authentication Algorithms".
ALGORITHMS = {5: ("MD5", hashlib.md5), 7: ("SHA-256", hashlib.sha256)}
#: CHAP_A values by the names used in the config file.
ALGORITHM_NAMES = {name: code for code, (name, _) in ALGORITHMS.items()}
MAX_CHALLENGE = 1024         # longest initiator challenge accepted (bytes)
MIN_CHALLENGE = 1


class ChapFailure(Exception):
    """Authentication failed; ``message`` is safe to log (never holds a secret)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ChapCredentials:
    """What a target (or the discovery portal) requires.

    ``user``/``secret``: the name and secret the initiator must prove.
    ``mutual_user``/``mutual_secret``: the name and secret the target answers
    an initiator challenge with (mutual CHAP); None = one-way only.
    ``algorithms``: the CHAP_A values accepted.
    """

    user: str
    secret: bytes = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: bytes | None = field(default=None, repr=False)
    algorithms: tuple[int, ...] = (7, 5)

    def __post_init__(self):
        if not self.secret:
            raise ValueError("CHAP secret is empty")
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("mutual CHAP needs both a user and a secret")
        if self.mutual_secret is not None and hmac.compare_digest(self.mutual_secret, self.secret):
            raise ValueError("the mutual CHAP secret must differ from the initiator's secret")
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"unsupported CHAP algorithm(s) {bad}")

    @property
    def mutual(self) -> bool:
        return self.mutual_secret is not None


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(identifier || secret || challenge)."""
    h = ALGORITHMS[algorithm][1]()
    h.update(bytes([identifier & 0xFF]))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


class ChapExchange:
    """The target's half of one CHAP exchange (one login of one connection).

    Feed the CHAP_* keys of each Login Request to :meth:`step` (a dict of the
    keys that PDU carried); it returns the keys to answer with, or raises
    :class:`ChapFailure`.  :attr:`done` turns True once the initiator proved
    itself (and, for mutual CHAP, the target answered its challenge).
    """

    WAIT_ALGORITHM, WAIT_RESPONSE, DONE = "wait-algorithm", "wait-response", "done"

    def __init__(self, creds: ChapCredentials, *, token_bytes=secrets.token_bytes):
        self.creds = creds
        self.state = self.WAIT_ALGORITHM
        self.algorithm: int | None = None
        self._token = token_bytes
        self._identifier = 0
        self._challenge = b""
        self.user: str | None = None     # the CHAP_N the initiator proved, once done

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def step(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if not keys:
            return []
        if self.state == self.WAIT_ALGORITHM:
            return self._on_algorithm(keys)
        if self.state == self.WAIT_RESPONSE:
            return self._on_response(keys)
        raise ChapFailure(f"CHAP keys after the exchange finished: {', '.join(sorted(keys))}")

    def _on_algorithm(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if set(keys) != {"CHAP_A"}:
            raise ChapFailure(f"expected CHAP_A first, got {', '.join(sorted(keys))}")
        offered = []
        for item in keys["CHAP_A"].split(","):
            n = parse_number(item)
            if n is not None:
                offered.append(n)
        choice = next((a for a in offered if a in self.creds.algorithms), None)
        if choice is None:
            raise ChapFailure(f"no acceptable CHAP algorithm in CHAP_A={keys['CHAP_A'][:64]!r} "
                              f"(accepted: {','.join(map(str, self.creds.algorithms))})")
        self.algorithm = choice
        self._identifier = secrets.randbelow(256)
        # A challenge at least as long as the digest (16 bytes for MD5, 32 for SHA-256).
        size = max(16, ALGORITHMS[choice][1]().digest_size)
        self._challenge = self._token(size)
        self.state = self.WAIT_RESPONSE
        return [("CHAP_A", str(choice)), ("CHAP_I", str(self._identifier)), ("CHAP_C", _hex(self._challenge))]

    def _on_response(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        extra = set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if extra:
            raise ChapFailure(f"unexpected {', '.join(sorted(extra))} with the CHAP response")
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise ChapFailure("CHAP_N and CHAP_R expected")
        if ("CHAP_I" in keys) != ("CHAP_C" in keys):
            raise ChapFailure("mutual CHAP needs both CHAP_I and CHAP_C")
        algo = self.algorithm
        digest_size = ALGORITHMS[algo][1]().digest_size
        name = keys["CHAP_N"]
        got = parse_binary(keys["CHAP_R"])
        # Compute the expected response whatever the name, so a wrong name and a
        # wrong secret take the same time (no user enumeration by timing).
        want = chap_response(algo, self._identifier, self.creds.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), self.creds.user.encode())
        rsp_ok = got is not None and len(got) == digest_size and hmac.compare_digest(got, want)
        if not (name_ok and rsp_ok):
            if got is None or len(got) != digest_size:
                raise ChapFailure(f"malformed CHAP_R from CHAP_N={name[:64]!r}")
            raise ChapFailure(f"CHAP response for CHAP_N={name[:64]!r} does not verify "
                              f"({'wrong secret' if name_ok else 'unknown user'})")
        self.user = name
        out: list[tuple[str, str]] = []
        if "CHAP_C" in keys:
            out = self._mutual(keys["CHAP_I"], keys["CHAP_C"])
        self.state = self.DONE
        return out

    def _mutual(self, ident_text: str, challenge_text: str) -> list[tuple[str, str]]:
        creds = self.creds
        if not creds.mutual:
            raise ChapFailure("initiator asks for mutual CHAP, but no mutual_user/mutual_secret is configured")
        ident = parse_number(ident_text)
        if ident is None or ident > 255:
            raise ChapFailure(f"malformed CHAP_I={ident_text[:16]!r}")
        challenge = parse_binary(challenge_text)
        if challenge is None or not MIN_CHALLENGE <= len(challenge) <= MAX_CHALLENGE:
            raise ChapFailure("malformed or out-of-range CHAP_C from the initiator")
        if hmac.compare_digest(challenge, self._challenge):
            # RFC 7143 §12.1.3: the target MUST NOT answer a challenge equal to its own.
            raise ChapFailure("initiator reflected the target's CHAP challenge")
        rsp = chap_response(self.algorithm, ident, creds.mutual_secret, challenge)
        return [("CHAP_N", creds.mutual_user), ("CHAP_R", _hex(rsp))]
