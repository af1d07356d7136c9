"""CHAP (RFC 7143 §12.1.3, RFC 1994): the exchange alone and inside the sans-IO login."""

from __future__ import annotations

import hashlib
import logging

import pytest

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.chap import ChapCredentials, ChapExchange, ChapFailure, chap_response
from pyiscsi_target.iscsi.connection import Close, Phase
from pyiscsi_target.iscsi.pdu import F_TRANSIT, LoginRequest
from tests.iscsi.harness import ISID, TARGET, Wire, make_ctx

SECRET = b"initiator-secret"          # 16 bytes
MSECRET = b"target-secret-12"         # 16 bytes
CREDS = ChapCredentials("alice", SECRET)
MUTUAL = ChapCredentials("alice", SECRET, "the-target", MSECRET)


def status(rsp) -> int:
    return rsp.status_class << 8 | rsp.status_detail


# -- the exchange alone ---------------------------------------------------------

def test_rfc1994_md5_response_vector():
    # MD5(id || secret || challenge), computed independently.
    want = hashlib.md5(bytes([7]) + b"secret" + bytes(range(16))).digest()
    assert chap_response(5, 7, b"secret", bytes(range(16))) == want
    assert len(chap_response(7, 7, b"secret", b"c")) == 32


@pytest.mark.parametrize("offer,algo,clen", [("5", 5, 16), ("7,5", 7, 32), ("5,7", 5, 16), ("1,99,7", 7, 32)])
def test_algorithm_choice_follows_initiator_preference(offer, algo, clen):
    ex = ChapExchange(CREDS)
    a = dict(ex.step({"CHAP_A": offer}))
    assert a["CHAP_A"] == str(algo)
    assert 0 <= int(a["CHAP_I"]) <= 255
    assert len(keys.parse_binary(a["CHAP_C"])) == clen


def test_no_acceptable_algorithm():
    with pytest.raises(ChapFailure, match="no acceptable"):
        ChapExchange(CREDS).step({"CHAP_A": "6,8"})
    only_md5 = ChapCredentials("alice", SECRET, algorithms=(5,))
    with pytest.raises(ChapFailure):
        ChapExchange(only_md5).step({"CHAP_A": "7"})


def test_fresh_identifier_and_challenge_every_login():
    seen = set()
    for _ in range(50):
        a = dict(ChapExchange(CREDS).step({"CHAP_A": "5"}))
        seen.add(a["CHAP_C"])
    assert len(seen) == 50


def _answer(ex, secret=SECRET, user="alice", algo="5", fmt="hex", **extra):
    a = dict(ex.step({"CHAP_A": algo}))
    c = keys.parse_binary(a["CHAP_C"])
    r = chap_response(int(a["CHAP_A"]), int(a["CHAP_I"]), secret, c)
    text = "0x" + r.hex() if fmt == "hex" else "0b" + __import__("base64").b64encode(r).decode()
    return ex.step({"CHAP_N": user, "CHAP_R": text, **extra}), c


@pytest.mark.parametrize("algo", ["5", "7"])
@pytest.mark.parametrize("fmt", ["hex", "base64"])
def test_one_way_success(algo, fmt):
    ex = ChapExchange(CREDS)
    out, _ = _answer(ex, algo=algo, fmt=fmt)
    assert out == [] and ex.done and ex.user == "alice"


@pytest.mark.parametrize("kw,why", [
    ({"secret": b"wrong-secret-123"}, "wrong secret"),
    ({"user": "mallory"}, "unknown user"),
])
def test_one_way_refused(kw, why):
    with pytest.raises(ChapFailure, match=why) as ei:
        _answer(ChapExchange(CREDS), **kw)
    assert "secret-123" not in str(ei.value) and SECRET.decode() not in str(ei.value)


@pytest.mark.parametrize("bad", ["0x00", "garbage", "0x" + "00" * 17, ""])
def test_malformed_response(bad):
    ex = ChapExchange(CREDS)
    ex.step({"CHAP_A": "5"})
    with pytest.raises(ChapFailure):
        ex.step({"CHAP_N": "alice", "CHAP_R": bad})


