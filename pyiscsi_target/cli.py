"""The ``pyiscsi-target`` command (also ``python -m pyiscsi_target``).

Exit status: 0 success, 1 runtime failure, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, format_size, load_config, parse_size

__all__ = ["main", "build_parser", "summarize"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyiscsi-target",
        description="A pure-Python iSCSI target: serves disk images and block devices to iSCSI initiators.",
        epilog="Run 'pyiscsi-target COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "serve",
        help="run the target described by a config file",
        description="Load CONFIG, open (and create when missing) every LUN image, listen on the configured "
        "portals and serve until SIGINT/SIGTERM, which flush every LUN before exit.  Exit status: 0 after "
        "SIGINT/SIGTERM, 1 when a portal or the admin endpoint cannot listen, 2 for a config error, 3 when "
        "another gateway fenced this one (RBD LUNs; restart it).",
    )
    s.add_argument("config", metavar="CONFIG", help="the TOML config file (see config/example.toml)")
    s.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="least severe messages logged to stderr: DEBUG, INFO (default), WARNING, ERROR",
    )
    s.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines (default) or JSON, one object per line: time, level, logger, message and fields such "
        "as event, initiator and address on logins, logouts and refusals.  CHAP secrets are never logged",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "check-config",
        help="validate a config file and print its targets, LUNs and portals",
        description="Validate CONFIG without serving: exit 0 and print a summary when it is valid; "
        "otherwise print each problem as FILE:LINE: KEY: PROBLEM and exit 2.",
    )
    c.add_argument("config", metavar="CONFIG", help="the TOML config file")
    c.set_defaults(func=cmd_check_config)

    n = sub.add_parser(
        "create-lun",
        help="create an empty disk image file",
        description="Create an image file of SIZE bytes for use as a LUN: sparse (takes space only as it is "
        "written) unless --preallocate.  Refuses to replace an existing file unless --force.",
    )
    n.add_argument("path", metavar="PATH", help="the image file to create, e.g. luns/data.img")
    n.add_argument("--size", required=True, help='its size: bytes or binary units, e.g. "16GiB", "512MiB"')
    n.add_argument("--preallocate", action="store_true", help="allocate every block now instead of a sparse file")
    n.add_argument(
        "--block-size", type=int, choices=(512, 4096), default=512, help="logical block size the LUN will use (default 512); the size must be a multiple of it"
    )
    n.add_argument("--force", action="store_true", help="replace PATH if it exists (its data is lost)")
    n.set_defaults(func=cmd_create_lun)

    st = sub.add_parser(
        "status",
        help="show what a running server serves: portals, targets, LUNs, sessions, reservations, throughput",
        description="Ask the server running with CONFIG (through its local admin endpoint, see [admin]) for its "
        "portals, targets, LUNs (size, cache mode, dirty bytes, persistent reservation holder and keys), "
        "sessions (initiator, address, ISID, TSIH, negotiated keys, digests, commands in flight) and "
        "throughput.  Exit 1 if no server answers.",
    )
    st.add_argument("config", metavar="CONFIG", help="the config file the server was started with")
    st.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    st.add_argument("--socket", metavar="PATH", help="the admin socket, if not the one CONFIG names")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser(
        "reload",
        help="apply the edited config file to a running server (same as SIGHUP)",
        description="Make the server running with CONFIG re-read its config file and apply the changes live: "
        "targets and LUNs added or removed, LUNs grown (initiators get CAPACITY DATA HAS CHANGED), "
        "CHAP/ACL/key changes for new logins; sessions on unchanged targets are not touched.  An invalid "
        "file is refused whole (exit 2, FILE:LINE: KEY: PROBLEM) and the running configuration stays.",
    )
    r.add_argument("config", metavar="CONFIG", help="the config file the server was started with")
    r.add_argument("--json", action="store_true", help="print the outcome as JSON")
    r.add_argument("--socket", metavar="PATH", help="the admin socket, if not the one CONFIG names")
    r.set_defaults(func=cmd_reload)
    return p


def _setup_logging(level: str, fmt: str = "text", config: Config | None = None) -> None:
    from . import logs

    logs.setup(level, fmt, sys.stderr, config)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    _setup_logging(args.log_level, args.log_format, config)
    from . import server  # the fabric and the SCSI core load only when serving

    logging.getLogger("pyiscsi_target").info("pyiscsi-target %s, config %s", __version__, config.source)
    try:
        return int(server.run(config) or 0)
    except ConfigError as e:  # a LUN could not be brought up (assemble.AssembleError)
        _err(str(e))
        return EXIT_CONFIG
    except KeyboardInterrupt:  # pragma: no cover - Windows: no signal handlers
        return 130


def summarize(config: Config) -> str:
    """A human summary of a valid config (what check-config prints)."""

    def portal(h: str, p: int) -> str:
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    s, i = config.server, config.iscsi
    out = [
        f"{config.source}: OK",
        f"portals:   {', '.join(portal(h, p) for h, p in s.listen)}",
        f"state_dir: {s.state_dir}",
        f"timers:    nop {s.nop_interval:g}s (timeout {s.nop_timeout:g}s), login {s.login_timeout:g}s; "
        f"max {s.max_sessions} sessions",
        f"iscsi:     MaxRecvDataSegmentLength {format_size(i.max_recv_data_segment_length)}, "
        f"MaxBurstLength {format_size(i.max_burst_length)}, FirstBurstLength {format_size(i.first_burst_length)}, "
        f"ImmediateData {'Yes' if i.immediate_data else 'No'}, InitialR2T {'Yes' if i.initial_r2t else 'No'}, "
        f"digests {'/'.join(i.header_digest)} (header) {'/'.join(i.data_digest)} (data)",
    ]
    gw = config.gateway
    out.append(f"gateway:   {gw.name}, ALUA port group / TPGT {gw.port_group} ({gw.state})")
    for p in gw.peers:
        where = ", ".join(portal(h, port) for h, port in p.portals) or "no portals advertised"
        out.append(f"  peer:    {p.name}, port group {p.port_group} ({p.state}): {where}")
    out += _operations_summary(config, portal)
    for w in getattr(config, "warnings", ()):
        out.append(f"warning:   {w}")
    dchap = getattr(config, "discovery_chap", None)
    if dchap is not None:
        out.append(f"discovery: {_chap_summary(dchap)}")
    for t in config.targets:
        out.append(f"target {t.iqn}" + (f'  alias "{t.alias}"' if t.alias else ""))
        access = []
        if getattr(t, "chap", None) is not None:
            access.append(_chap_summary(t.chap))
        if getattr(t, "allow_initiators", ()):
            access.append(f"initiators {', '.join(t.allow_initiators)}")
        if getattr(t, "allow_networks", ()):
            access.append(f"networks {', '.join(t.allow_networks)}")
        if access:
            out.append(f"  access: {'; '.join(access)}")
        for lun in t.luns:
            if lun.is_block_device:
                size, state = "device size", "block device"
            elif lun.is_rbd:
                size = "image size" + (f" ({format_size(lun.size)} if created)" if lun.size is not None else "")
                state = f"Ceph RBD, {config.ceph.conf} as client.{config.ceph.client}"
            else:
                exists = lun.path.exists()
                size = format_size(lun.size) if lun.size is not None else format_size(lun.path.stat().st_size)
                kind = "preallocated" if lun.preallocate else "sparse"
                state = f"{kind}, exists" if exists else f"{kind}, will be created"
                if exists and lun.size is not None and lun.path.stat().st_size < lun.size:
                    state = f"exists ({format_size(lun.path.stat().st_size)}), will be extended"
            flags = [f"{lun.block_size}-byte blocks"]
            if lun.read_only:
                flags.append("read-only")
            if lun.serial:
                flags.append(f"serial {lun.serial}")
            if getattr(lun, "initiators", ()):
                flags.append(f"only {', '.join(lun.initiators)}")
            if lun.rotation_rate == 1:
                flags.append("SSD")
            elif lun.rotation_rate:
                flags.append(f"{lun.rotation_rate} rpm")
            out.append(f"  LUN {lun.id}: {lun.path}  {size}  ({state}; {', '.join(flags)})")
    return "\n".join(out)


def _operations_summary(config: Config, portal) -> list[str]:
    """Where status/reload reach the server, and where metrics and the dashboard are."""
    a, m = config.admin, config.metrics
    if not a.enabled:
        admin = "disabled ([admin] enabled = false): no status or reload; SIGHUP still reloads"
    elif a.transport == "unix":
        admin = f"unix socket {a.socket or Path(config.server.state_dir) / 'admin.sock'} (mode 0600)"
    else:
        admin = f"tcp {portal(*a.listen)}, token in {Path(config.server.state_dir) / 'admin.token'}"
    if m.listen is None:
        metrics = "not served (set [metrics] listen)"
    else:
        url = f"http://{portal(*m.listen)}/"
        metrics = f"{url}metrics (Prometheus), dashboard {url}"
    return [f"admin:     {admin}", f"metrics:   {metrics}"]


def _chap_summary(c) -> str:
    """CHAP settings without the secrets."""
    mutual = f", mutual as {c.mutual_user}" if c.mutual_user else ""
    return f"CHAP user {c.user}{mutual} ({'/'.join(c.algorithms)})"


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    print(summarize(config))
    return EXIT_OK


def _human(n: float) -> str:
    """Approximate binary size for humans: 1536 -> '1.5 KiB'."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n:.0f} B"


