"""The login state machine, driven without sockets (RFC 7143 §6.3, §11.12-13)."""

import pytest

from pyiscsi_target.iscsi import keys
from pyiscsi_target.iscsi.connection import Close, Phase, SessionStarted
from pyiscsi_target.iscsi.pdu import F_CONTINUE, F_TRANSIT, LoginRequest, LoginResponse, NopOut
from tests.iscsi.harness import ISID, TARGET, Wire, make_ctx
from tests.support.initiator import default_operational_keys


def answers(data: bytes) -> dict:
    return dict(keys.decode_text(data))


def test_windows_style_login_goes_through_security_then_operational():
    w = Wire()
    (r1, d1), (r2, d2) = w.login(ops=default_operational_keys())
    assert isinstance(r1, LoginResponse) and r1.status_class == 0
    assert r1.transit and r1.csg == 0 and r1.nsg == 1 and r1.tsih == 0
    a1 = answers(d1)
    assert a1["AuthMethod"] == "None" and a1["TargetPortalGroupTag"] == "1" and a1["TargetAlias"] == "disk"
    assert r2.transit and r2.csg == 1 and r2.nsg == 3 and r2.tsih != 0
    a2 = answers(d2)
    assert a2["ErrorRecoveryLevel"] == "0"          # Windows offers 2; we run ERL 0
    assert a2["MaxConnections"] == "1"
    assert a2["MaxRecvDataSegmentLength"] == "262144"  # our declaration
    assert a2["FirstBurstLength"] == "65536" and a2["MaxBurstLength"] == "262144"
    assert w.conn.phase is Phase.FULL_FEATURE
    assert w.conn.max_send_data == 65536
    assert any(isinstance(a, SessionStarted) for a in w.actions)
    dev = w.ctx.targets[TARGET].device
    assert dev.nexuses[0].initiator_port == "iqn.2026-11.test:init,i,0x400001370000"
    assert dev.nexuses[0].target_port == f"{TARGET},t,0x0001"
    # StatSN: the first response starts at the initiator's ExpStatSN, then counts up.
    assert (r1.statsn, r2.statsn) == (0, 1)
    assert r2.expcmdsn == 1 and r2.maxcmdsn == 128


def test_security_straight_to_full_feature_is_bounced_through_operational():
    w = Wire()
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x03, isid=ISID, itt=1, cid=1, cmdsn=1),
               keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET), ("AuthMethod", "None")]))
    rsp = r[0][0]
    assert rsp.transit and rsp.nsg == 1     # we still must declare our MaxRecvDataSegmentLength
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x07, isid=ISID, itt=1, cid=1, cmdsn=1), b"")
    assert r[0][0].nsg == 3 and answers(r[0][1])["MaxRecvDataSegmentLength"] == "262144"


@pytest.mark.parametrize("first,status", [
    ([("SessionType", "Normal"), ("TargetName", TARGET)], 0x0207),                 # no InitiatorName
    ([("InitiatorName", "iqn.a:b"), ("SessionType", "Normal")], 0x0207),           # no TargetName
    ([("InitiatorName", "iqn.a:b"), ("TargetName", "iqn.2026-11.test:nope")], 0x0203),   # not found
    ([("InitiatorName", "iqn.a:b"), ("SessionType", "Weird")], 0x0209),
])
def test_login_refusals_carry_the_rfc_status(first, status):
    w = Wire()
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x01, isid=ISID, itt=1, cid=1, cmdsn=1),
               keys.encode_text(first + [("AuthMethod", "None")]))
    rsp = r[0][0]
    assert (rsp.status_class << 8 | rsp.status_detail) == status
    assert any(isinstance(a, Close) for a in w.actions)


def test_key_offered_twice_is_an_initiator_error():
    w = Wire()
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x01, isid=ISID, itt=1, cid=1, cmdsn=1),
               keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET), ("AuthMethod", "None"),
                                 ("AuthMethod", "None")]))
    assert (r[0][0].status_class, r[0][0].status_detail) == (2, 0)


def test_only_chap_offered_fails_authentication():
    w = Wire()
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x01, isid=ISID, itt=1, cid=1, cmdsn=1),
               keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET), ("AuthMethod", "CHAP")]))
    assert (r[0][0].status_class, r[0][0].status_detail) == (2, 1)


def test_unsupported_version():
    w = Wire()
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x01, version_max=2, version_min=1, isid=ISID, itt=1, cid=1),
               keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET)]))
    assert (r[0][0].status_class, r[0][0].status_detail) == (2, 5)


def test_multi_pdu_text_with_continue_bit():
    w = Wire()
    text = keys.encode_text([("InitiatorName", "iqn.a:b"), ("TargetName", TARGET), ("AuthMethod", "None")])
    r = w.send(LoginRequest(flags=F_CONTINUE | 0x00, isid=ISID, itt=1, cid=1, cmdsn=1), text[:10])
    assert r[0][0].status_class == 0 and not r[0][0].transit and r[0][1] == b""
    r = w.send(LoginRequest(flags=F_TRANSIT | 0x01, isid=ISID, itt=1, cid=1, cmdsn=1), text[10:])
    assert r[0][0].transit and answers(r[0][1])["AuthMethod"] == "None"


def test_non_login_pdu_during_login_closes():
    w = Wire()
    w.send(NopOut(itt=1, cmdsn=1))
    assert any(isinstance(a, Close) for a in w.actions)


def test_session_reinstatement_closes_the_old_connection_and_keeps_the_nexus():
    ctx = make_ctx()
    w1 = Wire(ctx)
    w1.login()
    old_tsih = w1.conn.session.tsih
    w2 = Wire(ctx)
    w2.login()
    assert w2.conn.session.tsih != old_tsih
    assert w1.conn.phase is Phase.CLOSED
    assert w1.conn.session.nexus == w2.conn.session.nexus
    assert len(ctx.sessions) == 1


def test_second_connection_beyond_max_connections_is_refused():
    ctx = make_ctx()
    w1 = Wire(ctx)
    w1.login()
    w2 = Wire(ctx)
    r = w2.login(tsih=w1.conn.session.tsih, cid=2)
    rsp = r[-1][0]
    assert (rsp.status_class, rsp.status_detail) == (2, 6)


def test_unknown_tsih_is_session_does_not_exist():
    w = Wire()
    r = w.login(tsih=0x4242)
    assert (r[0][0].status_class, r[0][0].status_detail) == (2, 0x0A)


def test_connection_reinstatement_same_cid_replaces_the_connection():
    ctx = make_ctx()
    w1 = Wire(ctx)
    w1.login()
    s = w1.conn.session
    w2 = Wire(ctx)
    r = w2.login(tsih=s.tsih, cid=1)
    assert r[-1][0].status_class == 0 and r[-1][0].tsih == s.tsih
    assert w1.conn.phase is Phase.CLOSED and s.connections[1] is w2.conn


def test_discovery_session_needs_no_target_name():
    w = Wire()
    r = w.login(target=None, session_type="Discovery")
    assert r[-1][0].status_class == 0 and w.conn.session.discovery
    assert "TargetPortalGroupTag" not in answers(r[0][1])


def test_login_timeout_closes_the_connection():
    w = Wire(make_ctx(login_timeout=5.0), now=100.0)
    assert w.conn.get_timer() == 105.0
    w.conn.handle_timer(104.0)
    assert not w.conn.take_actions()
    w.conn.handle_timer(105.0)
    assert any(isinstance(a, Close) for a in w.conn.take_actions())
