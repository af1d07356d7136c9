"""Config loading: validated dataclasses; every error names file, line and key."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from pyiscsi_target.config import (
    Config,
    ConfigError,
    KeyLocator,
    load_config,
    parse_duration,
    parse_portal,
    parse_size,
    validate_iscsi_name,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
[server]
listen = ["0.0.0.0:3260", "[::]:3260"]
state_dir = "state"

[iscsi]
max_burst_length = "1MiB"
first_burst_length = "256KiB"

[[target]]
iqn = "iqn.2026-11.org.example:quorum"

  [[target.lun]]
  id = 0
  path = "luns/quorum.img"
  size = "1GiB"

[[target]]
iqn = "iqn.2026-11.org.example:data"

  [[target.lun]]
  id = 0
  path = "luns/data.img"
  size = "16GiB"

  [[target.lun]]
  id = 1
  path = "luns/existing.img"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    (tmp_path / "luns").mkdir(exist_ok=True)
    (tmp_path / "luns" / "existing.img").write_bytes(bytes(8192))
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_values(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert isinstance(c, Config)
    assert c.source == tmp_path / "config.toml"
    assert c.server.listen == (("0.0.0.0", 3260), ("::", 3260))
    assert c.server.state_dir == tmp_path / "state"
    assert (c.server.nop_interval, c.server.nop_timeout, c.server.login_timeout) == (10.0, 30.0, 15.0)
    assert c.iscsi.max_burst_length == 1 << 20 and c.iscsi.first_burst_length == 256 << 10
    assert [t.iqn for t in c.targets] == ["iqn.2026-11.org.example:quorum", "iqn.2026-11.org.example:data"]
    q, d = c.targets
    assert q.luns[0].path == tmp_path / "luns" / "quorum.img"
    assert q.luns[0].size == 1 << 30 and q.luns[0].block_size == 512
    assert d.luns[1].path == tmp_path / "luns" / "existing.img" and d.luns[1].size is None
    assert not d.luns[1].is_block_device
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server.max_sessions = 3  # type: ignore[misc]
    assert c.target("iqn.2026-11.org.example:data") is d


def test_relative_paths_follow_the_config_dir_not_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "etc" / "pyiscsi"
    sub.mkdir(parents=True)
    p = write(sub, GOOD)
    monkeypatch.chdir(tmp_path)
    c = load_config(Path("etc/pyiscsi/config.toml"))
    assert c.server.state_dir == sub / "state"
    assert c.targets[0].luns[0].path == sub / "luns" / "quorum.img"
    assert c.source == p


def test_example_config_is_valid():
    c = load_config(REPO / "config" / "example.toml")
    assert [(t.iqn, [(l.id, l.path.name, l.size, l.preallocate) for l in t.luns]) for t in c.targets] == [
        ("iqn.2026-11.org.example:quorum", [(0, "quorum.img", 1 << 30, False)]),
        ("iqn.2026-11.org.example:data", [(0, "data.img", 16 << 30, False)]),
    ]
    assert c.server.listen == (("0.0.0.0", 3260), ("::", 3260))
    assert c.server.state_dir == REPO / "state"
    assert c.targets[0].luns[0].path == REPO / "luns" / "quorum.img"


def test_minimal_config_defaults(tmp_path):
    (tmp_path / "a.img").write_bytes(bytes(512))
    c = load_config(write(tmp_path, '[[target]]\niqn = "iqn.2026-11.org.example:a"\n[[target.lun]]\nid = 0\npath = "a.img"\n'))
    assert c.targets[0].luns[0].size is None
    assert c.server.listen == (("0.0.0.0", 3260),)
    assert c.iscsi.header_digest == ("None", "CRC32C") and c.iscsi.immediate_data is True
    assert c.server.max_sessions == 64


def test_all_options_parse(tmp_path):
    text = GOOD.replace(
        'state_dir = "state"',
        'state_dir = "/var/lib/pyiscsi"\nnop_interval = "500ms"\nnop_timeout = 45\nlogin_timeout = "2m"\nmax_sessions = 8',
    ).replace(
        'first_burst_length = "256KiB"',
        'first_burst_length = 65536\nmax_recv_data_segment_length = "8KiB"\nimmediate_data = false\n'
        'initial_r2t = true\nmax_outstanding_r2t = 4\nheader_digest = "crc32c"\ndata_digest = ["CRC32C", "None"]\n'
        "default_time2wait = 0\ndefault_time2retain = 0\nmax_connections = 2",
    ).replace(
        'size = "1GiB"',
        'size = "1GiB"\nblock_size = 4096\npreallocate = true\nread_only = true\nserial = "Q-0001"\nrotation_rate = 7200',
    ).replace('iqn = "iqn.2026-11.org.example:quorum"', 'iqn = "iqn.2026-11.org.example:quorum"\nalias = "Quorum disk"')
    p = write(tmp_path, text)
    with open(tmp_path / "luns" / "quorum.img", "wb") as f:
        f.truncate(1 << 30)  # read-only: must exist
    c = load_config(p)
    s, i, lun = c.server, c.iscsi, c.targets[0].luns[0]
    assert s.state_dir == Path("/var/lib/pyiscsi")
    assert (s.nop_interval, s.nop_timeout, s.login_timeout, s.max_sessions) == (0.5, 45.0, 120.0, 8)
    assert (i.first_burst_length, i.max_recv_data_segment_length, i.immediate_data, i.initial_r2t) == (65536, 8192, False, True)
    assert (i.max_outstanding_r2t, i.header_digest, i.data_digest) == (4, ("CRC32C",), ("CRC32C", "None"))
    assert (i.default_time2wait, i.default_time2retain, i.max_connections) == (0, 0, 2)
    assert c.targets[0].alias == "Quorum disk"
    assert (lun.block_size, lun.preallocate, lun.read_only, lun.serial, lun.rotation_rate) == (4096, True, True, "Q-0001", 7200)


# (replace this, with that) in GOOD -> (line, key, words in the message)
BAD = {
    "decimal size": (('size = "1GiB"', 'size = "15GB"'), 15, "target[0].lun[0].size", '"15GB" is not a size; use e.g. 15GiB'),
    "size not a multiple": (('size = "16GiB"', "size = 1000"), 23, "target[1].lun[0].size", "multiple of the block size 512"),
    "size junk": (('size = "16GiB"', 'size = "big"'), 23, "target[1].lun[0].size", "not a size"),
    "size zero": (('size = "16GiB"', "size = 0"), 23, "target[1].lun[0].size", "more than 0"),
    "duplicate lun id": (("id = 1", "id = 0"), 26, "target[1].lun[1].id", "LUN 0 is already used by target[1].lun[0]"),
    "lun id range": (("id = 1", "id = 16384"), 26, "target[1].lun[1].id", "out of range 0..16383"),
    "lun id type": (("id = 1", 'id = "1"'), 26, "target[1].lun[1].id", "must be an integer"),
    "unknown key typo": (('path = "luns/existing.img"', 'path = "luns/existing.img"\nread_onyl = true'), 28, "target[1].lun[1].read_onyl", 'did you mean "read_only"'),
    "unknown server key": (('state_dir = "state"', 'state_dir = "state"\nnop_intervall = "5s"'), 4, "server.nop_intervall", 'did you mean "nop_interval"'),
    "unknown top table": (("[iscsi]", "[iscsii]"), 5, "iscsii", 'did you mean "iscsi"'),
    "bad iqn": (('iqn = "iqn.2026-11.org.example:data"', 'iqn = "iqn.2026.org.example:data"'), 18, "target[1].iqn", "not a valid iqn name"),
    "upper-case iqn": (('iqn = "iqn.2026-11.org.example:data"', 'iqn = "iqn.2026-11.org.Example:data"'), 18, "target[1].iqn", "lower case"),
    "iqn bad month": (('iqn = "iqn.2026-11.org.example:data"', 'iqn = "iqn.2026-13.org.example:data"'), 18, "target[1].iqn", "month 13"),
    "iqn no prefix": (('iqn = "iqn.2026-11.org.example:data"', 'iqn = "example:data"'), 18, "target[1].iqn", "must start with iqn., eui. or naa."),
    "duplicate iqn": (('iqn = "iqn.2026-11.org.example:data"', 'iqn = "iqn.2026-11.org.example:quorum"'), 18, "target[1].iqn", "already used by target[0]"),
    "missing iqn": (('iqn = "iqn.2026-11.org.example:data"', 'alias = "x"'), 17, "target[1]", 'missing required key "iqn"'),
    "missing path": (('path = "luns/data.img"', ""), 20, "target[1].lun[0]", 'missing required key "path"'),
    "duplicate path": (('path = "luns/data.img"', 'path = "luns/../luns/quorum.img"'), 22, "target[1].lun[0].path", "already used by target[0].lun[0]"),
    "missing image, no size": (('path = "luns/existing.img"', 'path = "luns/nothere.img"'), 27, "target[1].lun[1].path", "add a size"),
    "no such block device": (('path = "luns/existing.img"', 'path = "/dev/pyiscsi-nope"'), 27, "target[1].lun[1].path", "no such block device"),
    "image is a directory": (('path = "luns/existing.img"', 'path = "luns"'), 27, "target[1].lun[1].path", "neither an image file"),
    "existing image bigger": (('path = "luns/existing.img"', 'path = "luns/existing.img"\nsize = 4096'), 28, "target[1].lun[1].size", "never shrunk"),
    "existing image odd size": (('path = "luns/existing.img"', 'path = "luns/existing.img"\nblock_size = 4096\nsize = "1MiB"\nread_only = true'), 29, "target[1].lun[1].size", "larger than the read-only image"),
    "bad listen port": (('listen = ["0.0.0.0:3260", "[::]:3260"]', 'listen = ["0.0.0.0:99999"]'), 2, "server.listen[0]", "port"),
    "bad listen ipv6": (('listen = ["0.0.0.0:3260", "[::]:3260"]', 'listen = ["0.0.0.0:3260", ":::3260"]'), 2, "server.listen[1]", "in brackets"),
    "bad listen ipv4": (('listen = ["0.0.0.0:3260", "[::]:3260"]', 'listen = ["300.1.1.1:3260"]'), 2, "server.listen[0]", "not an IPv4 address"),
    "duplicate listen": (('listen = ["0.0.0.0:3260", "[::]:3260"]', 'listen = ["0.0.0.0", "0.0.0.0:3260"]'), 2, "server.listen[1]", "listed twice"),
    "listen type": (('listen = ["0.0.0.0:3260", "[::]:3260"]', "listen = 3260"), 2, "server.listen", "list of"),
    "fbl > mbl": (('first_burst_length = "256KiB"', 'first_burst_length = "2MiB"'), 7, "iscsi.first_burst_length", "must not exceed max_burst_length"),
    "segment too big": (('max_burst_length = "1MiB"', 'max_burst_length = "16MiB"'), 6, "iscsi.max_burst_length", "out of range"),
    "bad duration": (('state_dir = "state"', 'state_dir = "state"\nnop_interval = "10 sec"'), 4, "server.nop_interval", "not a duration"),
    "bad bool": (('first_burst_length = "256KiB"', 'first_burst_length = "256KiB"\nimmediate_data = "yes"'), 8, "iscsi.immediate_data", "true or false"),
    "bad digest": (('first_burst_length = "256KiB"', 'first_burst_length = "256KiB"\nheader_digest = ["MD5"]'), 8, "iscsi.header_digest", '"MD5" is not a digest'),
    "bad block size": (('size = "1GiB"', 'size = "1GiB"\nblock_size = 1024'), 16, "target[0].lun[0].block_size", "512 or 4096"),
    "bad serial": (('size = "1GiB"', 'size = "1GiB"\nserial = "has space"'), 16, "target[0].lun[0].serial", "not a serial"),
    "duplicate serial": (('size = "16GiB"', 'size = "16GiB"\nserial = "S1"'), 24, "target[1].lun[0].serial", "already used by target[0].lun[0]"),
    "bad rotation": (('size = "1GiB"', 'size = "1GiB"\nrotation_rate = 5'), 16, "target[0].lun[0].rotation_rate", "rotation rate"),
    "server not a table": (("[server]\n", "server = 1\n[server2]\n"), 1, "server", "must be a table"),
    "syntax error": (("id = 1", "id = = 1"), 26, None, "TOML syntax error"),
    "duplicate key syntax": (('size = "1GiB"', 'size = "1GiB"\nsize = "2GiB"'), 16, None, "TOML syntax error"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_errors_name_file_line_and_key(tmp_path, name):
    (old, new), line, key, words = BAD[name]
    if name == "duplicate serial":  # needs a serial on the other LUN too
        text = GOOD.replace('size = "1GiB"', 'size = "1GiB"\nserial = "S1"', 1)
        text = text.replace(old, new, 1)
        line += 1
    else:
        assert old in GOOD
        text = GOOD.replace(old, new, 1)
    p = write(tmp_path, text, "cluster.toml")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    first = msg.splitlines()[0]
    prefix = f"{p}:{line}: " + (f"{key}: " if key else "")
    assert first.startswith(prefix), (first, prefix)
    assert words in first


def test_all_errors_are_reported_sorted_by_line(tmp_path):
    text = GOOD.replace('size = "1GiB"', 'size = "1GB"').replace("id = 1", "id = -1").replace("[::]:3260", "[::1")
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = [int(m.split(":")[1]) for m in ei.value.errors]
    assert lines == sorted(lines) and len(lines) == 3
    assert str(ei.value) == "\n".join(ei.value.errors)


def test_target_and_lun_must_be_arrays_of_tables(tmp_path):
    p = write(tmp_path, '[server]\n\n[target]\niqn = "iqn.2026-11.org.example:a"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}:3: target: write [[target]]")
    p = write(tmp_path, '[[target]]\niqn = "iqn.2026-11.org.example:a"\n[target.lun]\nid = 0\npath = "a.img"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}:3: target[0].lun: write [[target.lun]]")


def test_no_target_is_an_error(tmp_path):
    p = write(tmp_path, "[server]\n")
    with pytest.raises(ConfigError, match="no target defined"):
        load_config(p)


def test_target_without_lun_is_an_error(tmp_path):
    p = write(tmp_path, '\n[[target]]\niqn = "iqn.2026-11.org.example:a"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}:2: target[0]: has no LUN")


def test_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"[server]\nstate_dir = '\xff'\n")
    with pytest.raises(ConfigError, match=r"bin.toml:2: .*not UTF-8"):
        load_config(p)


def test_syntax_error_at_end_of_document(tmp_path):
    p = write(tmp_path, "[server]\nlisten = ")
    with pytest.raises(ConfigError, match=r"config.toml:2: TOML syntax error"):
        load_config(p)


# --- helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("512", 512), (4096, 4096), ("4KiB", 4096), ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("1TiB", 1 << 40),
     ("16 GiB", 16 << 30), ("1gib", 1 << 30), ("1.5GiB", 3 << 29), ("100B", 100)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, hint", [("15GB", "15GiB"), ("1G", "1GiB"), ("512M", "512MiB"), ("4k", "4KiB"), ("2TB", "2TiB")])
def test_parse_size_rejects_decimal_units_with_hint(text, hint):
    with pytest.raises(ValueError, match=f"use e.g. {hint}"):
        parse_size(text)


@pytest.mark.parametrize("bad", ["", "GiB", "-1", "1XiB", True, 1.5, "1.3B", -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    "text, value", [("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (30, 30.0), (0.25, 0.25), ("0", 0.0), ("1.5s", 1.5)]
)
def test_parse_duration(text, value):
    assert parse_duration(text) == value


@pytest.mark.parametrize("bad", ["", "10 sec", "-1s", -1, True, "s", float("inf")])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    "text, value",
    [("0.0.0.0:3260", ("0.0.0.0", 3260)), ("[::]:3261", ("::", 3261)), ("[::1]", ("::1", 3260)),
     ("192.168.1.5", ("192.168.1.5", 3260)), ("storage-1.example.org:860", ("storage-1.example.org", 860)),
     ("[fe80::1%eth0]:3260", ("fe80::1%eth0", 3260))],
)
def test_parse_portal(text, value):
    assert parse_portal(text) == value


@pytest.mark.parametrize("bad", ["", ":3260", "::1", "[::1", "[nothex]:3260", "[::]3260", "host:0", "host:x", "a b:1", "1.2.3:1"])
def test_parse_portal_rejects(bad):
    with pytest.raises(ValueError):
        parse_portal(bad)


@pytest.mark.parametrize(
    "name",
    ["iqn.2026-11.org.example:quorum", "iqn.2001-04.com.example", "iqn.1992-01.com.example:storage.disk2.sys1.xyz",
     "eui.02004567A425678D", "naa.52004567BA64678D", "naa.62004567BA64678D0123456789ABCDEF"],
)
def test_valid_iscsi_names(name):
    validate_iscsi_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "IQN.2026-11.org.example:a", "iqn.2026-11.org.example:A", "iqn.26-11.org.example", "iqn.2026-00.org.x",
     "iqn.2026-11.:x", "iqn.2026-11.org.example:a b", "eui.0200", "naa.123", "foo.bar", "iqn.2026-11.org." + "a" * 250],
)
def test_invalid_iscsi_names(name):
    with pytest.raises(ValueError):
        validate_iscsi_name(name)


def test_locator_counts_arrays_of_tables_per_parent():
    text = textwrap.dedent(
        """\
        # comment
        [server]
        listen = ["x"]
        [[target]]
        iqn = "a"
        [[target.lun]]
        id = 0
        [[target.lun]]
        id = 1
        [[target]]
        iqn = "b"
        [[target.lun]]
        'id' = 5
        desc = '''
        size = 7
        '''
        size = 9
        """
    )
    loc = KeyLocator(text)
    assert loc.line_of("server.listen") == 3
    assert loc.line_of("server.listen[0]") == 3
    assert loc.line_of("target[0].lun[1].id") == 9
    assert loc.line_of("target[1]") == 10
    assert loc.line_of("target[1].lun[0]") == 12
    assert loc.line_of("target[1].lun[0].id") == 13
    assert loc.line_of("target[1].lun[0].size") == 17  # not the line inside the ''' string
    assert loc.line_of("target[1].lun[0].nothing") == 12
    assert loc.line_of("nowhere") is None


def test_first_burst_default_follows_a_small_max_burst(tmp_path):
    c = load_config(write(tmp_path, GOOD.replace('first_burst_length = "256KiB"\n', "").replace('"1MiB"', '"64KiB"')))
    assert (c.iscsi.max_burst_length, c.iscsi.first_burst_length) == (65536, 65536)