def test_mutual_answers_the_initiator_challenge():
    ex = ChapExchange(MUTUAL)
    ic = bytes(range(100, 116))
    out, _ = _answer(ex, CHAP_I="42", CHAP_C="0x" + ic.hex())
    out = dict(out)
    assert out["CHAP_N"] == "the-target"
    assert keys.parse_binary(out["CHAP_R"]) == chap_response(5, 42, MSECRET, ic)


def test_reflected_challenge_is_refused():
    ex = ChapExchange(MUTUAL)
    a = dict(ex.step({"CHAP_A": "5"}))
    c = keys.parse_binary(a["CHAP_C"])
    r = chap_response(5, int(a["CHAP_I"]), SECRET, c)
    with pytest.raises(ChapFailure, match="reflected"):
        ex.step({"CHAP_N": "alice", "CHAP_R": "0x" + r.hex(), "CHAP_I": a["CHAP_I"], "CHAP_C": a["CHAP_C"]})


def test_mutual_without_target_credentials_is_refused():
    with pytest.raises(ChapFailure, match="mutual"):
        _answer(ChapExchange(CREDS), CHAP_I="1", CHAP_C="0x" + "ab" * 16)


@pytest.mark.parametrize("extra", [{"CHAP_I": "1"}, {"CHAP_I": "300", "CHAP_C": "0x01"},
                                   {"CHAP_I": "1", "CHAP_C": "0x"}, {"CHAP_I": "1", "CHAP_C": "0x" + "00" * 1025}])
def test_malformed_mutual_challenge(extra):
    with pytest.raises(ChapFailure):
        _answer(ChapExchange(MUTUAL), **extra)


def test_credentials_rules_and_repr_hides_secrets():
    with pytest.raises(ValueError, match="differ"):
        ChapCredentials("a", SECRET, "t", SECRET)
    with pytest.raises(ValueError):
        ChapCredentials("a", SECRET, "t", None)
    with pytest.raises(ValueError):
        ChapCredentials("a", b"")
    assert SECRET.decode() not in repr(MUTUAL) and MSECRET.decode() not in repr(MUTUAL)


# -- inside the login state machine ------------------------------------------------

def chap_ctx(creds=CREDS, **kw):
    ctx = make_ctx(**kw)
    ctx.targets[TARGET].chap = creds
    return ctx


def _req(flags, **kw):
    return LoginRequest(flags=flags, isid=ISID, itt=1, cid=1, cmdsn=1, **kw)


def chap_login(w, *, secret=SECRET, user="alice", algo="5", mutual_challenge=None, name="iqn.2026-11.test:init",
               target=TARGET, session_type="Normal"):
    """libiscsi's sequence. Returns the list of (rsp, answers) of each step."""
    steps = []
    first = [("InitiatorName", name), ("SessionType", session_type)] + ([("TargetName", target)] if target else [])
    r = w.send(_req(F_TRANSIT | 0x01), keys.encode_text(first + [("AuthMethod", "CHAP,None")]))
    steps.append((r[0][0], dict(keys.decode_text(r[0][1]))))
    if r[0][0].status_class or r[0][0].transit:
        return steps
    r = w.send(_req(F_TRANSIT | 0x01), keys.encode_text([("CHAP_A", algo)]))
    a = dict(keys.decode_text(r[0][1]))
    steps.append((r[0][0], a))
    if r[0][0].status_class:
        return steps
    c = keys.parse_binary(a["CHAP_C"])
    resp = chap_response(int(a["CHAP_A"]), int(a["CHAP_I"]), secret, c)
    pairs = [("CHAP_N", user), ("CHAP_R", "0x" + resp.hex())]
    if mutual_challenge is not None:
        pairs += [("CHAP_I", "9"), ("CHAP_C", "0x" + mutual_challenge.hex())]
    r = w.send(_req(F_TRANSIT | 0x01), keys.encode_text(pairs))
    steps.append((r[0][0], dict(keys.decode_text(r[0][1]))))
    if r[0][0].status_class:
        return steps
    r = w.send(_req(F_TRANSIT | 0x07), keys.encode_text([("MaxRecvDataSegmentLength", "65536")]))
    steps.append((r[0][0], dict(keys.decode_text(r[0][1]))))
    return steps