class _ProgressBar:
    """One line on stderr, redrawn: bar, percent, bytes done/total, rate, ETA."""

    def __init__(self, label: str, width: int = 24):
        self.label = label
        self.width = width
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        frac = done / total if total else 1.0
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        line = (f"\r{self.label} [{bar}] {frac * 100:3.0f}%  {_human(done)} / {_human(total)}"
                f"  {_human(rate)}/s  ETA {eta:.0f}s")
        sys.stderr.write(line + ("\n" if done >= total else ""))
        sys.stderr.flush()


def cmd_create_lun(args: argparse.Namespace) -> int:
    from .storage.base import StorageError
    from .storage.file import create_image

    try:
        size = parse_size(args.size)
    except ValueError as e:
        _err(f"pyiscsi-target create-lun: --size: {e}")
        return EXIT_CONFIG
    if size <= 0 or size % args.block_size:
        _err(f"pyiscsi-target create-lun: --size: {size} bytes is not a positive multiple of the block size {args.block_size}")
        return EXIT_CONFIG
    path = Path(args.path)
    try:
        create_image(path, size, preallocate=args.preallocate, block_size=args.block_size, force=args.force,
                     progress=_ProgressBar(f"allocating {path}") if args.preallocate else None)
    except FileExistsError:
        _err(f"pyiscsi-target create-lun: {path} already exists; refusing to overwrite it (use --force to replace it)")
        return EXIT_FAILURE
    except (StorageError, OSError) as e:
        _err(f"pyiscsi-target create-lun: {e}")
        return EXIT_FAILURE
    print(f"created {path}: {format_size(size)}, {'preallocated' if args.preallocate else 'sparse'}")
    return EXIT_OK


