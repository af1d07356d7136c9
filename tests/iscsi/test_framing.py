import pytest
from hypothesis import given, settings, strategies as st

from pyiscsi_target.iscsi.framing import HeaderDigestError, PduReader, encode_pdu
from pyiscsi_target.iscsi.pdu import NopOut, PduFormatError, ScsiCommand


def frame(pdu, data=b"", hd=False, dd=False) -> bytes:
    return b"".join(bytes(b) for b in encode_pdu(pdu.encode(len(data)), data, header_digest=hd, data_digest=dd))


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
def test_round_trip_with_digests_fed_one_byte_at_a_time(hd, dd):
    wire = frame(ScsiCommand(itt=7, cdb=b"\x2a" + bytes(15)), b"abcde", hd, dd) + frame(NopOut(itt=8), b"", hd, dd)
    r = PduReader(8192)
    r.header_digest, r.data_digest = hd, dd
    got = []
    for i in range(len(wire)):
        r.feed(wire[i:i + 1])
        while (rec := r.next_pdu()) is not None:
            got.append(rec)
    assert [g.bhs.itt for g in got] == [7, 8]
    assert got[0].data == b"abcde" and got[0].data_digest_ok


def test_corrupt_header_digest_raises():
    wire = bytearray(frame(NopOut(itt=1), b"", hd=True))
    wire[20] ^= 1
    r = PduReader()
    r.header_digest = True
    r.feed(bytes(wire))
    with pytest.raises(HeaderDigestError):
        r.next_pdu()


def test_corrupt_data_digest_is_reported_not_raised():
    wire = bytearray(frame(NopOut(itt=1), b"ping", dd=True))
    wire[49] ^= 0xFF
    r = PduReader()
    r.data_digest = True
    r.feed(bytes(wire))
    rec = r.next_pdu()
    assert rec.bhs.itt == 1 and not rec.data_digest_ok


def test_oversized_segment_is_skipped_without_buffering():
    big = bytes(100_000)
    wire = frame(NopOut(itt=1), big) + frame(NopOut(itt=2))
    r = PduReader(8192)
    got = []
    for i in range(0, len(wire), 4096):
        r.feed(wire[i:i + 4096])
        assert r.buffered <= 8192 + 48
        while (rec := r.next_pdu()) is not None:
            got.append(rec)
    assert [(g.bhs.itt, g.oversized) for g in got] == [(1, True), (2, False)]


def test_unknown_opcode_keeps_framing():
    bad = bytearray(frame(NopOut(itt=1), b"xy"))
    bad[0] = 0x1F
    r = PduReader()
    r.feed(bytes(bad) + frame(NopOut(itt=2)))
    with pytest.raises(PduFormatError) as ei:
        r.next_pdu()
    assert ei.value.raw_bhs[0] == 0x1F
    assert r.next_pdu().bhs.itt == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.booleans(), st.booleans())
def test_random_bytes_never_crash_the_reader(blob, hd, dd):
    r = PduReader(1024)
    r.header_digest, r.data_digest = hd, dd
    r.feed(blob)
    for _ in range(20):
        try:
            if r.next_pdu() is None:
                break
        except PduFormatError:
            continue
