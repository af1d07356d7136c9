"""[gateway]: this gateway's ALUA port group / TPGT and its peers; errors name file, line and key."""

from __future__ import annotations

import socket
import textwrap

import pytest

from pyiscsi_target.assemble import port_groups
from pyiscsi_target.config import ConfigError, parse_config
from pyiscsi_target.scsi.alua import AccessState

BASE = """\
[server]
listen = ["127.0.0.1:3260", "192.0.2.11:3260"]

[[target]]
iqn = "iqn.2026-11.org.example:data"
  [[target.lun]]
  id = 0
  path = "data.img"
  size = "1MiB"
"""

GATEWAY = """\
[gateway]
name = "gw-a"
port_group = 1
state = "active/optimized"
[[gateway.peer]]
name = "gw-b"
port_group = 2
state = "active/non-optimized"
portals = ["192.0.2.12:3260"]
[[gateway.peer]]
name = "gw-c"
port_group = 7
state = "standby"
"""


def parse(extra: str):
    return parse_config(BASE + textwrap.dedent(extra), "gw.toml")


def errors(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(extra)
    return e.value.errors


def test_default_is_a_single_box():
    gw = parse("").gateway
    assert (gw.port_group, gw.state, gw.peers) == (1, "active/optimized", ())
    assert gw.name == socket.gethostname()
    tpg = port_groups(parse(""))
    assert [(g.id, g.state, g.relative_port_ids) for g in tpg.groups] == [(1, AccessState.ACTIVE_OPTIMIZED, (1,))]


def test_gateway_and_peers():
    c = parse(GATEWAY)
    gw = c.gateway
    assert (gw.name, gw.port_group, gw.state) == ("gw-a", 1, "active/optimized")
    assert [(p.name, p.port_group, p.state, p.portals) for p in gw.peers] == [
        ("gw-b", 2, "active/non-optimized", (("192.0.2.12", 3260),)),
        ("gw-c", 7, "standby", ()),
    ]
    tpg = port_groups(c)
    assert [(g.id, g.state.label, g.relative_port_ids) for g in tpg.groups] == [
        (1, "active/optimized", (1,)), (2, "active/non-optimized", (2,)), (7, "standby", (7,))]
    assert tpg.standby_ports == {7}


def test_line_numbers_and_keys_in_errors():
    text = """\
    [gateway]
    name = "gw-a"
    port_group = 70000
    state = "active"
    colour = "blue"
    [[gateway.peer]]
    name = "gw-a"
    port_group = 1
    state = "offline"
    portals = ["0.0.0.0:3260", "127.0.0.1:3260", "192.0.2.13:99999"]
    [[gateway.peer]]
    port_group = 3
    """
    errs = errors(text)
    first = BASE.count("\n") + 1
    expect = [
        (first + 2, "gateway.port_group: 70000 is out of range 1..65535"),
        (first + 3, 'gateway.state: "active" is not an ALUA state'),
        (first + 4, 'gateway.colour: unknown key "colour"'),
        (first + 6, 'gateway.peer[0].name: "gw-a" is this gateway\'s name'),
        (first + 8, 'gateway.peer[0].state: "offline" is not an ALUA state'),
        (first + 9, 'gateway.peer[0].portals[0]: "0.0.0.0:3260" is a wildcard address'),
        (first + 9, 'gateway.peer[0].portals[1]: "127.0.0.1:3260" is one of this gateway\'s own [server] listen portals'),
        (first + 9, "gateway.peer[0].portals[2]:"),
        (first + 10, 'gateway.peer[1]: missing required key "name"'),
    ]
    for line, msg in expect:
        assert any(e.startswith(f"gw.toml:{line}: {msg}") for e in errs), (line, msg, errs)


def test_duplicate_port_groups_and_names():
    errs = errors("""\
    [gateway]
    name = "gw-a"
    port_group = 5
    [[gateway.peer]]
    name = "gw-b"
    port_group = 5
    [[gateway.peer]]
    name = "gw-c"
    port_group = 6
    portals = ["192.0.2.13:3260"]
    [[gateway.peer]]
    name = "gw-c"
    port_group = 6
    portals = ["192.0.2.13"]
    """)
    text = "\n".join(errs)
    assert "gateway.peer[0].port_group: 5 is already used by this gateway's [gateway] port_group" in text
    assert 'gateway.peer[2].name: "gw-c" is already used by gateway.peer[1]' in text
    assert "gateway.peer[2].port_group: 6 is already used by gateway.peer[1]" in text
    assert 'gateway.peer[2].portals[0]: "192.0.2.13" is already listed by gateway.peer[1]' in text


def test_peer_written_as_a_table_and_bad_portals_type():
    errs = errors("""\
    [gateway]
    [gateway.peer]
    name = "gw-b"
    port_group = 2
    """)
    assert any("write [[gateway.peer]]" in e for e in errs), errs
    errs = errors("""\
    [[gateway.peer]]
    name = "gw-b"
    port_group = 2
    portals = "192.0.2.12:3260"
    """)
    assert any("gateway.peer[0].portals: " in e and "must be a list" in e for e in errs), errs


def test_check_config_and_status_show_the_gateway():
    from pyiscsi_target.admin import _gateway, format_status
    from pyiscsi_target.cli import summarize

    c = parse(GATEWAY)
    text = summarize(c)
    assert "gateway:   gw-a, ALUA port group / TPGT 1 (active/optimized)" in text
    assert "  peer:    gw-b, port group 2 (active/non-optimized): 192.0.2.12:3260" in text
    assert "  peer:    gw-c, port group 7 (standby): no portals advertised" in text
    st = {"version": "x", "pid": 1, "uptime": 1, "config": "gw.toml", "portals": ["127.0.0.1:3260"],
          "gateway": _gateway(c), "throughput": {"read_bps": 0, "read_iops": 0, "write_bps": 0, "write_iops": 0},
          "targets": [], "sessions": []}
    assert ("gateway:    gw-a, port group 1 (active/optimized); peer gw-b: group 2 (active/non-optimized); "
            "peer gw-c: group 7 (standby)") in format_status(st)


def test_reload_of_a_gateway_change_waits_for_a_restart():
    """Port groups are the identity of every path (TPGT, relative port, ALUA
    group): changing them under logged-in sessions would break multipath."""
    import types

    from pyiscsi_target.reload import Reloader

    old, new = parse(GATEWAY), parse(GATEWAY.replace('state = "standby"', 'state = "active/optimized"'))
    plan, errs = Reloader(types.SimpleNamespace(config=old, devices={})).plan(new)
    assert not errs and "[gateway] changed: takes effect at the next restart" in plan.warnings
