"""Config files for gateways: one `serve` process of several exporting the
same LUs (tests/e2e/test_alua.py, tests/ceph/*, benchmarks/rbd.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gateway:
    """One gateway as the others see it: [gateway] / [[gateway.peer]]."""

    name: str
    port_group: int
    port: int  # its loopback portal, 127.0.0.1:port
    state: str = "active/optimized"


def rbd_lun(ceph, image: str, lun: int = 0, extra: str = "") -> str:
    """A [[target.lun]] on an RBD image of the test cluster."""
    return f"""
  [[target.lun]]
  id = {lun}
  path = "rbd:{ceph.pool}/{image}"
{extra}"""


def write_gateway_config(d: Path, iqn: str, luns: str, *, me: Gateway | None = None, port: int | None = None,
                         peers: tuple[Gateway, ...] = (), ceph=None, server_extra: str = "",
                         name: str = "gateway.toml") -> Path:
    """``d/name``: a server on 127.0.0.1 with one target ``iqn`` holding
    ``luns`` (TOML [[target.lun]] tables), the [ceph] table of the test
    cluster ``ceph`` if given, and [gateway] with ``peers`` if ``me`` is."""
    port = me.port if me is not None else port
    assert port is not None
    text = f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
{server_extra}
"""
    if ceph is not None:
        text += f"""
[ceph]
conf = "{ceph.conf}"
client = "{ceph.client}"
keyring = "{ceph.keyring}"
"""
    if me is not None:
        text += f"""
[gateway]
name = "{me.name}"
port_group = {me.port_group}
state = "{me.state}"
"""
        for p in peers:
            text += f"""
  [[gateway.peer]]
  name = "{p.name}"
  port_group = {p.port_group}
  state = "{p.state}"
  portals = ["127.0.0.1:{p.port}"]
"""
    text += f"""
[[target]]
iqn = "{iqn}"
{luns}
"""
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / name
    cfg.write_text(text)
    return cfg
