"""Config -> running objects.  The only module that sees config, storage and
the SCSI core together (each of those knows nothing of the others).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .config import Config, ConfigError, LunConfig, format_size
from .identity import IdentityError, LuIdentityRecord, load_or_create_identity
from .storage.base import StorageError
from .storage.file import FileBackend, open_image

if TYPE_CHECKING:  # the SCSI core is imported lazily (see build_devices)
    from .scsi.target import ScsiTargetDevice

__all__ = ["AssembleError", "build_devices", "close_devices", "open_lun"]

log = logging.getLogger(__name__)


class AssembleError(ConfigError):
    """A LUN named in the config cannot be brought up (image, device or
    identity problem).  Like any ConfigError: print it, exit with status 2."""


async def open_lun(config: Config, iqn: str, lun: LunConfig) -> tuple[FileBackend, LuIdentityRecord]:
    """Open/create one LUN's image and load its identity (blocking work in a thread)."""
    where = f"{config.source}: target {iqn} LUN {lun.id}"
    if lun.is_rbd:
        return await open_rbd_lun(config, iqn, lun)
    try:
        ident = await asyncio.to_thread(load_or_create_identity, config.server.state_dir, iqn, lun.id, lun.serial)
    except (IdentityError, OSError) as e:
        raise AssembleError(f"{where}: identity: {e}") from e
    try:
        backend = await asyncio.to_thread(
            open_image,
            lun.path,
            size=lun.size,
            create=not lun.is_block_device,
            preallocate=lun.preallocate,
            block_size=lun.block_size,
            read_only=lun.read_only,
        )
    except (StorageError, OSError, ValueError) as e:
        raise AssembleError(f"{where}: {e}") from e
    log.info(
        "target %s LUN %d: %s, %s, %d-byte blocks%s%s, serial %s, naa %s",
        iqn,
        lun.id,
        lun.path,
        format_size(backend.size),
        lun.block_size,
        ", thin" if backend.thin else "",
        ", read-only" if lun.read_only else "",
        ident.serial,
        ident.naa.hex(),
    )
    return backend, ident


async def open_rbd_lun(config: Config, iqn: str, lun: LunConfig):
    """An RBD image (``path = "rbd:pool/image"``).  Its identity comes from the
    cluster (fsid, pool id, image id), not from state_dir, so every gateway
    exporting the image presents the same disk; a configured serial wins."""
    from .identity import derive_shared_image_identity
    from .storage.rbd import CephSettings, open_rbd

    where = f"{config.source}: target {iqn} LUN {lun.id}"
    c = config.ceph
    settings = CephSettings(conf=str(c.conf), client=c.client, keyring=str(c.keyring) if c.keyring else None,
                            op_timeout=c.op_timeout)
    try:
        backend = await asyncio.to_thread(open_rbd, str(lun.path), settings, size=lun.size, create=lun.size is not None,
                                          block_size=lun.block_size, read_only=lun.read_only)
    except (StorageError, OSError, ValueError, ImportError) as e:
        raise AssembleError(f"{where}: {e}") from e
    if lun.serial is not None:
        ident = await asyncio.to_thread(load_or_create_identity, config.server.state_dir, iqn, lun.id, lun.serial)
    else:
        ident = derive_shared_image_identity(backend.fsid, backend.pool_id, backend.image_id)
    log.info("target %s LUN %d: %s (id %s, cluster %s), %s, %d-byte blocks, thin%s, serial %s, naa %s", iqn, lun.id,
             lun.path, backend.image_id, backend.fsid, format_size(backend.size), lun.block_size,
             ", read-only" if lun.read_only else "", ident.serial, ident.naa.hex())
    return backend, ident


