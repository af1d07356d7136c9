"""Config of RBD LUNs: path = "rbd:pool/image" and [ceph]."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyiscsi_target.config import ConfigError, parse_config

HEAD = """
[server]
listen = ["127.0.0.1:3260"]
[ceph]
conf = "{conf}"
client = "client.iscsi"
[[target]]
iqn = "iqn.2026-11.org.example:rbd"
"""


def _cfg(tmp_path: Path, luns: str, head: str = HEAD, cache: str = ""):
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    return parse_config(cache + head.format(conf=conf) + luns, source="t.toml", base_dir=tmp_path)


def test_rbd_lun_parsed(tmp_path):
    c = _cfg(tmp_path, '[[target.lun]]\nid = 0\npath = "rbd:rbd/disk1"\n'
                       '[[target.lun]]\nid = 1\npath = "rbd:other/disk2"\nsize = "1GiB"\nblock_size = 4096\n',
             cache='[cache]\nmode = "write-back"\n')
    l0, l1 = c.targets[0].luns
    assert l0.is_rbd and str(l0.path) == "rbd:rbd/disk1" and l0.size is None
    assert l0.cache == "none"  # the [cache] default does not apply to shared images
    assert l1.size == 1 << 30 and l1.block_size == 4096 and l1.is_rbd
    assert c.ceph.client == "iscsi" and c.ceph.conf == tmp_path / "ceph.conf" and c.ceph.keyring is None


def test_ceph_defaults(tmp_path):
    c = parse_config('[[target]]\niqn = "iqn.2026-11.org.example:f"\n[[target.lun]]\nid = 0\npath = "a.img"\n'
                     'size = "1MiB"\n', source="t.toml", base_dir=tmp_path)
    assert str(c.ceph.conf) == "/etc/ceph/ceph.conf" and c.ceph.client == "admin"
    assert not c.targets[0].luns[0].is_rbd


@pytest.mark.parametrize("lun, key, words", [
    ('path = "rbd:rbd/x"\ncache = "write-back"', "lun[0].cache", "stale data"),
    ('path = "rbd:rbd/x"\ncache = "write-through"', "lun[0].cache", "stale data"),
    ('path = "rbd:rbd/x"\njournal = "j.journal"', "lun[0].journal", "no cache or journal"),
    ('path = "rbd:rbd/x"\npreallocate = true', "lun[0].preallocate", "thin"),
    ('path = "rbd:rbd/x@snap"', "lun[0].path", "snapshots"),
    ('path = "rbd:pool"', "lun[0].path", "rbd:pool/image"),
    ('path = "rbd:p/ns/x"', "lun[0].path", "namespaces"),
    ('path = "rbd:rbd/x"\nsize = "1000"', "lun[0].size", "multiple of the block size"),
])
def test_rbd_lun_errors_name_line_and_key(tmp_path, lun, key, words):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, f"[[target.lun]]\nid = 0\n{lun}\n")
    msg = str(e.value)
    assert f"target[0].{key}:" in msg and words in msg, msg
    assert msg.startswith("t.toml:1"), msg  # file:line


def test_missing_ceph_conf_and_keyring(tmp_path):
    text = ('[ceph]\nconf = "nope.conf"\nkeyring = "nope.keyring"\n[[target]]\niqn = "iqn.2026-11.org.example:r"\n'
            '[[target.lun]]\nid = 0\npath = "rbd:rbd/x"\n')
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="t.toml", base_dir=tmp_path)
    msg = str(e.value)
    assert "t.toml:2: ceph.conf:" in msg and "does not exist" in msg, msg
    assert "t.toml:3: ceph.keyring:" in msg, msg
    # Without an RBD LUN nothing is checked: [ceph] may be prepared in advance.
    parse_config(text.replace('path = "rbd:rbd/x"', 'path = "x.img"\nsize = "1MiB"'), source="t.toml",
                 base_dir=tmp_path)


def test_same_image_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="already used"):
        _cfg(tmp_path, '[[target.lun]]\nid = 0\npath = "rbd:rbd/x"\n[[target.lun]]\nid = 1\npath = "rbd:rbd/x"\n')


def test_ceph_op_timeout(tmp_path):
    lun = '[[target.lun]]\nid = 0\npath = "rbd:rbd/disk1"\n'
    assert _cfg(tmp_path, lun).ceph.op_timeout == 30.0
    head = HEAD.replace('client = "client.iscsi"', 'client = "client.iscsi"\nop_timeout = "5s"')
    assert _cfg(tmp_path, lun, head=head).ceph.op_timeout == 5.0
    bad = HEAD.replace('client = "client.iscsi"', 'client = "client.iscsi"\nop_timeout = "soon"')
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, lun, head=bad)
    assert "t.toml:7: ceph.op_timeout:" in str(e.value), str(e.value)
