"""Tests for pyiscsi_target.iscsi.keys: the text codec and login negotiation (RFC 7143 §6, §12, §13)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_target.iscsi.keys import (
    KEYS,
    Kind,
    Negotiation,
    NegotiationError,
    SessionParams,
    TextFormatError,
    decode_text,
    encode_text,
    parse_binary,
    parse_number,
)

# The target configuration the lead uses.
OFFERS = {
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "1048576",
    "FirstBurstLength": "262144",
    "ImmediateData": "Yes",
    "InitialR2T": "No",
    "HeaderDigest": "None,CRC32C",
    "DataDigest": "None,CRC32C",
    "MaxConnections": "1",
    "ErrorRecoveryLevel": "0",
    "MaxOutstandingR2T": "1",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "AuthMethod": "None",
}

INITIATOR = "iqn.1991-05.com.microsoft:host1.example.com"
TARGET = "iqn.2026-11.org.example:quorum"


def neg(**overrides: str) -> Negotiation:
    return Negotiation({**OFFERS, **overrides})


def security_done(n: Negotiation, session_type: str = "Normal") -> None:
    first = [("InitiatorName", INITIATOR), ("SessionType", session_type), ("AuthMethod", "None")]
    if session_type == "Normal":
        first.append(("TargetName", TARGET))
    assert n.respond(first, "security") == [("AuthMethod", "None")]


def answer(n: Negotiation, key: str, value: str, stage: str = "operational") -> str | None:
    out = dict(n.respond([(key, value)], stage))
    return out.get(key)


def expect_error(status: tuple[int, int] = (0x02, 0x00)):
    class _Ctx:
        def __enter__(self):
            self._raises = pytest.raises(NegotiationError)
            self.info = self._raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._raises.__exit__(*exc)
            if handled:
                assert (self.info.value.status_class, self.info.value.status_detail) == status
            return handled

    return _Ctx()


# --------------------------------------------------------------------------
# text codec


class TestDecode:
    def test_pairs_in_order(self):
        data = b"InitiatorName=iqn.x:y\0SessionType=Normal\0AuthMethod=None\0"
        assert decode_text(data) == [("InitiatorName", "iqn.x:y"), ("SessionType", "Normal"), ("AuthMethod", "None")]

    def test_zero_padding_tolerated(self):
        assert decode_text(b"A=1\0B=2\0\0\0\0") == [("A", "1"), ("B", "2")]

    def test_empty_and_all_padding(self):
        assert decode_text(b"") == []
        assert decode_text(b"\0\0\0\0") == []

    def test_missing_final_nul_lenient_by_default(self):
        assert decode_text(b"A=1\0B=2") == [("A", "1"), ("B", "2")]

    def test_missing_final_nul_strict(self):
        with pytest.raises(TextFormatError):
            decode_text(b"A=1\0B=2", strict=True)
        assert decode_text(b"A=1\0B=2\0", strict=True) == [("A", "1"), ("B", "2")]

    def test_accepts_bytearray_and_memoryview(self):
        assert decode_text(bytearray(b"A=1\0")) == [("A", "1")]
        assert decode_text(memoryview(b"xxA=1\0")[2:]) == [("A", "1")]

    def test_empty_value_allowed(self):
        assert decode_text(b"InitiatorAlias=\0") == [("InitiatorAlias", "")]

    def test_equals_inside_value_kept(self):
        assert decode_text(b"CHAP_C=0bAAECAw==\0") == [("CHAP_C", "0bAAECAw==")]

    def test_duplicates_are_returned_not_judged(self):
        assert decode_text(b"A=1\0A=2\0") == [("A", "1"), ("A", "2")]

    def test_utf8_value(self):
        assert decode_text("InitiatorAlias=Büro-PC\0".encode()) == [("InitiatorAlias", "Büro-PC")]

    def test_special_key_names(self):
        data = b"iSCSIProtocolLevel=1\0X#NodeArchitecture=x\0X-com.example.foo=1\0K.a+b@c_d-e=1\0"
        assert [k for k, _ in decode_text(data)] == [
            "iSCSIProtocolLevel", "X#NodeArchitecture", "X-com.example.foo", "K.a+b@c_d-e"]

    @pytest.mark.parametrize(
        "data",
        [
            b"NoEquals\0",
            b"A=1\0\0B=2\0",  # empty pair in the middle
            b"\0A=1\0",  # empty pair first
            b"=value\0",  # empty key
            b"lowercase=1\0",  # must begin with a capital letter
            b"Bad Key=1\0",
            b"Bad/Key=1\0",
            b"X#=1\0",
            b"K" * 64 + b"=1\0",  # key over 63 bytes
            b"A=" + b"v" * 256 + b"\0",  # value over 255 bytes
            b"A=\xff\xfe\0",  # not UTF-8
            b"\xc3=1\0",
            b"CHAP_C=0x" + b"a" * 8192 + b"\0",  # even a large-binary value is capped
        ],
    )
    def test_malformed(self, data):
        with pytest.raises(TextFormatError):
            decode_text(data)

    def test_key_of_63_bytes_ok(self):
        key = "K" * 63
        assert decode_text(key.encode() + b"=1\0") == [(key, "1")]

    def test_value_of_255_bytes_ok(self):
        assert decode_text(b"A=" + b"v" * 255 + b"\0") == [("A", "v" * 255)]

    def test_long_list_with_short_items_ok(self):
        value = ",".join(["x" * 200] * 5)
        assert decode_text(f"A={value}\0".encode()) == [("A", value)]

    def test_large_binary_chap_values(self):
        challenge = "0x" + "ab" * 1024  # 1024-byte challenge, the CHAP maximum
        assert decode_text(f"CHAP_C={challenge}\0CHAP_R={challenge}\0".encode()) == [
            ("CHAP_C", challenge), ("CHAP_R", challenge)]

    def test_text_format_error_is_value_error(self):
        assert issubclass(TextFormatError, ValueError)


class TestEncode:
    def test_each_pair_nul_terminated(self):
        assert encode_text([("A", "1"), ("B", "")]) == b"A=1\0B=\0"

    def test_empty(self):
        assert encode_text([]) == b""

    def test_generator_input(self):
        assert encode_text((k, v) for k, v in [("HeaderDigest", "None")]) == b"HeaderDigest=None\0"

    @pytest.mark.parametrize("pair", [("bad", "1"), ("A", "x\0y"), ("A", "v" * 256), ("", "1"), ("A=B", "1")])
    def test_rejects_invalid(self, pair):
        with pytest.raises(TextFormatError):
            encode_text([pair])


_key_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_")
_keys = st.one_of(
    st.sampled_from(sorted(KEYS)),
    st.builds(lambda first, rest: first + rest, st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
              st.text(_key_chars, max_size=62)),
)
_values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60)


class TestCodecProperties:
    @given(st.binary(max_size=600))
    @settings(max_examples=400)
    def test_decode_random_bytes_only_raises_text_format_error(self, data):
        try:
            pairs = decode_text(data)
        except TextFormatError:
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in pairs)

    @given(st.lists(st.tuples(_keys, _values), max_size=12))
    def test_encode_decode_round_trip(self, pairs):
        data = encode_text(pairs)
        assert decode_text(data, strict=True) == pairs
        assert encode_text(decode_text(data)) == data

    @given(st.lists(st.tuples(_keys, _values), min_size=1, max_size=6), st.integers(0, 3))
    def test_padding_does_not_change_result(self, pairs, pad):
        assert decode_text(encode_text(pairs) + b"\0" * pad) == pairs


class TestNumbers:
    @pytest.mark.parametrize(
        "text,value",
        [("0", 0), ("8192", 8192), ("0x40000", 0x40000), ("0X1f", 31), ("007", 7), ("18446744073709551615", 2**64 - 1)],
    )
    def test_valid(self, text, value):
        assert parse_number(text) == value

    @pytest.mark.parametrize("text", ["", "-1", "+1", " 1", "1 ", "1.0", "0x", "0xg", "abc", "18446744073709551616",
                                      "\u0661", "0b1010", "1e3"])
    def test_invalid(self, text):
        assert parse_number(text) is None

    def test_binary(self):
        assert parse_binary("0x0102") == b"\x01\x02"
        assert parse_binary("0x102") == b"\x01\x02"
        assert parse_binary("0bAQI=") == b"\x01\x02"
        assert parse_binary("258") == b"\x01\x02"
        assert parse_binary("0bA?==") is None
        assert parse_binary("0xzz") is None
        assert parse_binary("x") is None


# --------------------------------------------------------------------------
# key table


RFC7143_KEYS = [
    "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName", "InitiatorName", "TargetAlias",
    "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
    "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType",
    "TaskReporting", "iSCSIProtocolLevel", "OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt", "X#NodeArchitecture",
    "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R",
]


class TestKeyTable:
    def test_every_key_present(self):
        assert set(RFC7143_KEYS) <= set(KEYS)

    def test_names_match(self):
        assert all(name == kd.name for name, kd in KEYS.items())

    @pytest.mark.parametrize(
        "name,kind,default,lo,hi,scope,use",
        [
            ("HeaderDigest", Kind.LIST, "None", None, None, "CO", "IO"),
            ("MaxConnections", Kind.MIN, "1", 1, 65535, "SW", "LO"),
            ("InitialR2T", Kind.OR, "Yes", None, None, "SW", "LO"),
            ("ImmediateData", Kind.AND, "Yes", None, None, "SW", "LO"),
            ("MaxRecvDataSegmentLength", Kind.NUM_DECLARATIVE, "8192", 512, 2**24 - 1, "CO", "ALL"),
            ("MaxBurstLength", Kind.MIN, "262144", 512, 2**24 - 1, "SW", "LO"),
            ("FirstBurstLength", Kind.MIN, "65536", 512, 2**24 - 1, "SW", "LO"),
            ("DefaultTime2Wait", Kind.MAX, "2", 0, 3600, "SW", "LO"),
            ("DefaultTime2Retain", Kind.MIN, "20", 0, 3600, "SW", "LO"),
            ("MaxOutstandingR2T", Kind.MIN, "1", 1, 65535, "SW", "LO"),
            ("DataPDUInOrder", Kind.OR, "Yes", None, None, "SW", "LO"),
            ("DataSequenceInOrder", Kind.OR, "Yes", None, None, "SW", "LO"),
            ("ErrorRecoveryLevel", Kind.MIN, "0", 0, 2, "SW", "LO"),
            ("iSCSIProtocolLevel", Kind.MIN, "1", 0, 31, "SW", "LO"),
            ("TaskReporting", Kind.LIST, "RFC3720", None, None, "SW", "LO"),
            ("SessionType", Kind.DECLARATIVE, "Normal", None, None, "SW", "LO"),
            ("InitiatorName", Kind.DECLARATIVE, None, None, None, "SW", "IO"),
            ("SendTargets", Kind.DECLARATIVE, None, None, None, "SW", "FFPO"),
        ],
    )
    def test_rows(self, name, kind, default, lo, hi, scope, use):
        kd = KEYS[name]
        assert (kd.kind, kd.default, kd.lo, kd.hi, kd.scope, kd.use) == (kind, default, lo, hi, scope, use)

    def test_phases_and_senders(self):
        assert {n for n, kd in KEYS.items() if kd.phase == "security"} == {
            "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}
        assert {n for n, kd in KEYS.items() if kd.phase == "any"} == {
            "TargetName", "InitiatorName", "TargetAlias", "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag",
            "SessionType", "X#NodeArchitecture"}
        assert {n for n, kd in KEYS.items() if kd.sender == "target"} == {
            "TargetAlias", "TargetAddress", "TargetPortalGroupTag"}

    def test_discovery_irrelevance(self):
        irrelevant = {n for n, kd in KEYS.items() if kd.irrelevant_in_discovery}
        assert irrelevant == {"MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                              "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "TaskReporting"}
        assert KEYS["MaxBurstLength"].discovery is True

    def test_obsolete(self):
        assert {n for n, kd in KEYS.items() if kd.obsolete} == {"IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"}

    def test_defaults_agree_with_session_params(self):
        params = SessionParams()
        for kd in KEYS.values():
            if kd.attr is None or kd.default is None:
                continue
            current = getattr(params, kd.attr)
            if isinstance(current, bool):
                expected = kd.default in ("Yes", "CRC32C")
            elif isinstance(current, int):
                expected = int(kd.default)
            else:
                expected = kd.default
            assert current == expected, kd.name


# --------------------------------------------------------------------------
# negotiation: real initiators


WINDOWS_OPERATIONAL = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("ErrorRecoveryLevel", "2"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("MaxConnections", "8"),
    ("MaxOutstandingR2T", "1"),
    ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "20"),
    ("MaxRecvDataSegmentLength", "65536"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("iSCSIProtocolLevel", "2"),
]


class TestWindows:
    def test_full_login(self):
        n = Negotiation({**OFFERS, "TargetPortalGroupTag": "1"})
        first = decode_text(
            f"InitiatorName={INITIATOR}\0SessionType=Normal\0TargetName={TARGET}\0AuthMethod=None\0".encode())
        out = n.respond(first, "security") + n.target_declarations("security")
        assert out == [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]
        assert not n.pending()

        out = n.respond(WINDOWS_OPERATIONAL, "operational") + n.target_declarations("operational")
        assert out == [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ErrorRecoveryLevel", "0"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxConnections", "1"),
            ("MaxOutstandingR2T", "1"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "20"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("iSCSIProtocolLevel", "1"),
        ]
        assert not n.pending()
        assert n.missing_required() is None
        p = n.params
        assert (p.header_digest, p.data_digest) == (False, False)
        assert p.error_recovery_level == 0
        assert (p.initial_r2t, p.immediate_data) == (False, True)
        assert (p.max_burst_length, p.first_burst_length) == (262144, 65536)
        assert p.max_connections == 1
        assert p.default_time2wait == 2 and p.default_time2retain == 20
        assert p.max_recv_data_segment_length == 65536  # what we may send
        assert p.target_max_recv_data_segment_length == 262144  # what Windows may send us
        assert (p.initiator_name, p.target_name, p.session_type) == (INITIATOR, TARGET, "Normal")
        assert p.iscsi_protocol_level == 1
        assert p.auth_method == "None"

    def test_discovery_session(self):
        n = Negotiation({**OFFERS, "TargetPortalGroupTag": "1"})
        out = n.respond([("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")],
                        "security")
        assert out == [("AuthMethod", "None")]
        assert n.params.session_type == "Discovery"
        out = n.respond([("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536"),
                         ("DefaultTime2Wait", "0"), ("DefaultTime2Retain", "0")], "operational")
        assert dict(out) == {"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": "262144",
                             "DefaultTime2Wait": "2", "DefaultTime2Retain": "0"}
        assert n.missing_required() is None  # no TargetName needed


class TestOpenIscsi:
    def test_full_login(self):
        n = neg()
        out = n.respond([("InitiatorName", "iqn.2004-10.com.ubuntu:01:abcdef"), ("InitiatorAlias", "host1"),
                         ("TargetName", TARGET), ("SessionType", "Normal"), ("AuthMethod", "None")], "security")
        assert out == [("AuthMethod", "None")]
        out = n.respond(decode_text(
            b"HeaderDigest=None\0DataDigest=None\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0IFMarker=No\0"
            b"OFMarker=No\0ErrorRecoveryLevel=0\0InitialR2T=No\0ImmediateData=Yes\0MaxBurstLength=16776192\0"
            b"FirstBurstLength=262144\0MaxOutstandingR2T=1\0MaxConnections=1\0DataPDUInOrder=Yes\0"
            b"DataSequenceInOrder=Yes\0MaxRecvDataSegmentLength=262144\0"), "operational")
        got = dict(out)
        assert got["MaxBurstLength"] == "1048576"
        assert got["FirstBurstLength"] == "262144"
        assert got["DefaultTime2Retain"] == "0"
        assert got["MaxRecvDataSegmentLength"] == "262144"
        assert len(out) == 16
        assert n.target_declarations("operational") == []
        assert n.params.initiator_alias == "host1"
        assert n.params.max_burst_length == 1048576

    def test_digests_requested(self):
        n = neg()
        security_done(n)
        out = n.respond([("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C,None")], "operational")
        assert out == [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
        assert n.params.header_digest and n.params.data_digest


# --------------------------------------------------------------------------
# result functions


class TestListNegotiation:
    @pytest.mark.parametrize(
        "ours,theirs,result",
        [
            ("None,CRC32C", "CRC32C,None", "CRC32C"),  # the proposer's order wins
            ("None,CRC32C", "None,CRC32C", "None"),
            ("CRC32C,None", "None,CRC32C", "None"),
            ("CRC32C", "None,CRC32C", "CRC32C"),
            ("None", "CRC32C", "Reject"),
            ("CRC32C", "None", "Reject"),
            ("None,CRC32C", "MD5,CRC32C", "CRC32C"),  # unknown values are ignored
            ("None,CRC32C", "MD5", "Reject"),
            ("None,CRC32C", "", "Reject"),
        ],
    )
    def test_digest(self, ours, theirs, result):
        n = neg(HeaderDigest=ours)
        security_done(n)
        assert answer(n, "HeaderDigest", theirs) == result
        assert n.params.header_digest is (result == "CRC32C")

    def test_rejected_list_keeps_default(self):
        n = neg(DataDigest="CRC32C")
        security_done(n)
        assert answer(n, "DataDigest", "None") == "Reject"
        assert n.params.data_digest is False

    def test_task_reporting(self):
        n = neg()
        security_done(n)
        assert answer(n, "TaskReporting", "FastAbort,RFC3720") == "RFC3720"
        assert n.params.task_reporting == "RFC3720"

    def test_task_reporting_configured(self):
        n = neg(TaskReporting="FastAbort,RFC3720")
        security_done(n)
        assert answer(n, "TaskReporting", "FastAbort,RFC3720") == "FastAbort"

    def test_task_reporting_without_rfc3720_rejected(self):
        n = neg()
        security_done(n)
        assert answer(n, "TaskReporting", "ResponseFence") == "Reject"

    @pytest.mark.parametrize("ours,theirs,result",
                             [("None", "CHAP,None", "None"), ("None", "CHAP", "Reject"),
                              ("CHAP,None", "CHAP,None", "CHAP"), ("CHAP", "None,CHAP", "CHAP"),
                              ("None", "KRB5,SRP,None", "None")])
    def test_auth_method(self, ours, theirs, result):
        n = neg(AuthMethod=ours)
        assert answer(n, "AuthMethod", theirs, "security") == result
        if result != "Reject":
            assert n.params.auth_method == result


class TestBooleans:
    @pytest.mark.parametrize("ours,theirs,result",
                             [("Yes", "Yes", "Yes"), ("Yes", "No", "No"), ("No", "Yes", "No"), ("No", "No", "No")])
    def test_and_immediate_data(self, ours, theirs, result):
        n = Negotiation({**OFFERS, "ImmediateData": ours})
        security_done(n)
        assert answer(n, "ImmediateData", theirs) == result  # optional answers are sent too
        assert n.params.immediate_data is (result == "Yes")

    @pytest.mark.parametrize("ours,theirs,result",
                             [("Yes", "Yes", "Yes"), ("Yes", "No", "Yes"), ("No", "Yes", "Yes"), ("No", "No", "No")])
    def test_or_initial_r2t(self, ours, theirs, result):
        n = neg(InitialR2T=ours)
        security_done(n)
        assert answer(n, "InitialR2T", theirs) == result
        assert n.params.initial_r2t is (result == "Yes")

    @pytest.mark.parametrize("key", ["DataPDUInOrder", "DataSequenceInOrder"])
    def test_or_in_order_keys_stay_yes(self, key):
        n = neg()
        security_done(n)
        assert answer(n, key, "No") == "Yes"

    def test_or_in_order_no_when_we_allow_it(self):
        n = neg(DataPDUInOrder="No")
        security_done(n)
        assert answer(n, "DataPDUInOrder", "No") == "No"
        assert n.params.data_pdu_in_order is False

    @pytest.mark.parametrize("value", ["yes", "YES", "True", "1", "", "Yes,No"])
    def test_bad_boolean_rejected(self, value):
        n = neg()
        security_done(n)
        assert answer(n, "InitialR2T", value) == "Reject"
        assert n.params.initial_r2t is True


class TestNumerical:
    @pytest.mark.parametrize(
        "key,ours,theirs,result",
        [
            ("MaxBurstLength", "1048576", "262144", "262144"),
            ("MaxBurstLength", "1048576", "16776192", "1048576"),
            ("MaxBurstLength", "262144", "0x100000", "262144"),
            ("MaxBurstLength", "1048576", "0x40000", "262144"),  # hex offers
            ("FirstBurstLength", "262144", "65536", "65536"),
            ("MaxConnections", "1", "8", "1"),
            ("MaxConnections", "4", "2", "2"),
            ("ErrorRecoveryLevel", "0", "2", "0"),
            ("ErrorRecoveryLevel", "2", "1", "1"),
            ("MaxOutstandingR2T", "1", "16", "1"),
            ("DefaultTime2Retain", "20", "0", "0"),
            ("DefaultTime2Retain", "20", "3600", "20"),
            ("DefaultTime2Wait", "2", "0", "2"),  # Maximum
            ("DefaultTime2Wait", "2", "10", "10"),
            ("iSCSIProtocolLevel", "1", "2", "1"),
            ("iSCSIProtocolLevel", "1", "0", "0"),
        ],
    )
    def test_result_function(self, key, ours, theirs, result):
        n = neg(**{key: ours})
        security_done(n)
        assert answer(n, key, theirs) == result
        assert getattr(n.params, KEYS[key].attr) == int(result)
        assert n.values[key] == result

    @pytest.mark.parametrize(
        "key,value",
        [
            ("MaxBurstLength", "abc"),
            ("MaxBurstLength", "511"),  # below the §13.13 range
            ("MaxBurstLength", "16777216"),  # above it
            ("MaxBurstLength", ""),
            ("MaxBurstLength", "-1"),
            ("MaxBurstLength", "1,2"),
            ("FirstBurstLength", "100"),
            ("ErrorRecoveryLevel", "3"),
            ("MaxConnections", "0"),
            ("MaxConnections", "65536"),
            ("MaxOutstandingR2T", "0"),
            ("DefaultTime2Wait", "3601"),
            ("DefaultTime2Retain", "1e3"),
            ("iSCSIProtocolLevel", "32"),
            ("MaxBurstLength", "1" * 300),
        ],
    )
    def test_bad_value_rejected_and_default_kept(self, key, value):
        n = neg()
        security_done(n)
        default = getattr(n.params, KEYS[key].attr)
        if len(value) > 255:  # a value this long never gets past the codec
            with pytest.raises(TextFormatError):
                decode_text(f"{key}={value}\0".encode())
            return
        assert answer(n, key, value) == "Reject"
        assert getattr(n.params, KEYS[key].attr) == default
        assert key not in n.values


class TestBurstLengths:
    def test_fbl_capped_by_mbl_result_when_fbl_comes_first(self):
        n = neg(MaxBurstLength="1048576", FirstBurstLength="1048576")
        security_done(n)
        out = n.respond([("FirstBurstLength", "262144"), ("MaxBurstLength", "131072")], "operational")
        assert out == [("FirstBurstLength", "131072"), ("MaxBurstLength", "131072")]  # request order kept
        assert (n.params.first_burst_length, n.params.max_burst_length) == (131072, 131072)

    def test_fbl_capped_by_our_mbl(self):
        n = neg(MaxBurstLength="65536", FirstBurstLength="262144")
        security_done(n)
        out = n.respond([("MaxBurstLength", "262144"), ("FirstBurstLength", "262144")], "operational")
        assert out == [("MaxBurstLength", "65536"), ("FirstBurstLength", "65536")]

    def test_fbl_alone_capped_by_default_mbl(self):
        # The initiator never sends MaxBurstLength: its result is the 262144 default.
        n = neg(MaxBurstLength="1048576", FirstBurstLength="1048576")
        security_done(n)
        assert answer(n, "FirstBurstLength", "524288") == "262144"
        assert n.target_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert n.params.first_burst_length <= n.params.max_burst_length

    def test_later_smaller_mbl_fixes_params(self):
        n = neg(MaxBurstLength="1048576", FirstBurstLength="1048576")
        security_done(n)
        n.respond([("FirstBurstLength", "65536")], "operational")
        n.respond([("MaxBurstLength", "16384")], "operational")
        assert (n.params.first_burst_length, n.params.max_burst_length) == (16384, 16384)

    def test_default_fbl_fixed_when_mbl_small(self):
        n = neg()
        security_done(n)
        n.respond([("MaxBurstLength", "4096")], "operational")
        assert n.params.first_burst_length == 4096


class TestMaxRecvDataSegmentLength:
    def test_declared_value_stored_and_ours_returned(self):
        n = neg()
        security_done(n)
        assert n.respond([("MaxRecvDataSegmentLength", "0x2000")], "operational") == [
            ("MaxRecvDataSegmentLength", "262144")]
        assert n.params.max_recv_data_segment_length == 8192
        assert n.params.target_max_recv_data_segment_length == 262144

    def test_declared_once(self):
        n = neg()
        security_done(n)
        assert n.target_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert n.params.target_max_recv_data_segment_length == 262144
        assert n.respond([("MaxRecvDataSegmentLength", "65536")], "operational") == []
        assert n.params.max_recv_data_segment_length == 65536
        assert n.target_declarations("operational") == []

    def test_default_not_declared(self):
        n = Negotiation({"MaxRecvDataSegmentLength": "8192"})
        security_done(n)
        assert n.target_declarations("operational") == []
        assert n.params.target_max_recv_data_segment_length == 8192

    def test_not_declared_means_default(self):
        n = neg()
        assert n.params.target_max_recv_data_segment_length == 8192  # nothing sent yet

    def test_above_range_clamped(self):
        n = neg()
        security_done(n)
        n.respond([("MaxRecvDataSegmentLength", "16777216")], "operational")
        assert n.params.max_recv_data_segment_length == 2**24 - 1

    @pytest.mark.parametrize("value", ["abc", "511", "0", ""])
    def test_invalid_declaration_ends_login(self, value):
        n = neg()
        security_done(n)
        with expect_error((0x02, 0x00)):
            n.respond([("MaxRecvDataSegmentLength", value)], "operational")


class TestObsoleteAndUnknown:
    @pytest.mark.parametrize("key", ["IFMarker", "OFMarker"])
    @pytest.mark.parametrize("value", ["Yes", "No"])
    def test_markers_answered_no(self, key, value):
        n = neg()
        security_done(n)
        assert answer(n, key, value) == "No"

    def test_marker_bad_boolean_rejected(self):
        n = neg()
        security_done(n)
        assert answer(n, "IFMarker", "maybe") == "Reject"

    @pytest.mark.parametrize("key", ["IFMarkInt", "OFMarkInt"])
    def test_mark_int_rejected(self, key):
        n = neg()
        security_done(n)
        assert answer(n, key, "2048~8192") == "Reject"

    @pytest.mark.parametrize("key", ["X-com.example.Feature", "X#Unregistered", "RDMAExtensions", "FooBar"])
    @pytest.mark.parametrize("stage", ["security", "operational"])
    def test_not_understood(self, key, stage):
        n = neg()
        assert answer(n, key, "Yes", stage) == "NotUnderstood"

    def test_node_architecture_is_a_silent_declaration(self):
        n = neg()
        assert n.respond([("X#NodeArchitecture", "ExampleOS/v1.0,Example Inc.")], "security") == []
        assert n.values["X#NodeArchitecture"] == "ExampleOS/v1.0,Example Inc."

    def test_declarations_not_answered(self):
        n = neg()
        out = n.respond([("InitiatorName", INITIATOR), ("InitiatorAlias", "pc"), ("TargetName", TARGET),
                         ("SessionType", "Normal")], "operational")
        assert out == []


# --------------------------------------------------------------------------
# protocol errors


class TestProtocolErrors:
    def test_duplicate_in_one_pdu(self):
        n = neg()
        security_done(n)
        with expect_error() as info:
            n.respond([("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")], "operational")
        assert info.value.key == "MaxBurstLength"

    def test_duplicate_across_pdus(self):
        n = neg()
        security_done(n)
        n.respond([("ImmediateData", "Yes")], "operational")
        with expect_error():
            n.respond([("ImmediateData", "Yes")], "operational")

    def test_duplicate_across_stages(self):
        n = neg()
        security_done(n)
        with expect_error():
            n.respond([("InitiatorName", INITIATOR + "x")], "operational")

    def test_identity_repeated_unchanged_is_accepted_silently(self):
        # libiscsi repeats InitiatorName/SessionType when it holds CHAP
        # credentials for a target that does not ask for CHAP.
        n = neg()
        security_done(n)
        assert n.respond([("InitiatorName", INITIATOR), ("HeaderDigest", "None")], "operational") == [
            ("HeaderDigest", "None")]

    def test_a_negotiated_key_repeated_is_still_an_error(self):
        n = neg()
        n.respond([("HeaderDigest", "None")], "operational")
        with expect_error():
            n.respond([("HeaderDigest", "None")], "operational")

    def test_duplicate_unknown_key(self):
        n = neg()
        n.respond([("X-foo", "1")], "security")
        with expect_error():
            n.respond([("X-foo", "1")], "security")

    def test_duplicate_after_reject(self):
        n = neg()
        security_done(n)
        assert answer(n, "MaxBurstLength", "1") == "Reject"
        with expect_error():
            n.respond([("MaxBurstLength", "65536")], "operational")

    @pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood"])
    @pytest.mark.parametrize("key", ["MaxBurstLength", "X-foo", "InitiatorAlias"])
    def test_reserved_constant_offered(self, key, value):
        n = neg()
        with expect_error():
            n.respond([(key, value)], "operational")

    @pytest.mark.parametrize("key,value", [("TargetAlias", "x"), ("TargetAddress", "10.0.0.1:3260,1"),
                                           ("TargetPortalGroupTag", "1")])
    def test_target_only_keys(self, key, value):
        n = neg()
        with expect_error():
            n.respond([(key, value)], "security")

    def test_send_targets_during_login(self):
        n = neg()
        with expect_error():
            n.respond([("SendTargets", "All")], "operational")

    @pytest.mark.parametrize("key,value", [("MaxBurstLength", "65536"), ("HeaderDigest", "None"),
                                           ("MaxRecvDataSegmentLength", "8192"), ("IFMarker", "No")])
    def test_operational_key_in_security_stage(self, key, value):
        n = neg()
        with expect_error():
            n.respond([(key, value)], "security")

    def test_security_key_in_operational_stage(self):
        n = neg()
        with expect_error():
            n.respond([("AuthMethod", "None")], "operational")

    @pytest.mark.parametrize("stage", ["security", "operational"])
    def test_any_stage_keys(self, stage):
        n = neg()
        n.respond([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                   ("InitiatorAlias", "a")], stage)
        assert n.missing_required() is None

    def test_chap_keys_without_chap(self):
        n = neg()
        security_done(n)
        with expect_error():
            n.respond([("CHAP_A", "5")], "security")

    def test_chap_keys_collected_for_auth_module(self):
        n = neg(AuthMethod="CHAP,None")
        assert n.respond([("AuthMethod", "CHAP,None")], "security") == [("AuthMethod", "CHAP")]
        assert n.respond([("CHAP_A", "5,7")], "security") == []
        assert n.respond([("CHAP_N", "user"), ("CHAP_R", "0x" + "00" * 16)], "security") == []
        assert n.auth_keys == {"CHAP_A": "5,7", "CHAP_N": "user", "CHAP_R": "0x" + "00" * 16}
        with expect_error():
            n.respond([("CHAP_A", "5")], "security")

    def test_session_type_unsupported(self):
        n = neg()
        with expect_error((0x02, 0x09)):
            n.respond([("SessionType", "Boot")], "security")

    def test_invalid_stage(self):
        with pytest.raises(ValueError):
            neg().respond([], "full-feature")

    def test_stage_codes(self):
        n = neg()
        assert n.respond([("AuthMethod", "None")], 0) == [("AuthMethod", "None")]
        assert n.respond([("MaxBurstLength", "65536")], 1) == [("MaxBurstLength", "65536")]

    def test_error_attributes(self):
        err = NegotiationError(0x02, 0x07, "missing parameter InitiatorName")
        assert (err.status_class, err.status_detail, err.message) == (0x02, 0x07, "missing parameter InitiatorName")
        assert err.status == (0x02, 0x07)
        assert NegotiationError.missing("TargetName").status == (0x02, 0x07)
        assert NegotiationError.protocol("x").status == (0x02, 0x00)
        assert "0x02" in repr(err)


class TestMissingRequired:
    def test_nothing_sent(self):
        assert neg().missing_required() == "InitiatorName"

    def test_target_name_for_normal(self):
        n = neg()
        n.respond([("InitiatorName", INITIATOR)], "security")
        assert n.missing_required() == "TargetName"
        assert n.missing_required("Discovery") is None

    def test_discovery(self):
        n = neg()
        n.respond([("InitiatorName", INITIATOR), ("SessionType", "Discovery")], "security")
        assert n.missing_required() is None

    def test_empty_initiator_name_is_missing(self):
        n = neg()
        n.respond([("InitiatorName", ""), ("TargetName", TARGET)], "security")
        assert n.missing_required() == "InitiatorName"

    def test_session_type_processed_first(self):
        # SessionType after the operational keys in the same PDU still decides the session type.
        n = Negotiation({**OFFERS, "MaxBurstLength": "65536"})
        n.respond([("InitiatorName", INITIATOR), ("MaxBurstLength", "262144"), ("SessionType", "Discovery")],
                  "operational")
        assert n.params.session_type == "Discovery"
        assert ("MaxBurstLength", "65536") not in n.target_declarations("operational")


# --------------------------------------------------------------------------
# leading / non-leading connections


class TestNonLeading:
    def session(self) -> SessionParams:
        n = neg()
        security_done(n)
        n.respond(WINDOWS_OPERATIONAL, "operational")
        return n.params

    def test_lo_keys_irrelevant_and_session_values_kept(self):
        session = self.session()
        n = Negotiation(OFFERS, leading=False, session=session)
        out = n.respond([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                         ("AuthMethod", "None")], "security")
        assert out == [("AuthMethod", "None")]
        out = n.respond([("MaxBurstLength", "65536"), ("InitialR2T", "Yes"), ("HeaderDigest", "CRC32C,None"),
                         ("MaxRecvDataSegmentLength", "131072")], "operational")
        assert out == [("MaxBurstLength", "Irrelevant"), ("InitialR2T", "Irrelevant"), ("HeaderDigest", "CRC32C"),
                       ("MaxRecvDataSegmentLength", "262144")]
        assert n.params.max_burst_length == 262144
        assert n.params.initial_r2t is False
        assert n.params.header_digest is True
        assert n.params.max_recv_data_segment_length == 131072
        assert session.header_digest is False  # the session object is not modified

    def test_connection_values_restart_at_defaults(self):
        session = self.session()
        n = Negotiation(OFFERS, leading=False, session=session)
        assert n.params.max_recv_data_segment_length == 8192
        assert n.params.initiator_name == INITIATOR
        assert n.params.max_burst_length == session.max_burst_length

    def test_session_type_not_changed(self):
        n = Negotiation(OFFERS, leading=False, session=self.session())
        n.respond([("SessionType", "Discovery")], "security")
        assert n.params.session_type == "Normal"

    def test_no_lo_offers(self):
        n = Negotiation({**OFFERS, "MaxBurstLength": "65536"}, leading=False, session=self.session())
        assert n.target_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert not n.pending()


# --------------------------------------------------------------------------
# target declarations and offers


class TestTargetOffers:
    def test_tpgt_and_alias_once(self):
        n = Negotiation({**OFFERS, "TargetPortalGroupTag": "7", "TargetAlias": "quorum disk"})
        assert n.target_declarations("security") == [("TargetPortalGroupTag", "7"), ("TargetAlias", "quorum disk")]
        assert n.target_declarations("security") == []
        assert n.target_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert n.target_declarations("operational") == []

    def test_nothing_needed_for_lead_config(self):
        n = neg()
        security_done(n)
        assert n.target_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert not n.pending()

    def test_min_below_default_offered_and_answered(self):
        n = neg(MaxBurstLength="65536", FirstBurstLength="16384")
        security_done(n)
        out = n.target_declarations("operational")
        assert ("MaxBurstLength", "65536") in out and ("FirstBurstLength", "16384") in out
        assert n.pending()
        assert n.respond([("MaxBurstLength", "65536")], "operational") == []
        assert n.pending()
        assert n.respond([("FirstBurstLength", "8192")], "operational") == []
        assert not n.pending()
        assert (n.params.max_burst_length, n.params.first_burst_length) == (65536, 8192)

    def test_offer_not_repeated_for_key_initiator_sent(self):
        n = neg(MaxBurstLength="65536")
        security_done(n)
        assert answer(n, "MaxBurstLength", "262144") == "65536"
        assert ("MaxBurstLength", "65536") not in n.target_declarations("operational")
        assert not n.pending()

    def test_offer_answer_too_large_is_protocol_error(self):
        n = neg(MaxBurstLength="65536")
        security_done(n)
        n.target_declarations("operational")
        with expect_error():
            n.respond([("MaxBurstLength", "131072")], "operational")

    @pytest.mark.parametrize("reply", ["Reject", "NotUnderstood", "abc"])
    def test_offer_bad_answers(self, reply):
        n = neg(MaxBurstLength="65536")
        security_done(n)
        n.target_declarations("operational")
        with expect_error():
            n.respond([("MaxBurstLength", reply)], "operational")

    def test_offer_answered_irrelevant(self):
        n = neg(MaxBurstLength="65536")
        security_done(n)
        n.target_declarations("operational")
        n.respond([("MaxBurstLength", "Irrelevant")], "operational")
        assert not n.pending()
        assert n.params.max_burst_length == 262144

    def test_answer_then_second_send_is_duplicate(self):
        n = neg(MaxBurstLength="65536")
        security_done(n)
        n.target_declarations("operational")
        n.respond([("MaxBurstLength", "65536")], "operational")
        with expect_error():
            n.respond([("MaxBurstLength", "65536")], "operational")

    def test_max_above_default_offered(self):
        n = neg(DefaultTime2Wait="5")
        security_done(n)
        assert ("DefaultTime2Wait", "5") in n.target_declarations("operational")
        with expect_error():
            n.receive_answers([("DefaultTime2Wait", "3")])

    def test_max_offer_accepted(self):
        n = neg(DefaultTime2Wait="5")
        security_done(n)
        n.target_declarations("operational")
        n.receive_answers([("DefaultTime2Wait", "10")])
        assert n.params.default_time2wait == 10 and not n.pending()

    def test_receive_answers_rejects_non_answers(self):
        n = neg()
        with expect_error():
            n.receive_answers([("MaxBurstLength", "65536")])

    def test_required_digest_offered(self):
        n = neg(HeaderDigest="CRC32C")
        security_done(n)
        assert ("HeaderDigest", "CRC32C") in n.target_declarations("operational")
        assert n.pending()
        n.respond([("HeaderDigest", "CRC32C")], "operational")
        assert n.params.header_digest is True and not n.pending()

    def test_required_digest_answer_not_offered(self):
        n = neg(HeaderDigest="CRC32C")
        security_done(n)
        n.target_declarations("operational")
        with expect_error():
            n.respond([("HeaderDigest", "None")], "operational")

    def test_and_no_offer_needs_no_answer(self):
        n = neg(ImmediateData="No")
        security_done(n)
        assert ("ImmediateData", "No") in n.target_declarations("operational")
        assert not n.pending()
        assert n.params.immediate_data is False
        n.respond([("ImmediateData", "No")], "operational")  # an answer may still come
        assert n.params.immediate_data is False

    def test_and_no_offer_answered_yes_is_error(self):
        n = neg(ImmediateData="No")
        security_done(n)
        n.target_declarations("operational")
        with expect_error():
            n.respond([("ImmediateData", "Yes")], "operational")

    def test_discovery_gets_no_irrelevant_offers(self):
        n = neg(MaxBurstLength="65536", ImmediateData="No", DefaultTime2Wait="5")
        security_done(n, "Discovery")
        out = n.target_declarations("operational")
        assert out == [("MaxRecvDataSegmentLength", "262144"), ("DefaultTime2Wait", "5")]

    def test_security_stage_offers_nothing_operational(self):
        n = neg(MaxBurstLength="65536")
        assert n.target_declarations("security") == []
        assert not n.pending()


class TestConfig:
    @pytest.mark.parametrize(
        "offers",
        [
            {"Bogus": "1"},
            {"MaxBurstLength": "100"},
            {"MaxBurstLength": "big"},
            {"HeaderDigest": "MD5"},
            {"HeaderDigest": ""},
            {"ImmediateData": "yes"},
            {"InitiatorName": "iqn.x"},
            {"SessionType": "Normal"},
            {"TargetPortalGroupTag": "70000"},
        ],
    )
    def test_bad_config(self, offers):
        with pytest.raises(ValueError):
            Negotiation(offers)

    def test_empty_config_uses_rfc_defaults(self):
        n = Negotiation({})
        security_done(n)
        out = dict(n.respond(WINDOWS_OPERATIONAL, "operational"))
        assert out["InitialR2T"] == "Yes" and out["MaxBurstLength"] == "262144"
        assert out["DefaultTime2Wait"] == "2" and out["MaxRecvDataSegmentLength"] == "8192"
        assert n.target_declarations("operational") == []


# --------------------------------------------------------------------------
# fuzz: whatever the initiator sends, only NegotiationError escapes


_fuzz_values = st.one_of(
    st.sampled_from(["Yes", "No", "None", "CRC32C", "None,CRC32C", "0", "1", "2", "512", "65536", "0x10000",
                     "16777215", "16777216", "Normal", "Discovery", "Reject", "Irrelevant", "NotUnderstood", "",
                     "CHAP", "RFC3720", "abc"]),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20),
)
_fuzz_pairs = st.lists(st.tuples(st.sampled_from(sorted(KEYS) + ["X-foo", "Unknown"]), _fuzz_values), max_size=10)


@given(st.lists(st.tuples(st.sampled_from(["security", "operational"]), _fuzz_pairs), max_size=4),
       st.booleans(), st.booleans())
@settings(max_examples=300)
def test_negotiation_fuzz(pdus, leading, declare):
    n = Negotiation({**OFFERS, "MaxBurstLength": "65536"}, leading=leading)
    try:
        for stage, pairs in pdus:
            out = n.respond(pairs, stage)
            assert {k for k, _ in out} <= {k for k, _ in pairs}
            if declare:
                n.target_declarations(stage)
            encode_text(out)  # every answer is encodable
    except NegotiationError as err:
        assert err.status_class == 0x02
    p = n.params
    assert p.first_burst_length <= p.max_burst_length
    assert 512 <= p.max_recv_data_segment_length <= 2**24 - 1
