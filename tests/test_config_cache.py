"""[cache] and the per-LUN cache keys: defaults, errors with file:line:key,
journal rules, and assemble putting a CachedBackend (with replay) in place."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyiscsi_target.assemble import build_devices, close_devices
from pyiscsi_target.config import ConfigError, parse_config
from pyiscsi_target.storage.cache import CachedBackend
from pyiscsi_target.storage.file import FileBackend

HEAD = '[[target]]\niqn = "iqn.2026-11.org.example:a"\n'


def lun(extra: str = "", id: int = 0, path: str = "a.img") -> str:
    return f'[[target.lun]]\nid = {id}\npath = "{path}"\nsize = "16MiB"\n{extra}'


def parse(tmp_path: Path, text: str):
    return parse_config(text, "c.toml", base_dir=tmp_path)


def errors(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(tmp_path, text)
    return str(e.value)


def test_defaults_leave_luns_uncached(tmp_path):
    c = parse(tmp_path, HEAD + lun())
    assert c.cache.size == 256 << 20 and c.cache.mode == "none"
    lc = c.targets[0].luns[0]
    assert lc.cache == "none" and lc.journal is None and lc.max_dirty_age == 5.0


def test_cache_section_sets_defaults_and_luns_override(tmp_path):
    c = parse(
        tmp_path,
        '[cache]\nsize = "1GiB"\nmode = "write-back"\nmax_dirty_age = "2s"\ndirty_limit = "64MiB"\n'
        + HEAD
        + lun()
        + lun('cache = "write-through"\n', 1, "b.img")
        + lun('max_dirty_age = "500ms"\ndirty_limit = "8MiB"\n', 2, "c.img"),
    )
    a, b, d = c.targets[0].luns
    assert (a.cache, a.max_dirty_age, a.dirty_limit) == ("write-back", 2.0, 64 << 20)
    assert b.cache == "write-through"
    assert (d.max_dirty_age, d.dirty_limit) == (0.5, 8 << 20)


def test_journal_implies_write_back_and_resolves_its_path(tmp_path):
    c = parse(tmp_path, HEAD + lun('journal = "j/a.journal"\njournal_size = "32MiB"\n'))
    lc = c.targets[0].luns[0]
    assert lc.cache == "write-back" and lc.journal == tmp_path / "j" / "a.journal" and lc.journal_size == 32 << 20


def test_errors_name_line_and_key(tmp_path):
    text = (
        '[cache]\nsize = "1MiB"\nmod = "write-back"\n'  # lines 2, 3
        + HEAD
        + lun('cache = "writeback"\n')  # line 10
        + lun('cache = "write-through"\njournal = "x.journal"\n', 1, "b.img")  # line 15
        + lun('cache = "write-through"\ndirty_limit = "8MiB"\njournal_size = "1MiB"\n', 2, "c.img")  # 21-23
    )
    msg = errors(tmp_path, text)
    assert 'c.toml:2: cache.size: "1MiB" is too small' in msg
    assert 'c.toml:3: cache.mod: unknown key "mod"; did you mean "mode"?' in msg
    assert 'c.toml:10: target[0].lun[0].cache: "writeback" is not a cache mode' in msg and '"write-back"?' in msg
    assert "c.toml:15: target[0].lun[1].cache:" in msg and "cannot have a journal" in msg
    assert 'c.toml:22: target[0].lun[2].dirty_limit: only applies to cache = "write-back"' in msg
    assert "c.toml:23: target[0].lun[2].journal_size:" in msg


def test_journal_cannot_be_an_image_or_shared(tmp_path):
    msg = errors(tmp_path, HEAD + lun('journal = "b.img"\n') + lun("", 1, "b.img"))
    assert "already used" in msg


def test_read_only_lun_with_cache_is_an_error(tmp_path):
    (tmp_path / "r.img").write_bytes(bytes(1 << 20))
    msg = errors(tmp_path, HEAD + '[[target.lun]]\nid = 0\npath = "r.img"\nread_only = true\ncache = "write-back"\n')
    assert "read-only LUN has nothing to write back" in msg


async def test_assemble_wraps_cached_luns_and_shares_one_budget(tmp_path):
    c = parse(
        tmp_path,
        '[server]\nstate_dir = "state"\n[cache]\nsize = "32MiB"\n'
        + HEAD
        + lun('cache = "write-back"\n')
        + lun('journal = "b.journal"\njournal_size = "16MiB"\n', 1, "b.img")
        + lun("", 2, "c.img"),
    )
    devs = await build_devices(c)
    try:
        luns = devs["iqn.2026-11.org.example:a"].luns
        a, b, plain = luns[0].backend, luns[1].backend, luns[2].backend
        assert isinstance(a, CachedBackend) and a.mode == "write-back" and a.write_cache
        assert isinstance(b, CachedBackend) and b.mode == "journal" and not b.write_cache
        assert isinstance(plain, FileBackend)
        assert a.budget is b.budget and a.budget.size == 32 << 20
        await a.write(0, b"\x01" * 4096)
        await b.write(0, b"\x02" * 4096)
    finally:
        await close_devices(devs)
    assert (tmp_path / "a.img").read_bytes()[:4096] == b"\x01" * 4096  # close flushed
    assert (tmp_path / "b.img").read_bytes()[:4096] == b"\x02" * 4096