async def add_cache(config: Config, iqn: str, lun: LunConfig, backend, budget):
    """Put the LUN's write-back / write-through cache (and journal) in front
    of its image.  A journal left by a crash is replayed onto the image here,
    before any initiator can read it."""
    from .storage.cache import CachedBackend
    from .storage.journal import Journal

    where = f"{config.source}: target {iqn} LUN {lun.id}"
    journal = None
    if lun.journal is not None:
        try:
            journal = await asyncio.to_thread(Journal.open, lun.journal, lun.journal_size, backend.size)
            n, nbytes = await journal.replay(backend)
        except (StorageError, OSError) as e:
            if journal is not None:
                await journal.close()
            raise AssembleError(f"{where}: journal: {e}") from e
        if n:
            log.warning("target %s LUN %d: %d journal records (%s) replayed from %s", iqn, lun.id, n,
                        format_size(nbytes), lun.journal)
    cache = CachedBackend(
        backend,
        budget,
        mode=lun.cache,
        dirty_limit=lun.dirty_limit,
        max_dirty_age=lun.max_dirty_age,
        journal=journal,
        name=f"{iqn} LUN {lun.id}",
    )
    cache.start()
    log.info("target %s LUN %d: cache %s%s (dirty limit %s, max dirty age %gs)", iqn, lun.id, cache.mode,
             f", journal {lun.journal}" if journal else "", format_size(cache.dirty_limit), lun.max_dirty_age)
    return cache


def lun_view(t):
    """Per-initiator LUN masking (``[[target.lun]] initiators``) as the SCSI
    core's per-nexus view: nexus → the LUN ids it may see (None = all)."""
    from .iscsi.acl import LunMask, NamePatterns, initiator_from_port

    mask = LunMask({lc.id: NamePatterns(lc.initiators) for lc in t.luns if getattr(lc, "initiators", ())})
    if not mask:
        return None
    ids = [lc.id for lc in t.luns]
    return lambda nexus: mask.visible(ids, initiator_from_port(nexus.initiator_port))


def port_groups(config: Config):
    """``[gateway]`` as the SCSI core's ALUA view: one target port group per
    gateway (this one and every peer), each holding one target port whose
    relative port id is the group id -- the same number the fabric uses as
    TPGT and relative port id for this gateway's sessions.  Ordered by id, so
    every gateway of the LU reports the very same REPORT TARGET PORT GROUPS
    data."""
    from .scsi.alua import AccessState, PortGroup, TargetPortGroups

    gw = config.gateway
    groups = [PortGroup(g.port_group, AccessState.from_label(g.state), (g.port_group,)) for g in (gw, *gw.peers)]
    return TargetPortGroups(tuple(sorted(groups, key=lambda g: g.id)))


async def load_pr(config: Config, iqn: str, lun: LunConfig):
    """The LU's persistent reservations, restored from ``state_dir`` when
    APTPL was set (SPC-4 §5.12.5), and the callback that persists them."""
    from .pr_store import PrStoreError, load_persistent_reservations

    try:
        return await asyncio.to_thread(load_persistent_reservations, config.server.state_dir, iqn, lun.id)
    except (PrStoreError, OSError) as e:
        raise AssembleError(f"{config.source}: target {iqn} LUN {lun.id}: persistent reservations: {e}") from e


def shares_reservations(backend) -> bool:
    """A LU on Ceph is exported by every gateway of the cluster: its
    reservations must be one state for all of them (issue 10)."""
    return getattr(backend, "image_id", None) is not None and getattr(backend, "rados", None) is not None