def _admin_request(args: argparse.Namespace, op: str) -> dict | int:
    from .admin import AdminError, Endpoint, endpoint_for_config, request

    try:
        ep = Endpoint("unix", path=Path(args.socket)) if args.socket else endpoint_for_config(args.config)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    try:
        return request(ep, op)
    except AdminError as e:
        _err(f"pyiscsi-target {op}: {e}")
        return EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    from .admin import format_status

    answer = _admin_request(args, "status")
    if isinstance(answer, int):
        return answer
    if not answer.get("ok"):
        _err(f"pyiscsi-target status: {answer.get('error', 'refused')}")
        return EXIT_FAILURE
    if args.json:
        json.dump(answer["status"], sys.stdout, indent=2)
        print()
    else:
        print(format_status(answer["status"]))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    answer = _admin_request(args, "reload")
    if isinstance(answer, int):
        return answer
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        print()
    elif "error" in answer:
        _err(f"pyiscsi-target reload: {answer['error']}")
    else:
        where = answer.get("config", args.config)
        if answer.get("ok"):
            print(f"{where}: applied" + ("" if answer.get("applied") else " (no changes)"))
            for line in answer.get("applied", ()):
                print(f"  {line}")
        else:
            _err(f"{where}: refused; the running configuration stays in force")
            for line in answer.get("errors", ()):
                _err(line)
        for line in answer.get("warnings", ()):
            _err(f"warning: {line}")
    if answer.get("ok"):
        return EXIT_OK
    # A refused config is a config error (2); anything else a runtime failure.
    return EXIT_CONFIG if answer.get("errors") and "error" not in answer else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `pyiscsi-target status --json | head`: the reader left; that is
        # not an error of ours.  Point stdout at /dev/null so the final
        # flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
