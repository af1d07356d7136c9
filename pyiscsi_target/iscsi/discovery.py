"""SendTargets (RFC 7143 §6.4 / appendix C).

TargetAddress is the address the initiator actually reached us on, first, then
any other configured specific portals — never a wildcard (0.0.0.0/::), which an
initiator cannot connect to (Windows reference §3; LIO does the same) — then
the portals of the other gateways exporting the same targets, each with its
own TPGT (RFC 7143 §4.4.1: one target portal group per gateway, since a
session cannot span gateways), so an initiator discovers every path at once.
"""

from __future__ import annotations

import ipaddress

from .session import PortalContext


def format_address(host: str, port: int, tpgt: int) -> str:
    h = host.split("%", 1)[0] if ":" in host else host
    if ":" in h:
        h = f"[{h}]"
    return f"{h}:{port},{tpgt}"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


def _normalize(host: str) -> str:
    # An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return host


def target_addresses(ctx: PortalContext, local: tuple[str, int]) -> list[str]:
    seen, out = set(), []
    for host, port in [(_normalize(local[0]), local[1])] + list(ctx.portals):
        if _is_wildcard(host):
            continue
        a = format_address(host, port, ctx.tpgt)
        if a not in seen:
            seen.add(a)
            out.append(a)
    for host, port, tpgt in ctx.peer_portals:
        a = format_address(host, port, tpgt)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def may_reach(ctx: PortalContext, name: str, initiator: str | None, peer: str | None) -> bool:
    """Whether the target's ACL lets this initiator (name, source address) log in."""
    t = ctx.targets.get(name)
    acl = getattr(t, "acl", None)
    if acl is None or peer is None:
        return t is not None
    return acl.allows(initiator, _normalize(peer))


def send_targets(ctx: PortalContext, value: str, local: tuple[str, int],
                 *, only: str | None = None, initiator: str | None = None,
                 peer: str | None = None) -> list[tuple[str, str]]:
    """Answer ``SendTargets=<value>``.

    ``All`` lists every target (discovery sessions only; §C); an iSCSI name
    lists that one target; the empty value in a normal session means the
    session's own target (``only``).  With ``peer`` (the initiator's address)
    given, a target whose ACL refuses ``initiator`` from there is left out,
    as if it did not exist.
    """
    if value == "All":
        names = sorted(ctx.targets)
    elif value == "":
        names = [only] if only else []
    else:
        names = [value] if value in ctx.targets else []
    if peer is not None:
        names = [n for n in names if may_reach(ctx, n, initiator, peer)]
    addrs = target_addresses(ctx, local)
    out: list[tuple[str, str]] = []
    for name in names:
        out.append(("TargetName", name))
        for a in addrs:
            out.append(("TargetAddress", a))
    return out