async def share_reservations(config: Config, iqn: str, lun: LunConfig, lu, backend, on_fenced=None) -> None:
    """Keep the LU's reservations in one RADOS object next to its image, shared
    with every other gateway (scsi/pr_shared.py).  The object is named after
    the image id, which survives renames, so each gateway finds the same one
    whatever target name or LUN number it exports the image under."""
    from .iscsi.session import target_port_name
    from .scsi.pr_shared import SharedReservations
    from .storage.rados_record import RadosRecord

    where = f"{config.source}: target {iqn} LUN {lun.id}"
    record = RadosRecord(backend.rados, backend.pool, f"pyiscsi.reservations.{backend.image_id}",
                         on_fenced=on_fenced)
    lu.shared = SharedReservations(lu, record, name=f"{iqn} LUN {lun.id}")
    own = target_port_name(iqn, config.gateway.port_group).lower()
    try:
        await lu.shared.start(own_port=lambda port: port.lower() == own)
    except Exception as e:
        await record.close()
        raise AssembleError(f"{where}: shared reservations in RADOS object "
                            f"{backend.pool}/pyiscsi.reservations.{backend.image_id}: {e}") from e
    log.info("target %s LUN %d: reservations shared through RADOS %s/pyiscsi.reservations.%s "
             "(%d registrations)", iqn, lun.id, backend.pool, backend.image_id, len(lu.pr.state.registrations))


async def build_devices(config: Config, *, on_fenced=None) -> dict[str, "ScsiTargetDevice"]:
    """Open every LUN and build one SCSI target device per configured target.

    ``on_fenced`` is called if another gateway fences this one (its RADOS
    client blocklisted: storage/rados_record.py); the server then stops.

    Returns ``{iqn: ScsiTargetDevice}`` in config order.  On any failure the
    images already opened are closed again and :class:`AssembleError` (a
    :class:`ConfigError`) names the target and LUN.
    """
    from .scsi.lun import LogicalUnit, LuIdentity
    from .scsi.pr import PersistentReservations
    from .scsi.target import ScsiTargetDevice

    opened: list = []  # FileBackend or CachedBackend (closing it closes the image)
    budget = None  # one [cache] budget shared by every cached LUN
    devices: dict[str, ScsiTargetDevice] = {}
    shared: list[LogicalUnit] = []  # LUs whose reservations follow a RADOS record
    try:
        for t in config.targets:
            luns: dict[int, LogicalUnit] = {}
            for lc in t.luns:
                backend, ident = await open_lun(config, t.iqn, lc)
                opened.append(backend)
                if lc.cache != "none" and not lc.read_only:
                    if budget is None:
                        from .storage.cache import CacheBudget

                        budget = CacheBudget(config.cache.size)
                    opened[-1] = backend = await add_cache(config, t.iqn, lc, backend, budget)
                shared_lu = shares_reservations(backend)
                try:
                    luns[lc.id] = LogicalUnit(
                        lc.id,
                        backend,
                        LuIdentity(serial=ident.serial, naa=ident.naa),
                        block_size=lc.block_size,
                        read_only=lc.read_only,
                        rotation_rate=lc.rotation_rate,
                        # On Ceph every state lives in RADOS, so PTPL_C=1 and
                        # nothing is lost when a gateway (or all of them)
                        # restarts, APTPL or not (wsfc-shared-disk.md §0.2).
                        pr=PersistentReservations(durable=True) if shared_lu
                        else await load_pr(config, t.iqn, lc),
                    )
                except ValueError as e:
                    raise AssembleError(f"{config.source}: target {t.iqn} LUN {lc.id}: {e}") from e
                if shared_lu:
                    await share_reservations(config, t.iqn, lc, luns[lc.id], backend, on_fenced)
                    shared.append(luns[lc.id])
            devices[t.iqn] = ScsiTargetDevice(t.iqn, luns, lun_view=lun_view(t), port_groups=port_groups(config))
    except BaseException:
        for lu in shared:
            await lu.stop_sharing()
        for b in opened:
            try:
                await b.close()
            except Exception:  # pragma: no cover - already failing; report the first error
                log.exception("closing %s", b.path)
        raise
    return devices


async def close_devices(devices: dict[str, "ScsiTargetDevice"]) -> None:
    """Close every device (each flushes and closes its LUNs' images)."""
    errors: list[BaseException] = []
    for iqn, dev in devices.items():
        try:
            await dev.close()
        except Exception as e:  # keep closing the others
            log.error("closing target %s: %s", iqn, e)
            errors.append(e)
    if errors:
        raise errors[0]
