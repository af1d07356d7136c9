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


def _read_all_buffered(reader, wire: bytes, chunk: int):
    """Drive the reader like asyncio's BufferedProtocol: it says where bytes go."""
    got, pos = [], 0
    while pos < len(wire):
        mv = reader.get_buffer(-1)
        n = min(len(mv), chunk, len(wire) - pos)
        mv[:n] = wire[pos:pos + n]
        reader.buffer_updated(n)
        pos += n
        while (rec := reader.next_pdu()) is not None:
            got.append(rec)
    return got


@pytest.mark.parametrize("dd", [False, True])
@pytest.mark.parametrize("chunk", [1000, 65536, 300000])
def test_large_segments_are_received_in_place_and_small_ones_around_them(dd, chunk):
    import os
    big = os.urandom(256 * 1024 + 3)
    wire = frame(NopOut(itt=1), b"small", dd=dd) + frame(ScsiCommand(itt=2), big, dd=dd) + frame(NopOut(itt=3), dd=dd)
    r = PduReader(1 << 20)
    r.data_digest = dd
    got = _read_all_buffered(r, wire, chunk)
    assert [g.bhs.itt for g in got] == [1, 2, 3]
    assert bytes(got[0].data) == b"small" and bytes(got[1].data) == big
    assert all(g.data_digest_ok for g in got)


def test_corrupt_digest_on_a_large_in_place_segment_is_reported():
    import os
    big = bytearray(frame(ScsiCommand(itt=2), os.urandom(100000), dd=True))
    big[5000] ^= 1
    r = PduReader(1 << 20)
    r.data_digest = True
    (rec,) = _read_all_buffered(r, bytes(big), 4096)
    assert not rec.data_digest_ok


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 70000), min_size=1, max_size=6), st.integers(1, 90000), st.booleans())
def test_any_chunking_through_either_api_gives_the_same_pdus(sizes, chunk, use_feed):
    segs = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    wire = b"".join(frame(NopOut(itt=i), seg) for i, seg in enumerate(segs))
    r = PduReader(1 << 20)
    if use_feed:
        got = []
        for i in range(0, len(wire), chunk):
            r.feed(wire[i:i + chunk])
            while (rec := r.next_pdu()) is not None:
                got.append(rec)
    else:
        got = _read_all_buffered(r, wire, chunk)
    assert [bytes(g.data) for g in got] == segs


def test_consumed_prefix_is_compacted_on_an_endless_stream():
    r = PduReader(1 << 20)
    one = frame(NopOut(itt=1), b"x" * 1000)
    stream = one * 2000
    for i in range(0, len(stream), 777):      # never ends on a PDU boundary for long
        r.feed(stream[i:i + 777])
        while r.next_pdu() is not None:
            pass
        assert len(r._buf) < 300 * 1024
