"""Log output of ``pyiscsi-target serve``: text or JSON lines, never a secret.

* ``text``: ``2026-11-25 10:00:00,123 INFO    pyiscsi_target.iscsi.connection: login: ...``
* ``json``: one object per line with ``time`` (ISO 8601, local time with its
  offset), ``level``, ``logger``, ``message``, the structured fields the code
  passes with ``extra=`` (logins, logouts and refusals carry ``event``,
  ``initiator``, ``address``, ...) and ``exception`` when there is one.

Secrets: the code never formats a CHAP secret into a message, and as a second
line of defence every configured CHAP secret (one-way, mutual, discovery;
also those added by a reload) is replaced by ``***`` in everything written,
message, fields and tracebacks alike.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
from typing import Iterable

__all__ = ["FORMATS", "TEXT_FORMAT", "setup", "add_secrets", "secrets_of", "JsonFormatter", "TextFormatter"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REDACTED = "***"
MIN_SECRET = 4  # shorter "secrets" would blank out ordinary words; config warns below 12 anyway

# LogRecord attributes that are not structured fields passed with extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def secrets_of(config) -> list[str]:
    """Every CHAP secret a config holds (targets and discovery, one-way and mutual)."""
    chaps = [getattr(t, "chap", None) for t in getattr(config, "targets", ())]
    chaps.append(getattr(config, "discovery_chap", None))
    out = []
    for c in chaps:
        if c is not None:
            out += [s for s in (c.secret, c.mutual_secret) if s]
    return out


def add_secrets(values: Iterable[str]) -> None:
    """Redact these from all log output from now on (a reload adds the new
    ones and keeps the old: a line about an old session may still name one)."""
    global _secrets
    with _lock:
        merged = set(_secrets) | {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET}
        # longest first, so a secret containing another is replaced whole
        _secrets = tuple(sorted(merged, key=len, reverse=True))


def redact(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def _clean(v):
    """A JSON-able, redacted copy of an extra= value."""
    if isinstance(v, str):
        return redact(v)
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {redact(str(k)): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_clean(x) for x in v]
    return redact(str(v))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created).astimezone()
        out = {
            "time": t.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_") and k not in out:
                out[k] = _clean(v)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exception"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "INFO", fmt: str = "text", stream=None, config=None) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt``; redact ``config``'s secrets."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if config is not None:
        add_secrets(secrets_of(config))
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    return handler
