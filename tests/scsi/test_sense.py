from pyiscsi_target.scsi.sense import Reason, ScsiError, SenseKey, build_sense, parse_sense


def test_fixed_format_layout():
    s = build_sense(Reason.LBA_OUT_OF_RANGE)
    assert len(s) == 18
    assert s[0] == 0x70  # current error, fixed format, VALID=0
    assert s[7] == 10  # additional sense length
    assert parse_sense(s) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    assert s[15:18] == b"\0\0\0"  # no sense-key specific data


def test_field_pointer_in_cdb_with_bit():
    s = build_sense(Reason.INVALID_FIELD_IN_CDB, field_pointer=2, bit=5)
    assert s[15] == 0x80 | 0x40 | 0x08 | 5  # SKSV, C/D=1, BPV, bit 5
    assert s[16:18] == b"\x00\x02"


def test_field_pointer_in_parameter_list_without_bit():
    s = build_sense(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=0x123, in_cdb=False)
    assert s[15] == 0x80
    assert s[16:18] == b"\x01\x23"


def test_information_sets_valid():
    s = build_sense(Reason.MISCOMPARE_DURING_VERIFY, information=513)
    assert s[0] == 0xF0
    assert s[3:7] == (513).to_bytes(4, "big")
    assert parse_sense(s) == (SenseKey.MISCOMPARE, 0x1D, 0x00)


def test_information_too_large_leaves_valid_clear():
    s = build_sense(Reason.UNRECOVERED_READ_ERROR, information=1 << 40)
    assert s[0] == 0x70 and s[3:7] == bytes(4)


def test_scsi_error_carries_sense():
    err = ScsiError(Reason.WRITE_PROTECTED)
    assert parse_sense(err.sense) == (SenseKey.DATA_PROTECT, 0x27, 0x00)


def test_reason_values_unique():
    # An Enum with duplicate values would silently alias two reasons.
    assert len({r.value for r in Reason}) == len(Reason)
