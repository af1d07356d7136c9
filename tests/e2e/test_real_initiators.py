"""The real server process against real initiators: libiscsi's tools and QEMU.

Every command here is what a user would type; the assertions check what they
print or what they wrote.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess

import pytest

from tests.conftest import require
from tests.support.target import DATA, QUORUM, free_port, start_target, write_config

MiB = 1024 * 1024


def run(*argv, timeout=120, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def test_iscsi_ls_lists_both_targets_with_luns_and_sizes(target):
    require("iscsi-ls")
    out = run("iscsi-ls", "-s", f"iscsi://{target.portal}").stdout
    assert f"Target:{QUORUM} Portal:{target.host}:{target.port},1" in out
    assert f"Target:{DATA} Portal:{target.host}:{target.port},1" in out
    # quorum 64 MiB, data LUN 0 128 MiB (512-byte blocks), LUN 1 64 MiB of 4 KiB blocks.
    # iscsi-ls multiplies the *last* LBA by the block size, so it prints one block
    # less, rounded down to 63M/127M (READ CAPACITY itself is checked below).
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:63M\)", out), out
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:127M\)", out), out
    assert re.search(r"Lun:1\s+Type:DIRECT_ACCESS \(Size:63M\)", out), out
    assert out.count("Lun:1") == 1, out


def test_iscsi_inq_standard_and_every_vpd_page(target):
    require("iscsi-inq")
    url = target.url(DATA, 0)
    std = run("iscsi-inq", url).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in std or "Device Type:DIRECT_ACCESS" in std, std
    assert "Version:6" in std and "Version Descriptor:0460 SPC-4" in std, std   # 6 = SPC-4
    assert "CmdQue:1" in std and "Removable:0" in std, std
    assert "PYISCSI" in std, std
    pages = run("iscsi-inq", "-e", "1", "-c", "0", url).stdout
    listed = [int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", pages)]
    for page in (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2):
        assert page in listed, pages
    serial = run("iscsi-inq", "-e", "1", "-c", "128", url).stdout
    assert re.search(r"Unit Serial Number:\s*\S+", serial), serial
    ident = run("iscsi-inq", "-e", "1", "-c", "131", url).stdout
    # (iscsi-inq takes the page code in decimal)
    assert "Designator Type:(3) NAA" in ident and "Association:(0) LOGICAL_UNIT" in ident, ident
    assert f"Designator:[{DATA},t,0x0001]" in ident, ident
    for page in (0xB0, 0xB1, 0xB2):
        out = run("iscsi-inq", "-e", "1", "-c", str(page), url)
        assert out.stdout.strip(), (page, out.stderr)


def test_identity_is_stable_across_restart_and_distinct_per_lun(tmp_path):
    require("iscsi-inq")
    port = free_port()
    cfg = write_config(tmp_path, port)
    urls = [f"iscsi://127.0.0.1:{port}/{DATA}/0", f"iscsi://127.0.0.1:{port}/{DATA}/1",
            f"iscsi://127.0.0.1:{port}/{QUORUM}/0"]
    seen = []
    for _ in range(2):
        t = start_target(cfg, "127.0.0.1", port)
        try:
            seen.append([run("iscsi-inq", "-e", "1", "-c", "131", u).stdout + run("iscsi-inq", "-e", "1", "-c", "128", u).stdout
                         for u in urls])
        finally:
            assert t.stop() == 0
    assert seen[0] == seen[1]
    assert len(set(seen[0])) == 3


def test_readcapacity16_reports_blocks_and_thin_provisioning(target):
    require("iscsi-readcapacity16")
    out = run("iscsi-readcapacity16", target.url(DATA, 0)).stdout
    assert "RETURNED LOGICAL BLOCK ADDRESS:262143" in out, out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out, out
    assert "LBPME:1 LBPRZ:1" in out, out              # sparse image: thin
    assert "Total size:134217728" in out, out
    out4k = run("iscsi-readcapacity16", target.url(DATA, 1)).stdout
    assert "RETURNED LOGICAL BLOCK ADDRESS:16383" in out4k, out4k
    assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in out4k, out4k


def _random_image(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _qemu_iscsi(target, iqn, lun, *, initiator="iqn.2026-11.test:qemu", digest="none"):
    return (f"driver=iscsi,transport=tcp,portal={target.portal},target={iqn},lun={lun},"
            f"initiator-name={initiator},header-digest={digest}")


@pytest.mark.parametrize("digest", ["none", "crc32c"])
def test_qemu_img_writes_64mib_and_reads_it_back_equal(target, tmp_path, digest):
    require("qemu-img")
    src = tmp_path / "src.raw"
    _random_image(src, 64 * MiB)
    dst = _qemu_iscsi(target, DATA, 0, digest=digest)
    run("qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src), dst, timeout=300)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", "--image-opts", dst, str(back), timeout=300)
    with open(back, "rb") as f:
        assert f.read(64 * MiB) == src.read_bytes()
    # qemu-img compare over iSCSI: the LUN is 128 MiB; its unwritten tail must read as zeros.
    r = run("qemu-img", "compare", "--image-opts", f"driver=file,filename={src}", dst, check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_data_survives_a_server_restart(tmp_path):
    require("qemu-img")
    port = free_port()
    cfg = write_config(tmp_path, port)
    src = tmp_path / "src.raw"
    _random_image(src, 64 * MiB)
    t = start_target(cfg, "127.0.0.1", port)
    try:
        run("qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", str(src),
            _qemu_iscsi(t, QUORUM, 0), timeout=300)
    finally:
        assert t.stop() == 0
    t = start_target(cfg, "127.0.0.1", port)
    try:
        r = run("qemu-img", "compare", "--image-opts", f"driver=file,filename={src}", _qemu_iscsi(t, QUORUM, 0),
                check=False, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Images are identical" in r.stdout
    finally:
        assert t.stop() == 0
