"""pyiscsi_target.logs: text and JSON formats, extra= fields, secret redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pyiscsi_target import logs
from pyiscsi_target.cli import build_parser
from pyiscsi_target.config import ChapConfig, Config, IscsiConfig, ServerConfig, TargetConfig


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setattr(logs, "_secrets", ())
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]


def _config() -> Config:
    return Config(server=ServerConfig(), iscsi=IscsiConfig(), source=None, targets=(
        TargetConfig(iqn="iqn.2026-11.t:a", chap=ChapConfig(user="u", secret="One-way-secret1",
                                                            mutual_user="t", mutual_secret="Mutual-secret2")),
        TargetConfig(iqn="iqn.2026-11.t:b")),
        discovery_chap=ChapConfig(user="d", secret="Discovery-sec3"))


def test_secrets_of_config():
    assert sorted(logs.secrets_of(_config())) == ["Discovery-sec3", "Mutual-secret2", "One-way-secret1"]


def test_json_one_object_per_line_with_extra_fields():
    buf = io.StringIO()
    logs.setup("DEBUG", "json", buf)
    log = logging.getLogger("pyiscsi_target.test")
    log.info("login: %s", "iqn.x:n1", extra={"event": "login", "initiator": "iqn.x:n1", "address": "10.0.0.5:5000",
                                              "isid": b"\x40\x00\x01\x37\x00\x00", "tsih": 3})
    log.debug("multi\nline")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    a, b = map(json.loads, lines)
    assert a["level"] == "INFO" and a["logger"] == "pyiscsi_target.test" and a["message"] == "login: iqn.x:n1"
    assert a["event"] == "login" and a["address"] == "10.0.0.5:5000" and a["isid"] == "400001370000"
    assert a["tsih"] == 3 and "T" in a["time"] and a["time"][-6] in "+-"
    assert b["message"] == "multi\nline" and b["level"] == "DEBUG" and "event" not in b


def test_json_exception_is_one_line():
    buf = io.StringIO()
    logs.setup("INFO", "json", buf)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    (line,) = buf.getvalue().splitlines()
    r = json.loads(line)
    assert r["level"] == "ERROR" and "RuntimeError: boom" in r["exception"]


@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_configured_secrets_never_written(fmt):
    buf = io.StringIO()
    logs.setup("DEBUG", fmt, buf, _config())
    log = logging.getLogger("pyiscsi_target.test")
    # whatever a careless log call passes: message, arguments, fields, a traceback
    log.debug("secret is One-way-secret1")
    log.info("%s and %r", "Mutual-secret2", {"k": "Discovery-sec3"}, extra={"chap": {"secret": "One-way-secret1"},
                                                                             "list": ["Mutual-secret2"]})
    try:
        raise ValueError("bad Discovery-sec3")
    except ValueError:
        log.exception("with One-way-secret1")
    out = buf.getvalue()
    for s in ("One-way-secret1", "Mutual-secret2", "Discovery-sec3"):
        assert s not in out
    assert logs.REDACTED in out
    if fmt == "json":
        for line in out.splitlines():
            json.loads(line)


def test_added_secrets_kept_and_short_ones_ignored():
    logs.add_secrets(["First-secret-01"])
    logs.add_secrets(["Second-secret02", "abc", ""])
    assert logs.redact("First-secret-01 Second-secret02 abc") == "*** *** abc"


def test_serve_options():
    p = build_parser()
    a = p.parse_args(["serve", "c.toml"])
    assert (a.log_format, a.log_level) == ("text", "INFO")
    a = p.parse_args(["serve", "c.toml", "--log-format", "json", "--log-level", "debug"])
    assert (a.log_format, a.log_level) == ("json", "DEBUG")
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "c.toml", "--log-format", "xml"])
    with pytest.raises(ValueError):
        logs.setup("INFO", "xml")
