"""Live reconfiguration: ``pyiscsi-target reload`` and SIGHUP.

All or nothing, in two phases:

1. *prepare* -- read and validate the new file (any error refuses the whole
   reload, the running config stays), then open every image the new config
   adds, through ``assemble.build_devices`` so new LUNs are built exactly as at
   start (cache, journal replay, identity).  A failure here closes what was
   opened and refuses the reload too.
2. *commit* -- nothing in it can be refused any more: swap the prepared LUs
   and targets in, grow LUNs, take removed ones away, update what new logins
   check (CHAP, ACLs, offered keys).

What initiators are told (SPC-4 §5.14, SAM-5 §6.3):

* a LUN grew → CAPACITY DATA HAS CHANGED (2A/09) to every I_T nexus of that LU
  (Windows rescans the disk; Linux updates the size);
* a LUN added to or removed from a target → REPORTED LUNS DATA HAS CHANGED
  (3F/0E) on the target's other LUs to every nexus (a new LU itself reports
  POWER ON OCCURRED first to each nexus, like any LU a nexus meets);
* ACL/CHAP/key changes apply to new logins only: a connected cluster node is
  never cut off by an edit;
* targets whose config did not change are not touched at all, and neither are
  their sessions.

Some keys cannot change under running sessions (portals, state_dir, the cache
budget, a LUN's block size/cache mode/journal/serial); a change to one of those
is reported as a warning and takes effect at the next restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from .config import Config, ConfigError, LunConfig, TargetConfig, format_size, load_config

log = logging.getLogger("pyiscsi_target.reload")

__all__ = ["Reloader", "ReloadResult"]

# LunConfig fields that need the LUN re-opened (not done under live sessions).
_RESTART_LUN_FIELDS = ("block_size", "read_only", "serial", "cache", "journal", "journal_size",
                       "max_dirty_age", "dirty_limit")


@dataclass
class ReloadResult:
    ok: bool
    applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "applied": self.applied, "warnings": self.warnings, "errors": self.errors,
                "time": self.time}


@dataclass
class _Plan:
    new: Config
    add_targets: list[TargetConfig] = field(default_factory=list)
    remove_targets: list[str] = field(default_factory=list)
    add_luns: dict[str, list[LunConfig]] = field(default_factory=dict)     # existing target → LUNs to add
    remove_luns: dict[str, list[int]] = field(default_factory=dict)
    grow: list[tuple[str, LunConfig]] = field(default_factory=list)
    retune: list[tuple[str, LunConfig]] = field(default_factory=list)      # rotation_rate
    refresh: list[tuple[str, int]] = field(default_factory=list)           # RBD LUNs: re-read the image size
    access: list[TargetConfig] = field(default_factory=list)               # alias/CHAP/ACL/masking changed
    warnings: list[str] = field(default_factory=list)


class Reloader:
    def __init__(self, server, ops=None) -> None:
        self.server = server
        self.ops = ops
        self.last: ReloadResult | None = None
        self._lock = asyncio.Lock()  # SIGHUP and `reload` never interleave

    async def reload(self, path=None) -> ReloadResult:
        async with self._lock:
            source = path or self.server.config.source
            try:
                new = await asyncio.to_thread(load_config, source)
            except ConfigError as e:
                msgs = list(getattr(e, "errors", None) or str(e).splitlines())
                result = ReloadResult(False, errors=msgs)
            else:
                result = await self.apply(new)
            self._record(result)
            return result

    def _record(self, r: ReloadResult) -> None:
        self.last = r
        tel = getattr(self.server, "telemetry", None)
        if tel is not None:
            tel.reloads["ok" if r.ok else "refused"] += 1
        if r.ok:
            log.info("reload: applied%s", "" if r.applied else " (no changes)")
            for line in r.applied:
                log.info("reload: %s", line)
        else:
            log.error("reload refused, the running configuration stays in force:")
            for line in r.errors:
                log.error("reload: %s", line)
        for line in r.warnings:
            log.warning("reload: %s", line)

    # -- diff ----------------------------------------------------------------------
    def plan(self, new: Config) -> tuple[_Plan, list[str]]:
        old: Config = self.server.config
        p = _Plan(new)
        errors: list[str] = []
        for name in ("listen", "state_dir", "max_connections_total", "max_connections_per_address",
                     "login_failure_delay"):
            if getattr(old.server, name, None) != getattr(new.server, name, None):
                p.warnings.append(f"[server] {name} changed: takes effect at the next restart")
        for name, label in (("cache", "[cache]"), ("admin", "[admin]"), ("metrics", "[metrics]"),
                            ("gateway", "[gateway]"), ("ceph", "[ceph]")):
            if getattr(old, name, None) != getattr(new, name, None):
                p.warnings.append(f"{label} changed: takes effect at the next restart")
        old_t = {t.iqn: t for t in old.targets}
        new_t = {t.iqn: t for t in new.targets}
        p.remove_targets = [iqn for iqn in old_t if iqn not in new_t]
        p.add_targets = [t for iqn, t in new_t.items() if iqn not in old_t]
        for iqn, nt in new_t.items():
            ot = old_t.get(iqn)
            if ot is None or ot == nt:
                continue
            dev = self.server.devices[iqn]
            if _access(ot) != _access(nt) or \
                    _masks(ot) != _masks(nt):
                p.access.append(nt)
            ol = {lc.id: lc for lc in ot.luns}
            nl = {lc.id: lc for lc in nt.luns}
            gone = [i for i in ol if i not in nl]
            added = [lc for i, lc in nl.items() if i not in ol]
            for i, lc in nl.items():
                if i not in ol or ol[i] == lc:
                    continue
                o = ol[i]
                if o.path != lc.path:
                    # Another image under the same LUN number: the old LU goes,
                    # a new one comes (initiators see 3F/0E and rescan).
                    gone.append(i)
                    added.append(lc)
                    continue
                for f in _RESTART_LUN_FIELDS:
                    if getattr(o, f, None) != getattr(lc, f, None):
                        p.warnings.append(f"target {iqn} LUN {i}: {f} changed: takes effect at the next restart "
                                          "(or remove the LUN, reload, add it back)")
                cur = dev.luns[i].backend.size
                if lc.is_rbd and lc.size is not None and lc.size != o.size:
                    p.warnings.append(f"target {iqn} LUN {i}: size changed: an RBD image is not resized from the "
                                      "config (`rbd resize` it, then reload every gateway)")
                elif lc.size is not None and lc.size > cur:
                    why = _cannot_grow(dev.luns[i].backend)
                    if why:
                        errors.append(f"{new.source}: target {iqn} LUN {i}: size: cannot grow live: {why}")
                    else:
                        p.grow.append((iqn, lc))
                if o.rotation_rate != lc.rotation_rate:
                    p.retune.append((iqn, lc))
            if gone:
                p.remove_luns[iqn] = sorted(gone)
            if added:
                p.add_luns[iqn] = sorted(added, key=lambda x: x.id)
        # Shared images change size outside the config (`rbd resize`, maybe
        # from another gateway): every reload re-reads them, edited or not.
        for iqn, nt in new_t.items():
            if iqn in old_t:
                ol = {lc.id: lc for lc in old_t[iqn].luns}
                p.refresh += [(iqn, lc.id) for lc in nt.luns
                              if lc.is_rbd and lc.id in ol and ol[lc.id].path == lc.path]
        return p, errors

    # -- apply ---------------------------------------------------------------------
    async def apply(self, new: Config) -> ReloadResult:
        from .assemble import build_devices

        p, errors = self.plan(new)
        if errors:
            return ReloadResult(False, warnings=p.warnings, errors=errors)
        # Phase 1: open everything new in one build (all or nothing).
        synthetic = list(p.add_targets)
        for iqn, luns in p.add_luns.items():
            synthetic.append(dataclasses.replace(new.target(iqn), luns=tuple(luns)))
        built: dict = {}
        if synthetic:
            # Images a reload removes stay open until commit; an image moved to
            # another LUN in the same reload is therefore still locked: say so.
            try:
                # Added targets get the running [gateway] (ALUA groups, TPGT):
                # a [gateway] change applies to all targets at the next restart.
                built = await build_devices(dataclasses.replace(new, targets=tuple(synthetic),
                                                                gateway=self.server.config.gateway),
                                            on_fenced=getattr(self.server, "on_fenced", None))
            except ConfigError as e:
                msg = str(e)
                if "in use" in msg or "locked" in msg:
                    msg += " (moving an image between LUNs takes two reloads: remove it, reload, add it, reload)"
                return ReloadResult(False, warnings=p.warnings, errors=msg.splitlines())
            self._share_cache_budget(built)
        # Phase 2: commit.
        applied: list[str] = []
        try:
            await self._commit(p, built, applied)
        except Exception as e:  # a bug or an I/O error half-way: say what was done
            log.exception("reload: commit failed")
            return ReloadResult(False, applied=applied, warnings=p.warnings,
                                errors=[f"applying the new configuration failed half-way: {e}"])
        return ReloadResult(True, applied=applied, warnings=p.warnings)

    def _share_cache_budget(self, built: dict) -> None:
        """build_devices made its own [cache] budget for new cached LUNs; move
        them to the running one so the configured total still holds."""
        running = None
        for dev in self.server.devices.values():
            for lu in dev.luns.values():
                running = getattr(lu.backend, "budget", None) or running
        if running is None:
            return
        for dev in built.values():
            for lu in dev.luns.values():
                b = lu.backend
                budget = getattr(b, "budget", None)
                if budget is not None and budget is not running:
                    # Nothing has been cached yet (no I/O reached it): moving is safe.
                    budget.caches.remove(b)
                    b.budget = running
                    running.caches.append(b)

    async def _commit(self, p: _Plan, built: dict, applied: list[str]) -> None:
        from .scsi.sense import Reason
        from .server import access_list, chap_credentials, offers_from_config

        server, new = self.server, p.new
        ctx = server.ctx
        loop = asyncio.get_running_loop()
        tel = getattr(server, "telemetry", None)
        old = server.config

        # New logins: offered keys, timers, discovery CHAP.
        ctx.offers = offers_from_config(new.iscsi)
        ctx.nop_interval, ctx.nop_timeout = new.server.nop_interval, new.server.nop_timeout
        ctx.login_timeout, ctx.max_sessions = new.server.login_timeout, new.server.max_sessions
        ctx.discovery_chap = chap_credentials(getattr(new, "discovery_chap", None))
        if old.iscsi != new.iscsi:
            applied.append("[iscsi] keys changed: offered to new logins")
        if (old.server.nop_interval, old.server.nop_timeout, old.server.login_timeout, old.server.max_sessions) != \
                (new.server.nop_interval, new.server.nop_timeout, new.server.login_timeout, new.server.max_sessions):
            applied.append("[server] timers/max_sessions changed: apply to new connections")
        if getattr(old, "discovery_chap", None) != getattr(new, "discovery_chap", None):
            applied.append("[discovery] CHAP changed: applies to new discovery logins")

        # Targets added.
        for t in p.add_targets:
            dev = built[t.iqn]
            server.devices[t.iqn] = dev
            ctx.targets[t.iqn] = _entry(t, dev, chap_credentials, access_list)
            if tel is not None:
                tel.attach(t.iqn, dev, loop.time)
            applied.append(f"target {t.iqn} added with LUN(s) {', '.join(str(lc.id) for lc in t.luns)}")

        # Access changes on existing targets: new logins see them.
        import pyiscsi_target.assemble as assemble

        for t in p.access:
            entry = ctx.targets[t.iqn]
            entry.alias = t.alias
            entry.chap = chap_credentials(t.chap)
            entry.acl = access_list(t)
            make_view = getattr(assemble, "lun_view", None)
            if make_view is not None:
                server.devices[t.iqn].lun_view = make_view(t)
            applied.append(f"target {t.iqn}: alias/CHAP/access lists updated (for new logins)")

        # LUNs removed from / added to existing targets.
        changed_targets = set(p.remove_luns) | set(p.add_luns)
        for iqn in p.remove_luns:
            dev = server.devices[iqn]
            for lun_id in p.remove_luns[iqn]:
                lu = dev.luns.pop(lun_id)
                await _retire(lu)
                applied.append(f"target {iqn}: LUN {lun_id} removed ({getattr(lu.backend, 'path', '')})")
        for iqn, luns in p.add_luns.items():
            dev = server.devices[iqn]
            nexuses = list(getattr(dev, "_nexuses", ()))
            for lc in luns:
                lu = built[iqn].luns[lc.id]
                for nx in nexuses:
                    lu.unit_attentions.add_nexus(nx)  # POWER ON OCCURRED: new to this nexus
                dev.luns[lc.id] = lu
                applied.append(f"target {iqn}: LUN {lc.id} added ({lc.path}, {format_size(lu.backend.size)})")
        for iqn in changed_targets:
            dev = server.devices[iqn]
            new_ids = {lc.id for lc in p.add_luns.get(iqn, ())}
            for lun_id, lu in dev.luns.items():
                if lun_id not in new_ids:
                    lu.unit_attentions.establish_all(Reason.REPORTED_LUNS_DATA_HAS_CHANGED)
            if tel is not None:
                tel.attach(iqn, dev, loop.time)

        # Grown LUNs.
        for iqn, lc in p.grow:
            lu = server.devices[iqn].luns[lc.id]
            before = lu.backend.size
            await _grow(lu.backend, lc.size, lc.preallocate)
            lu.unit_attentions.establish_all(Reason.CAPACITY_DATA_HAS_CHANGED)
            applied.append(f"target {iqn}: LUN {lc.id} grown from {format_size(before)} to {format_size(lc.size)}")
        for iqn, lc in p.retune:
            server.devices[iqn].luns[lc.id].rotation_rate = lc.rotation_rate
            applied.append(f"target {iqn}: LUN {lc.id} rotation_rate = {lc.rotation_rate}")
        for iqn, lun_id in p.refresh:
            lu = server.devices[iqn].luns.get(lun_id)
            inner = _file_backend(lu.backend) if lu is not None else None
            if inner is None or not hasattr(inner, "refresh_size"):
                continue
            before = inner.size
            try:
                after = await asyncio.to_thread(inner.refresh_size)
            except OSError as e:
                log.warning("reload: target %s LUN %d: cannot re-read the image size: %s", iqn, lun_id, e)
                continue
            if after != before:
                if lu.backend is not inner:
                    lu.backend.size = after
                lu.unit_attentions.establish_all(Reason.CAPACITY_DATA_HAS_CHANGED)
                applied.append(f"target {iqn}: LUN {lun_id} image {'grew' if after > before else 'shrank'} from "
                               f"{format_size(before)} to {format_size(after)}")

        # Targets removed: no new logins first, then close its connections,
        # then flush and close its images.
        for iqn in p.remove_targets:
            ctx.targets.pop(iqn, None)
            dev = server.devices.pop(iqn)
            if tel is not None:
                tel.detach(iqn, dev)
            n = await _close_sessions_of(server, iqn)
            await dev.close()
            applied.append(f"target {iqn} removed ({n} session{'s' if n != 1 else ''} closed)")

        # The new config is now the running one -- except the parts that only a
        # restart applies, which keep describing what actually runs.
        server.config = dataclasses.replace(
            new,
            server=_keep(new.server, old.server, ("listen", "state_dir", "max_connections_total",
                                                  "max_connections_per_address", "login_failure_delay")),
            cache=old.cache, admin=old.admin, metrics=old.metrics, gateway=old.gateway, ceph=old.ceph)
        from .logs import add_secrets, secrets_of

        add_secrets(secrets_of(new))  # new CHAP secrets are redacted from the log too


def _access(t: TargetConfig) -> tuple:
    return (t.alias, getattr(t, "chap", None), getattr(t, "allow_initiators", ()), getattr(t, "allow_networks", ()))


def _masks(t: TargetConfig) -> dict[int, tuple[str, ...]]:
    """LUN masking of a target: LUN id → initiators allowed (masked LUNs only)."""
    return {lc.id: lc.initiators for lc in t.luns if getattr(lc, "initiators", ())}


def _keep(new_section, old_section, names):
    return dataclasses.replace(new_section, **{n: getattr(old_section, n) for n in names if hasattr(old_section, n)})


def _entry(t: TargetConfig, dev, chap_credentials, access_list):
    from .iscsi.session import TargetEntry

    return TargetEntry(t.iqn, dev, t.alias, chap=chap_credentials(getattr(t, "chap", None)), acl=access_list(t))


def _file_backend(backend):
    """The FileBackend under a backend (the image behind a cache)."""
    return getattr(backend, "inner", backend)


def _cannot_grow(backend) -> str | None:
    inner = _file_backend(backend)
    if getattr(backend, "journal", None) is not None:
        return "it has a journal, which records the image size (stop the server to grow it)"
    if getattr(inner, "block_device", False):
        return "it is a block device (its size is the device's)"
    if getattr(inner, "read_only", False):
        return "it is read-only"
    if getattr(inner, "_fd", -1) < 0:
        return "its image is not open"
    return None


async def _grow(backend, size: int, preallocate: bool) -> None:
    """Extend the image file, then let the SCSI side see the new size: the
    file first, so no command can address blocks that do not exist yet."""
    from .storage import file as filemod

    inner = _file_backend(backend)

    def extend() -> None:
        fd = inner._fd
        cur = os.fstat(fd).st_size
        if cur < size:
            if preallocate:
                filemod._preallocate(fd, cur, size - cur)
            os.ftruncate(fd, size)
            os.fsync(fd)

    await asyncio.to_thread(extend)
    inner.size = size
    if backend is not inner:
        backend.size = size
    log.info("%s: grown to %s", getattr(inner, "path", "?"), format_size(size))


async def _retire(lu) -> None:
    """A LUN leaves: abort what runs on it, flush and close its image."""
    from .scsi.tasks import TaskSet

    entries = lu.tasks.select()
    if entries:
        await TaskSet.abort(entries)
    try:
        await lu.backend.flush()
    except Exception:
        log.exception("flushing removed LUN %d", lu.lun_id)
    await lu.stop_sharing()
    await lu.backend.close()


async def _close_sessions_of(server, iqn: str) -> int:
    """Close every connection of the removed target's sessions and wait (a
    bounded time) for their commands to end."""
    protos = []
    for proto in list(server.protocols):
        conn = proto.conn
        s = conn.session if conn is not None else None
        if s is not None and s.target is not None and s.target.name == iqn:
            protos.append(proto)
    sessions = {id(proto.conn.session) for proto in protos}
    for proto in protos:
        proto.conn.close("target removed by reload")
        proto._pump()
    pending = [t for proto in protos for t in proto.tasks]
    if pending:
        await asyncio.wait(pending, timeout=10)
    return len(sessions)
