"""The fast ``struct`` codec (pdu.py) is identical to the construct grammar (pdu_spec.py).

For every RFC 7143 opcode, hypothesis checks that
(a) random 48-byte buffers decode to the same field values in both,
(b) random field values encode to the same bytes in both,
(c) decode(encode(x)) == x,
and for the AHS (d) round trips and agreement with the AHS grammar, (e) that
``decode_bhs`` raises nothing but ``PduFormatError``, (f) the LUN helpers.

The mapping between the two is explicit: ``FIELDS[op]`` lists, for every
construct field (``"Byte1.R"``), the fast-codec attribute and bit range that
hold it, and ``PROPS[op]`` the convenience properties (``.read`` ...) that must
read the same value.  Both tables are checked to be complete.
"""

from __future__ import annotations

import struct

import construct as c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyiscsi_target.iscsi import pdu
from pyiscsi_target.iscsi import pdu_spec as spec
from pyiscsi_target.iscsi.pdu import Ahs, PduFormatError

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
OPCODES = sorted(spec.SPECS)


# --- explicit field mapping: construct path -> (fast attribute, shift, width) ----

def bit(name: str, shift: int, width: int = 1):
    return (f"Byte1.{name}", "flags", shift, width)


def whole(path: str, attr: str):
    return (path, attr, None, None)


def _head(immediate: bool):
    out = [("Byte0.Opcode", "opbyte", 0, 6)]
    if immediate:
        out.append(("Byte0.I", "opbyte", 6, 1))
    return out


LENGTHS = [("TotalAHSLength", "ahs_dsl", 24, 8), ("DataSegmentLength", "ahs_dsl", 0, 24)]
ISID = [("ISID.T", "isid", 46, 2), ("ISID.A", "isid", 40, 6), ("ISID.B", "isid", 24, 16),
        ("ISID.C", "isid", 16, 8), ("ISID.D", "isid", 0, 16)]
TARGET_SNS = [whole("StatSN", "statsn"), whole("ExpCmdSN", "expcmdsn"),
              whole("MaxCmdSN", "maxcmdsn")]
F = bit("F", 7)

FIELDS: dict[int, list[tuple]] = {
    0x00: _head(True) + [F] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt"), whole("CmdSN", "cmdsn"),
        whole("ExpStatSN", "expstatsn")],
    0x01: _head(True) + [F, bit("R", 6), bit("W", 5), bit("ATTR", 0, 3)] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("ExpectedDataTransferLength", "expected_length"), whole("CmdSN", "cmdsn"),
        whole("ExpStatSN", "expstatsn"), whole("CDB", "cdb")],
    0x02: _head(True) + [F, bit("Function", 0, 7)] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("ReferencedTaskTag", "rtt"), whole("CmdSN", "cmdsn"),
        whole("ExpStatSN", "expstatsn"), whole("RefCmdSN", "refcmdsn"),
        whole("ExpDataSN", "expdatasn")],
    0x03: _head(True) + [bit("T", 7), bit("C", 6), bit("CSG", 2, 2), bit("NSG", 0, 2)] + [
        whole("VersionMax", "version_max"), whole("VersionMin", "version_min")] + LENGTHS
        + ISID + [
        whole("TSIH", "tsih"), whole("InitiatorTaskTag", "itt"), whole("CID", "cid"),
        whole("CmdSN", "cmdsn"), whole("ExpStatSN", "expstatsn")],
    0x04: _head(True) + [F, bit("C", 6)] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt"), whole("CmdSN", "cmdsn"),
        whole("ExpStatSN", "expstatsn")],
    0x05: _head(False) + [F] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt"), whole("ExpStatSN", "expstatsn"),
        whole("DataSN", "datasn"), whole("BufferOffset", "buffer_offset")],
    0x06: _head(True) + [F, bit("ReasonCode", 0, 7)] + LENGTHS + [
        whole("InitiatorTaskTag", "itt"), whole("CID", "cid"), whole("CmdSN", "cmdsn"),
        whole("ExpStatSN", "expstatsn")],
    0x10: _head(False) + [F, bit("Type", 0, 4)] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt"), whole("ExpStatSN", "expstatsn"),
        whole("BegRun", "begrun"), whole("RunLength", "runlength")],
    0x20: _head(False) + [F] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt")] + TARGET_SNS,
    0x21: _head(False) + [F, bit("o", 4), bit("u", 3), bit("O", 2), bit("U", 1)] + [
        whole("Response", "response"), whole("Status", "status")] + LENGTHS + [
        whole("InitiatorTaskTag", "itt"), whole("SNACKTag", "snack_tag")] + TARGET_SNS + [
        whole("ExpDataSN", "expdatasn"),
        whole("BidirectionalReadResidualCount", "bidi_residual"),
        whole("ResidualCount", "residual")],
    0x22: _head(False) + [F, whole("Response", "response")] + LENGTHS + [
        whole("InitiatorTaskTag", "itt")] + TARGET_SNS,
    0x23: _head(False) + [bit("T", 7), bit("C", 6), bit("CSG", 2, 2), bit("NSG", 0, 2)] + [
        whole("VersionMax", "version_max"), whole("VersionActive", "version_active")]
        + LENGTHS + ISID + [
        whole("TSIH", "tsih"), whole("InitiatorTaskTag", "itt")] + TARGET_SNS + [
        whole("StatusClass", "status_class"), whole("StatusDetail", "status_detail")],
    0x24: _head(False) + [F, bit("C", 6)] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt")] + TARGET_SNS,
    0x25: _head(False) + [F, bit("A", 6), bit("O", 2), bit("U", 1), bit("S", 0)] + [
        whole("Status", "status")] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt")] + TARGET_SNS + [
        whole("DataSN", "datasn"), whole("BufferOffset", "buffer_offset"),
        whole("ResidualCount", "residual")],
    0x26: _head(False) + [F, whole("Response", "response")] + LENGTHS + [
        whole("InitiatorTaskTag", "itt")] + TARGET_SNS + [
        whole("Time2Wait", "time2wait"), whole("Time2Retain", "time2retain")],
    0x31: _head(False) + [F] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt"),
        whole("TargetTransferTag", "ttt")] + TARGET_SNS + [
        whole("R2TSN", "r2tsn"), whole("BufferOffset", "buffer_offset"),
        whole("DesiredDataTransferLength", "desired_length")],
    0x32: _head(False) + [F] + LENGTHS + [
        whole("LUN", "lun"), whole("InitiatorTaskTag", "itt")] + TARGET_SNS + [
        whole("AsyncEvent", "async_event"), whole("AsyncVCode", "async_vcode"),
        whole("Parameter1", "parameter1"), whole("Parameter2", "parameter2"),
        whole("Parameter3", "parameter3")],
    0x3F: _head(False) + [F, whole("Reason", "reason")] + LENGTHS + [
        whole("InitiatorTaskTag", "itt")] + TARGET_SNS + [
        whole("DataSNOrR2TSN", "datasn")],
}

