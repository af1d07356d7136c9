"""Config: CHAP, access lists, LUN masking and connection limits."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pyiscsi_target.config import ConfigError, load_config

SECRET = "s3cret-s3cret"        # 13 bytes
MSECRET = "mutual-secret1"      # 14 bytes


def write(tmp_path: Path, target_extra: str = "", top: str = "", lun_extra: str = "", server: str = "",
          mode: int = 0o600) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(textwrap.dedent(f"""\
        [server]
        listen = ["127.0.0.1:3260"]
        {server}
        {top}
        [[target]]
        iqn = "iqn.2026-11.org.example:disk"
        {target_extra}
          [[target.lun]]
          id = 0
          path = "luns/disk.img"
          size = "1MiB"
          {lun_extra}
        """))
    os.chmod(p, mode)
    return p


def chap(**kw) -> str:
    body = "\n".join(f'{k} = {v!r}'.replace("'", '"') for k, v in kw.items())
    return f"[target.chap]\n{body}\n"


def test_chap_one_way_and_mutual(tmp_path):
    c = load_config(write(tmp_path, top="", target_extra='allow_initiators = ["iqn.1991-05.com.microsoft:*"]\n'
                          'allow_networks = ["10.0.0.0/24", "fd00::/64"]\n' +
                          chap(user="alice", secret=SECRET, mutual_user="tgt", mutual_secret=MSECRET,
                               algorithms=["MD5"])))
    t = c.targets[0]
    assert t.chap.user == "alice" and t.chap.secret == SECRET and t.chap.mutual_secret == MSECRET
    assert t.chap.algorithms == ("MD5",)
    assert t.allow_initiators == ("iqn.1991-05.com.microsoft:*",)
    assert t.allow_networks == ("10.0.0.0/24", "fd00::/64")
    assert SECRET not in repr(c) and MSECRET not in repr(c)
    assert c.warnings == ()


def test_secret_file_and_permissions_warning(tmp_path):
    sf = tmp_path / "chap.secret"
    sf.write_text(SECRET + "\n")
    os.chmod(sf, 0o644)
    c = load_config(write(tmp_path, target_extra=chap(user="alice", secret_file="chap.secret")))
    assert c.targets[0].chap.secret == SECRET
    assert len(c.warnings) == 1 and "chmod 600" in c.warnings[0] and "t.toml:" in c.warnings[0]
    os.chmod(sf, 0o600)
    assert load_config(tmp_path / "t.toml").warnings == ()


def test_readable_config_with_inline_secret_warns(tmp_path):
    c = load_config(write(tmp_path, target_extra=chap(user="alice", secret=SECRET), mode=0o644))
    assert any("readable by group/others" in w for w in c.warnings)
    assert not any(SECRET in w for w in c.warnings)


@pytest.mark.parametrize("secret,warn", [("short", True), ("x" * 12, False), ("x" * 16, False), ("x" * 17, True)])
def test_windows_secret_length_warning(tmp_path, secret, warn):
    c = load_config(write(tmp_path, target_extra=chap(user="alice", secret=secret)))
    assert bool([w for w in c.warnings if "12..16" in w]) is warn
    assert not any(secret in w for w in c.warnings)


@pytest.mark.parametrize("extra,msg", [
    (chap(user="alice", secret=SECRET, mutual_user="t", mutual_secret=SECRET), "must differ"),
    (chap(user="alice"), 'missing "secret"'),
    (chap(secret=SECRET), 'missing required key "user"'),
    (chap(user="alice", secret=SECRET, secret_file="x"), "not both"),
    (chap(user="alice", secret=SECRET, mutual_user="t"), 'missing "mutual_secret"'),
    (chap(user="alice", secret=SECRET, mutual_secret=MSECRET), "needs a mutual_user"),
    (chap(user="alice", secret_file="nope.txt"), "cannot read"),
    (chap(user="alice", secret=""), "1..255 bytes"),
    (chap(user="alice", secret=SECRET, algorithms=["SHA-1"]), "not a CHAP algorithm"),
    (chap(user="alice", secret=SECRET, mutal_user="x"), 'did you mean "mutual_user"'),
    ('allow_networks = ["10.0.0.1/24"]', "not a network"),
    ('allow_initiators = ["IQN.bad name"]', "not a valid iqn name"),
])
def test_errors_name_line_and_key_and_never_echo_secrets(tmp_path, extra, msg):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, target_extra=extra))
    text = str(ei.value)
    assert msg in text, text
    assert "t.toml:" in text
    assert SECRET not in text and MSECRET not in text


def test_discovery_chap_lun_masking_and_limits(tmp_path):
    c = load_config(write(tmp_path, top="[discovery.chap]\nuser = \"disc\"\nsecret = \"discovery-sec1\"\n",
                          lun_extra='initiators = ["iqn.2026-11.org.example:node1"]',
                          server='max_connections_total = 10\nmax_connections_per_address = 2\n'
                                 'login_failure_delay = "500ms"'))
    assert c.discovery_chap.user == "disc"
    assert c.targets[0].luns[0].initiators == ("iqn.2026-11.org.example:node1",)
    s = c.server
    assert (s.max_connections_total, s.max_connections_per_address, s.login_failure_delay) == (10, 2, 0.5)
    with pytest.raises(ConfigError, match="at most 30s"):
        load_config(write(tmp_path, server='login_failure_delay = "1m"'))


def test_check_config_output_holds_no_secret(tmp_path, capsys):
    from pyiscsi_target.cli import main
    p = write(tmp_path, target_extra=chap(user="alice", secret=SECRET, mutual_user="t", mutual_secret=MSECRET))
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and MSECRET not in out.out + out.err
    assert "CHAP" in out.out