def test_login_with_chap():
    w = Wire(chap_ctx())
    steps = chap_login(w)
    (r1, a1), (r2, a2), (r3, a3), (r4, _) = steps
    assert a1["AuthMethod"] == "CHAP" and not r1.transit       # T=1 asked, refused until authenticated
    assert a2["CHAP_A"] == "5" and not r2.transit
    assert r3.transit and r3.nsg == 1 and status(r3) == 0
    assert r4.nsg == 3 and w.conn.phase is Phase.FULL_FEATURE
    assert w.conn.login.chap_user == "alice"


def test_login_with_sha256_and_mutual():
    w = Wire(chap_ctx(MUTUAL))
    ic = bytes(range(32))
    steps = chap_login(w, algo="7,5", mutual_challenge=ic)
    a3 = steps[2][1]
    assert steps[1][1]["CHAP_A"] == "7"
    assert a3["CHAP_N"] == "the-target"
    assert keys.parse_binary(a3["CHAP_R"]) == chap_response(7, 9, MSECRET, ic)
    assert w.conn.phase is Phase.FULL_FEATURE


def test_wrong_secret_is_authentication_failure_logged_without_secret(caplog):
    w = Wire(chap_ctx())
    with caplog.at_level(logging.DEBUG):
        steps = chap_login(w, secret=b"not-the-secret!!")
    assert status(steps[-1][0]) == 0x0201
    assert any(isinstance(a, Close) for a in w.actions)
    lines = [r.getMessage() for r in caplog.records if "login refused" in r.getMessage()]
    assert len(lines) == 1 and "iqn.2026-11.test:init" in lines[0] and "127.0.0.1:40000" in lines[0]
    assert "0x0201" in lines[0]
    text = caplog.text
    assert SECRET.decode() not in text and "not-the-secret" not in text
    assert w.conn.login.failure.status == 0x0201


def test_chap_required_refuses_auth_none():
    w = Wire(chap_ctx())
    r = w.login()       # AuthMethod=None
    assert status(r[0][0]) == 0x0201


def test_chap_required_refuses_skipping_security_stage():
    w = Wire(chap_ctx())
    r = w.send(_req(F_TRANSIT | 0x07), keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET)]))
    assert status(r[0][0]) == 0x0201


def test_chap_required_refuses_transit_without_authmethod():
    w = Wire(chap_ctx())
    r = w.send(_req(F_TRANSIT | 0x01), keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET)]))
    assert status(r[0][0]) == 0x0201


def test_chap_response_before_challenge_is_refused():
    w = Wire(chap_ctx())
    w.send(_req(0x01), keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET),
                                         ("AuthMethod", "CHAP")]))
    r = w.send(_req(0x01), keys.encode_text([("CHAP_N", "alice"), ("CHAP_R", "0x" + "00" * 16)]))
    assert status(r[0][0]) == 0x0201


def test_chap_keys_without_authmethod_chap_are_an_initiator_error():
    w = Wire()
    r = w.send(_req(0x01), keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET),
                                             ("AuthMethod", "None"), ("CHAP_A", "5")]))
    assert status(r[0][0]) == 0x0200


def test_target_without_chap_answers_none_to_libiscsi_offer():
    w = Wire()
    steps = chap_login(w)
    assert steps[0][1]["AuthMethod"] == "None" and steps[0][0].transit


def test_discovery_chap():
    ctx = make_ctx(discovery_chap=CREDS)
    w = Wire(ctx)
    steps = chap_login(w, target=None, session_type="Discovery")
    assert w.conn.phase is Phase.FULL_FEATURE, steps
    w2 = Wire(ctx)
    steps = chap_login(w2, target=None, session_type="Discovery", secret=b"wrong-secret-xyz")
    assert status(steps[-1][0]) == 0x0201
    # Discovery CHAP does not make normal sessions require CHAP.
    assert Wire(ctx).login()[-1][0].nsg == 3