# Convenience properties of the fast codec and the construct field each must equal.
_FINAL = [("final", "Byte1.F")]
PROPS: dict[int, list[tuple[str, str]]] = {
    0x00: _FINAL,
    0x01: _FINAL + [("read", "Byte1.R"), ("write", "Byte1.W"), ("attr", "Byte1.ATTR")],
    0x02: _FINAL + [("function", "Byte1.Function")],
    0x03: [("transit", "Byte1.T"), ("cont", "Byte1.C"), ("csg", "Byte1.CSG"),
           ("nsg", "Byte1.NSG")],
    0x04: _FINAL + [("cont", "Byte1.C")],
    0x05: _FINAL,
    0x06: _FINAL + [("reason", "Byte1.ReasonCode")],
    0x10: _FINAL + [("type", "Byte1.Type")],
    0x20: _FINAL, 0x21: _FINAL, 0x22: _FINAL,
    0x23: [("transit", "Byte1.T"), ("csg", "Byte1.CSG"), ("nsg", "Byte1.NSG")],
    0x24: _FINAL, 0x25: _FINAL, 0x26: _FINAL, 0x31: _FINAL, 0x32: _FINAL,
    0x3F: _FINAL + [("reason", "Reason")],
}


def _get(d, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def _set(d: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[leaf] = value


def _plain(obj):
    """A parsed construct Container as plain dicts, without ``_io`` & co."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _attr_int(p, attr: str) -> int:
    v = getattr(p, attr)
    return int.from_bytes(v, "big") if isinstance(v, bytes) else v


def fast_view(p) -> dict:
    """The construct-shaped values a fast-codec PDU holds, through FIELDS."""
    out: dict = {"Byte0": {}, "Byte1": {}}
    for path, attr, shift, width in FIELDS[p.OPCODE]:
        if shift is None:
            value = getattr(p, attr)
        else:
            value = (_attr_int(p, attr) >> shift) & ((1 << width) - 1)
            if width == 1:
                value = bool(value)
        _set(out, path, value)
    return out


def to_fast(op: int, values: dict):
    """Build the fast-codec PDU for construct-shaped ``values``, through FIELDS."""
    cls = pdu.PDU_TYPES[op]
    kw: dict = {"flags": 0}
    for path, attr, shift, width in FIELDS[op]:
        v = _get(values, path)
        if shift is None:
            kw[attr] = v
        else:
            assert 0 <= int(v) < 1 << width
            kw[attr] = kw.get(attr, 0) | (int(v) << shift)
    if "isid" in kw:
        kw["isid"] = kw["isid"].to_bytes(6, "big")
    assert set(kw) == set(cls._names), (cls.__name__, set(cls._names) ^ set(kw))
    return cls(**kw)


# --- hypothesis strategies derived from the construct grammar --------------

def values_of(con):
    """A strategy for every named (non-reserved) field of a construct grammar."""
    if isinstance(con, c.Renamed):
        return values_of(con.subcon)
    if isinstance(con, c.Const):
        return st.just(con.value)
    if isinstance(con, (c.Default, c.Transformed, c.Restreamed)):
        return values_of(con.subcon)
    if isinstance(con, c.Struct):
        return st.fixed_dictionaries({sc.name: values_of(sc) for sc in con.subcons if sc.name})
    if isinstance(con, type(c.Flag)):
        return st.booleans()
    if isinstance(con, c.FormatField):
        return st.integers(0, (1 << (8 * con.length)) - 1)
    if isinstance(con, (c.BytesInteger, c.BitsInteger)):
        bits = con.length * (8 if isinstance(con, c.BytesInteger) else 1)
        return st.integers(0, (1 << bits) - 1)
    if isinstance(con, c.Bytes):
        return st.binary(min_size=con.length, max_size=con.length)
    raise TypeError(f"no strategy for {con!r}")


VALUES = {op: values_of(s) for op, s in spec.SPECS.items()}


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


# --- the tables are complete and consistent --------------------------------

def test_tables_cover_every_opcode_and_field():
    assert set(spec.SPECS) == set(pdu.PDU_TYPES) == {int(o) for o in pdu.Opcode}
    assert set(FIELDS) == set(PROPS) == set(spec.SPECS)
    for op, s in spec.SPECS.items():
        assert s.sizeof() == pdu.BHS_LEN
        parsed = _plain(s.parse(bytes([op]) + bytes(47)))
        assert _leaves(parsed) == {f[0] for f in FIELDS[op]}, hex(op)
        # to_fast asserts every fast dataclass field is mapped
        to_fast(op, parsed)


# --- (a) random buffers decode identically ---------------------------------

def _buffer(op: int):
    return st.tuples(st.integers(0, 3), st.binary(min_size=47, max_size=47),
                     st.binary(max_size=5)).map(
        lambda t: (t[2], bytes([(t[0] << 6) | op]) + t[1]))


def _check_props(p, op: int, parsed: dict) -> None:
    assert p.opcode == op == p.OPCODE
    assert p.data_len == parsed["DataSegmentLength"]
    assert p.total_ahs_len == 4 * parsed["TotalAHSLength"]
    if "I" in parsed["Byte0"]:
        assert p.immediate == parsed["Byte0"]["I"]
    for prop, path in PROPS[op]:
        assert getattr(p, prop) == _get(parsed, path), (hex(op), prop)


@pytest.mark.parametrize("op", OPCODES, ids=hex)
@SETTINGS
@given(data=st.data())
def test_decode_matches_spec(op, data):
    prefix, buf = data.draw(_buffer(op))
    p = pdu.decode_bhs(prefix + buf, len(prefix))
    assert type(p) is pdu.PDU_TYPES[op]
    parsed = _plain(spec.SPECS[op].parse(buf))
    assert fast_view(p) == parsed
    _check_props(p, op, parsed)


# --- (b) random values encode identically, (c) round trip -------------------

@pytest.mark.parametrize("op", OPCODES, ids=hex)
@SETTINGS
@given(data=st.data())
def test_encode_matches_spec_and_round_trips(op, data):
    values = data.draw(VALUES[op])
    p = to_fast(op, values)
    raw = p.encode()
    assert raw == spec.SPECS[op].build(values)
    assert len(raw) == pdu.BHS_LEN
    # (c) both directions of both codecs
    assert pdu.decode_bhs(raw) == p
    assert type(p).decode(raw) == p
    assert fast_view(p) == values
    assert _plain(spec.SPECS[op].parse(raw)) == values
    _check_props(p, op, values)


@pytest.mark.parametrize("op", OPCODES, ids=hex)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_encode_data_len_override(op, data):
    """``encode(data_len, ahs_len)`` writes TotalAHSLength/DataSegmentLength like the spec."""
    values = data.draw(VALUES[op])
    dlen = data.draw(st.integers(0, (1 << 24) - 1))
    words = data.draw(st.integers(0, 255))
    raw = to_fast(op, values).encode(data_len=dlen, ahs_len=4 * words)
    values.update(TotalAHSLength=words, DataSegmentLength=dlen)
    assert raw == spec.SPECS[op].build(values)


def test_defaults_are_what_the_rfc_draws():
    """Default-constructed fast PDUs: F=1 where drawn as 1, ITT 0xffffffff where drawn so."""
    for op, cls in pdu.PDU_TYPES.items():
        parsed = _plain(spec.SPECS[op].parse(cls().encode()))
        if op in (0x20, 0x32, 0x3F):
            assert parsed["InitiatorTaskTag"] == pdu.ALL_ONES
        if op == 0x03:
            assert parsed["Byte0"]["I"]
    # spec defaults: building with no flags gives F=1 (and I=1 where the PDU has I)
    built = spec.SPECS[0x32].build({k: 0 for k in (
        "TotalAHSLength", "DataSegmentLength", "LUN", "StatSN", "ExpCmdSN", "MaxCmdSN",
        "AsyncEvent", "AsyncVCode", "Parameter1", "Parameter2", "Parameter3")})
    assert built == pdu.AsyncMessage(itt=pdu.ALL_ONES).encode()


# --- (e) decode_bhs: a PDU or PduFormatError, nothing else -------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=48, max_size=48))
def test_decode_bhs_total(buf):
    op = buf[0] & 0x3F
    try:
        p = pdu.decode_bhs(buf)
    except PduFormatError as e:
        assert op not in spec.SPECS
        assert e.reason == pdu.RejectReason.COMMAND_NOT_SUPPORTED
    else:
        assert op in spec.SPECS and type(p) is pdu.PDU_TYPES[op]
        assert fast_view(p) == _plain(spec.SPECS[op].parse(buf))


def test_decode_bhs_unknown_opcodes():
    for op in range(64):
        buf = bytes([op]) + bytes(47)
        if op in spec.SPECS:
            assert pdu.decode_bhs(buf).opcode == op
        else:
            with pytest.raises(PduFormatError):
                pdu.decode_bhs(buf)
            with pytest.raises(c.ConstructError):
                spec.PDU.parse(buf)


# --- (d) AHS (§11.2.2) ------------------------------------------------------

ahs_item = st.one_of(
    st.builds(Ahs, st.just(spec.AHS_CODE_EXTENDED_CDB), st.binary(max_size=64)),
    st.builds(Ahs, st.just(spec.AHS_CODE_BIDI_READ_LENGTH), st.binary(min_size=4, max_size=4)),
    st.builds(Ahs, st.integers(0, 63), st.binary(max_size=40)),
)
ahs_lists = st.lists(ahs_item, max_size=5)


def _spec_ahs(items: list[Ahs]) -> list[dict]:
    """The generic-AHS construct values for fast Ahs items (byte 3 reserved = 0)."""
    return [{"AHSLength": len(a.body) + 1, "AHSType": {"AHSCode": a.type},
             "AHSSpecific": b"\0" + a.body} for a in items]


def _typed(a: Ahs) -> dict:
    if a.type == spec.AHS_CODE_EXTENDED_CDB:
        return {"AHSLength": len(a.body) + 1, "AHSType": {"AHSCode": 1}, "ExtendedCDB": a.body}
    return {"AHSLength": 5, "AHSType": {"AHSCode": 2},
            "BidirectionalReadExpectedDataTransferLength": int.from_bytes(a.body, "big")}


@settings(max_examples=300, deadline=None)
@given(ahs_lists)
def test_ahs_round_trip_and_spec(items):
    raw = pdu.encode_ahs(items)
    assert len(raw) % 4 == 0
    assert pdu.decode_ahs(raw) == items
    assert _plain(spec.AHS_AREA.parse(raw)) == _spec_ahs(items)
    assert spec.AHS_AREA.build(_spec_ahs(items)) == raw
    for a in items:
        typed = spec.AHS_TYPES.get(a.type)
        if typed is None or (a.type == 2 and len(a.body) != 4):
            continue
        one = pdu.encode_ahs([a])
        assert typed.build(_typed(a)) == one
        assert _plain(typed.parse(one)) == _typed(a)


def _garbage_area():
    seg = st.tuples(st.integers(0, 40), st.integers(0, 255), st.binary(max_size=48)).map(
        lambda t: struct.pack(">HB", t[0], t[1]) + t[2])
    return st.lists(seg, max_size=4).map(b"".join)


def _decode_or_error(raw):
    try:
        return pdu.decode_ahs(raw)
    except PduFormatError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.one_of(_garbage_area(), st.binary(max_size=64)))
def test_ahs_garbage_only_pdu_format_error(raw):
    # any length: a list or PduFormatError, nothing else
    _decode_or_error(raw)
    _decode_or_error(memoryview(raw))
    # a real AHS area is TotalAHSLength 4-byte words: there, fast == spec exactly
    area = raw[: len(raw) - len(raw) % 4]
    fast = _decode_or_error(area)
    try:
        parsed = _plain(spec.AHS_AREA.parse(area))
    except c.ConstructError:
        assert fast is None
    else:
        assert fast is not None
        assert [(a.type, a.body) for a in fast] == [
            (x["AHSType"]["AHSCode"], x["AHSSpecific"][1:]) for x in parsed]


@settings(max_examples=300, deadline=None)
@given(st.lists(ahs_item, min_size=1, max_size=4), st.data())
def test_ahs_truncated(items, data):
    raw = pdu.encode_ahs(items)
    bounds, pos = {0}, 0
    for a in items:
        pos += 3 + len(a.body) + 1
        pos += -pos % 4
        bounds.add(pos)
    cut = data.draw(st.integers(0, len(raw) - 1))
    if cut % 4 == 0 and cut not in bounds:
        # inside an AHS: both codecs refuse it
        with pytest.raises(PduFormatError):
            pdu.decode_ahs(raw[:cut])
        with pytest.raises(c.ConstructError):
            spec.AHS_AREA.parse(raw[:cut])
    else:
        _decode_or_error(raw[:cut])


def test_ahs_reserved_type_bits_ignored():
    raw = pdu.encode_ahs([Ahs(1, b"abc")])
    raw = raw[:2] + bytes([0xC0 | raw[2]]) + raw[3:]
    assert pdu.decode_ahs(raw) == [Ahs(1, b"abc")]
    assert spec.AHS_AREA.parse(raw)[0].AHSType.AHSCode == 1


# --- a whole PDU through the full grammar (§11.2) --------------------------

@pytest.mark.parametrize("op", OPCODES, ids=hex)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_full_pdu(op, data):
    values = data.draw(VALUES[op])
    items = data.draw(ahs_lists)
    payload = data.draw(st.binary(max_size=40))
    hd, dd = data.draw(st.booleans()), data.draw(st.booleans())
    hdig, ddig = data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 2**32 - 1))
    ahs = pdu.encode_ahs(items)
    values.update(TotalAHSLength=len(ahs) // 4, DataSegmentLength=len(payload))
    raw = to_fast(op, values).encode() + ahs
    if hd:
        raw += struct.pack(">I", hdig)
    raw += payload + bytes(-len(payload) % 4)
    if dd and payload:
        raw += struct.pack(">I", ddig)

    parsed = _plain(spec.PDU.parse(raw, header_digest=hd, data_digest=dd))
    assert parsed["BHS"] == values
    assert parsed["AHS"] == _spec_ahs(items)
    assert parsed["DataSegment"] == payload
    assert parsed["HeaderDigest"] == (hdig if hd else None)
    assert parsed["DataDigest"] == (ddig if dd and payload else None)
    assert spec.PDU.build(dict(parsed, Opcode=raw[0]),
                          header_digest=hd, data_digest=dd) == raw

    p = pdu.decode_bhs(raw)
    assert pdu.decode_ahs(raw[48:48 + p.total_ahs_len]) == items
    start = 48 + p.total_ahs_len + 4 * hd
    assert raw[start:start + p.data_len] == payload


# --- (f) LUN helpers (SAM-5 §4.7) -------------------------------------------

def test_lun_round_trip_all_single_level():
    for lun in range(16384):
        field = pdu.int_to_lun(lun)
        assert pdu.lun_to_int(field) == lun
        assert field & ((1 << 48) - 1) == 0 and field < 1 << 64
        method = field >> 62
        assert method == (0 if lun < 256 else 1)     # peripheral, then flat space


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 16383), st.integers(0, (1 << 48) - 1))
def test_lun_in_command(lun, low):
    # the LUN survives the SCSI Command BHS; lower levels are ignored
    cmd = pdu.ScsiCommand(lun=pdu.int_to_lun(lun))
    assert pdu.lun_to_int(pdu.decode_bhs(cmd.encode()).lun) == lun
    assert pdu.lun_to_int(pdu.int_to_lun(lun) | low) == lun
    assert spec.SCSI_COMMAND.parse(cmd.encode()).LUN == pdu.int_to_lun(lun)
