"""One libvirt host reached over the remote protocol (qemu+tls://, qemu+ssh://, qemu+tcp://).

The local adapter (hypervisor.py) writes clone disks, sockets and saved states as local
files. On a remote host no file is touched from here: the version's files are volumes of
the host's `imagepipe` storage pool (volumes.py), a clone's disk is a volume made on the
host, its console and agent sockets are paths on the host.

Instant desktops (CloneSpec.start = restore) work as on the local host, with the warm parent
and each clone's saved state as volumes on the host (remote_parents.py): the clone's disk is
an overlay on the parent's disk, its own saved state `<clone>.save` is there while that disk
is fresh, and start restores from it (then removes it). A reset makes both again and restores.
Whenever that cannot be done, the clone boots.

A lost connection is not an error of the clones: the host is reported lost (`connected`),
and the next call reconnects. Keep-alive 1 s x 2 notices a cut link in about 3 s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imagepipe.errors import (
    BaseMissingError,
    DisplayInUseError,
    FatalHypervisorError,
    HypervisorError,
    HypervisorUnavailableError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import WarmKey, check_name
from imagepipe.hypervisors.libvirt.domain_xml import (
    CloneMetadata,
    domain_xml,
)
from imagepipe.hypervisors.libvirt.errors import error_of
from imagepipe.hypervisors.libvirt.hypervisor import (
    STATE_BLOCKED,
    STATE_PAUSED,
    STATE_PMSUSPENDED,
    STATE_RUNNING,
    STATE_SHUTOFF,
    LibvirtHypervisor,
)
from imagepipe.hypervisors.libvirt.remote_parents import RemoteParent, RemoteWarmParents
from imagepipe.hypervisors.libvirt.volumes import (
    POOL_DIR,
    base_volume,
    clone_volume,
    clone_volume_exists,
    delete_clone_volume,
    retire_version,
    storage_pool,
    stored_versions,
    upload_version,
    uploads_on,
    versions_on,
)
from imagepipe.hypervisors.libvirt.warm import (
    FileStamp,
    RestoreIdentity,
    fitting_parent,
    warm_key,
)
from imagepipe.log import fields
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneSpec,
    Endpoint,
    HostSpec,
    HostUpload,
    StartMode,
)
from imagepipe.record import replace

log = logging.getLogger(__name__)
SOCKET_DIR = "/var/lib/libvirt/qemu"  # exists on every host with libvirt's QEMU driver


class RemoteLibvirtHost(LibvirtHypervisor):
    """The Hypervisor port on one libvirt host whose files are reached only through libvirt."""

    KEEPALIVE = (1, 2)
    CLOSE_WAIT = 2.0  # seconds close() waits for a call that holds the connection

    def __init__(
        self, host: HostSpec, *, state_dir: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.host = host
        self.host_name = host.name
        self._pool: tuple[Any, Any] | None = None  # (connection, its storage pool)
        super().__init__(host.uri, state_dir=state_dir, clock=clock)
        self._parents = RemoteWarmParents(
            self._libvirt,
            self._libvirt_qemu,
            self._connection,
            self._storage,
            f"host {host.name}",
            Path(SOCKET_DIR),
        )

    # -- connection: not at construction (a dead host must not hold up the others) ------

    def _connect(self) -> Any:
        with self._lost_lock:
            self._lost_at = time.monotonic()
        return None

    def close(self) -> None:
        """Close the connection; when a call hangs in libvirt holding it (a host whose
        libvirtd stopped answering), wait CLOSE_WAIT at most: that call's thread drops the
        connection when libvirt returns (keep-alive ends a hung call within seconds)."""
        self._closing = True  # an open that returns after this drops its connection
        if not self._lock.acquire(timeout=self.CLOSE_WAIT):
            self._hub.close()
            log.warning(
                "host does not answer; its connection is dropped when libvirt returns",
                extra=fields(host=self.host.name, uri=self.uri),
            )
            return
        try:
            super().close()
        finally:
            self._lock.release()

    def _unanswered(self, why: str) -> str:
        return (
            f"host {self.host.name} ({self.uri}) does not answer ({why}); its desktops are "
            "kept as they are and it is asked again every pass"
        )

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._lost_at is None

    def _storage(self) -> Any:
        conn = self._connection()
        if self._pool is None or self._pool[0] is not conn:  # none yet, or reconnected
            self._pool = (conn, storage_pool(self._libvirt, conn, f"host {self.host.name}"))
        return self._pool[1]

    # -- versions ------------------------------------------------------------------------

    def versions(self) -> tuple[tuple[str, int], ...]:
        return self.holdings()[0]

    def holdings(self) -> tuple[tuple[tuple[str, int], ...], tuple[HostUpload, ...]]:
        """The versions the host holds, and the uploads under way to it (whoever sends
        them), from one listing of its storage pool."""
        pool = self._storage()
        with self._translate(f"storage pool on host {self.host.name}"):
            names = list(pool.listVolumes())
            return versions_on(names), uploads_on(self._libvirt, pool, names)

    def stored_versions(self) -> tuple[tuple[str, int], ...]:
        """Every version with a volume on the host, complete or not (what a tidy looks at)."""
        with self._translate(f"storage pool on host {self.host.name}"):
            return stored_versions(list(self._storage().listVolumes()))

    def retire(self, image: str, version: int) -> tuple[list[str], str]:
        """Remove a version the registry pruned, and its warm parents, from the host unless a
        disk or a domain there still uses them: (volumes removed, why kept)."""
        with self._translate(f"{image} v{version} on host {self.host.name}"):
            return retire_version(
                self._libvirt, self._connection(), self._storage(), image, version
            )

    def upload(
        self, base: BaseImage, expected: Mapping[str, str], progress: Callable[[int, int], None]
    ) -> None:
        pool = self._storage()
        started = time.monotonic()
        upload_version(
            self._libvirt,
            self._connection(),
            pool,
            base,
            expected,
            progress,
            f"host {self.host.name}",
        )
        log_upload(self.host.name, base, time.monotonic() - started)

    # -- paths on the host -----------------------------------------------------------------

    def disk_path(self, name: str) -> Path:
        return Path(POOL_DIR) / f"{check_name(name)}.qcow2"

    def console_path(self, name: str) -> Path:
        return Path(SOCKET_DIR) / f"imagepipe-{check_name(name)}.console"

    def agent_path(self, name: str) -> Path:
        return Path(SOCKET_DIR) / f"imagepipe-{check_name(name)}.agent"

    def has_domain(self, name: str) -> bool:
        return self._existing(name) is not None

    # -- the port ----------------------------------------------------------------------------

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        name = check_name(spec.name)
        if spec.base.disk is None:
            raise FatalHypervisorError(
                f"image {spec.base.image} v{spec.base.version} has no disk for libvirt; "
                "its image.yml must name artifact.disk"
            )
        where = self.host.name
        pool = self._storage()
        meta = CloneMetadata(
            spec.pool,
            spec.base.image,
            spec.base.version,
            spec.slot,
            spec.mode,
            Path("/"),
            start=spec.start,
        )
        existing = self._existing(name)
        if existing is not None:
            return self._existing_clone(name, meta, *existing)
        lv = self._libvirt
        with self._translate(f"image {spec.base.image} v{spec.base.version} on host {where}"):
            disk = Path(str(base_volume(lv, pool, spec.base, spec.base.disk, where).path()))
            kernel, initrd = (
                Path(str(base_volume(lv, pool, spec.base, f, where).path())) if f else None
                for f in (spec.base.kernel, spec.base.initrd)
            )
        meta = replace(meta, base_disk=disk)
        plan = self._domain_plan(spec, meta, kernel, initrd)
        parent = None
        if spec.start is StartMode.RESTORE:
            key = self._remote_key(spec, plan.memory_kib, [disk, kernel, initrd])
            parent = self._parents.ensure(key, domain_xml(plan), str(disk))
            # the key even without a parent: a reset restores once a later create made it
            meta = replace(meta, warm=key.name)
            plan = replace(plan, metadata=meta)
        backing = parent.disk if parent is not None else disk
        plan = replace(
            plan, disk=Path(clone_volume(lv, pool, name, str(backing), spec.mode, where))
        )
        try:
            with self._translate(f"clone {name}"):
                dom = self._connection().defineXML(domain_xml(plan))
        except BaseException:
            with contextlib.suppress(Exception):
                delete_clone_volume(lv, pool, name, where)
            raise
        if parent is not None and not self._write_state(dom, name, meta, parent, spec.display):
            self._fresh_disk(name, meta, only_if_missing=False)  # no state: boot the base
        self._log("clone created", spec.pool, name, "create")
        return self._info(name, meta, STATE_SHUTOFF, self._facts_of(dom), dom)

    # -- instant desktops ------------------------------------------------------------------

    def _remote_key(self, spec: CloneSpec, memory_kib: int, files: list[Path | None]) -> WarmKey:
        """The warm parent's key on this host: the version's volumes (path and size), the
        shape, and the host's libvirt and QEMU."""
        pool = self._storage()
        stamps = []
        with self._translate(f"image {spec.base.image} v{spec.base.version} on {self.host.name}"):
            for path in files:
                if path is not None:
                    size = int(pool.storageVolLookupByName(path.name).info()[1])
                    stamps.append(FileStamp(path, size, 0))
        libvirt_version, qemu_version = self._host_versions()
        return warm_key(
            image=spec.base.image,
            version=spec.base.version,
            cpus=spec.cpus,
            memory_kib=memory_kib,
            files=stamps,
            cmdline=spec.base.cmdline,
            libvirt_version=libvirt_version,
            qemu_version=qemu_version,
        )

    def _remote_parent(self, meta: CloneMetadata) -> RemoteParent | None:
        """The warm parent a clone restores from, when it is on the host and fits it."""
        return fitting_parent(
            meta,
            self._parents.load,
            self._host_versions,
            self._parents.say_once,
            f" on host {self.host.name}",
        )

    def _write_state(
        self, dom: Any, name: str, meta: CloneMetadata, parent: RemoteParent, display: Endpoint
    ) -> bool:
        with self._translate(f"disk of clone {name}"):
            disk = Path(self._storage().storageVolLookupByName(f"{name}.qcow2").path())
        who = RestoreIdentity(
            name=name,
            uuid=dom.UUIDString(),
            metadata=meta,
            disk=disk,
            console_socket=self.console_path(name),
            agent_socket=self.agent_path(name),
            display=display,
        )
        try:
            self._parents.write_clone_state(parent, who)
        except HypervisorError as exc:
            with contextlib.suppress(HypervisorError):
                self._parents.drop_clone_state(name)
            if isinstance(exc, HypervisorUnavailableError):
                raise
            self._parents.say_once(
                f"state:{parent.key.name}",
                f"cannot write the saved state of {name} from the warm parent of "
                f"{meta.image} v{meta.version} on host {self.host.name}; desktops boot "
                f"instead: {exc}",
            )
            return False
        return True

    def start(self, name: str) -> None:
        dom, meta = self._our_domain(name)
        state = self._state(dom, name)
        if state in (STATE_RUNNING, STATE_BLOCKED):
            return
        if state in (STATE_PAUSED, STATE_PMSUSPENDED):
            raise InvalidStateError(f"clone {name} is suspended; resume it instead of starting it")
        there, saved = self._parents.clone_state(name, dom.UUIDString())
        if there and not clone_volume_exists(self._libvirt, self._storage(), name):
            self._parents.drop_clone_state(name)  # its disk is gone: the state is of no use
            there, saved = False, None
        self._fresh_disk(name, meta, only_if_missing=True)
        if there:  # the disk is a fresh overlay on the parent's: restore it, or boot the base
            started = time.monotonic()
            if (
                saved is not None
                and self._remote_parent(meta) is not None
                and self._restore_from(dom, name, meta, saved)
            ):
                self._parents.drop_clone_state(name)
                self._restored(dom, name, meta, started)
                return
            self._parents.drop_clone_state(name)
            self._fresh_disk(name, meta, only_if_missing=False)
        display = self._facts_of(dom).display
        self._facts.pop(dom.UUIDString(), None)
        lv = self._libvirt
        try:
            dom.create()
        except lv.libvirtError as exc:
            message = exc.get_error_message() or ""
            # QEMU cannot listen, or libvirt has the port reserved for a running domain
            if "Address already in use" in message or "Failed to reserve port" in message:
                raise DisplayInUseError(
                    f"clone {name}: display port {display} on host {self.host.name} is "
                    "already in use by another program; stop it or give the pool a free "
                    "display.port_range in its pool file"
                ) from exc
            raise error_of(exc, f"clone {name}") from exc
        self._log("clone started", meta.pool, name, "start")

    def _fresh_disk(
        self,
        name: str,
        meta: CloneMetadata,
        *,
        only_if_missing: bool,
        parent: RemoteParent | None = None,
    ) -> None:
        """A fresh disk of the clone on the host: an overlay on the version's disk, or on the
        warm parent's when one is given."""
        lv = self._libvirt
        pool = self._storage()
        with self._translate(f"disk of clone {name}"):
            if only_if_missing and clone_volume_exists(lv, pool, name):
                return
            try:
                self._connection().storageVolLookupByPath(str(meta.base_disk))
            except lv.libvirtError as exc:
                raise BaseMissingError(
                    f"clone {name}: the base disk of {meta.image} v{meta.version} is gone "
                    f"from host {self.host.name} ({meta.base_disk}); delete the clone (the "
                    "pool makes it again from the current version)"
                ) from exc
        backing = parent.disk if parent is not None else meta.base_disk
        clone_volume(lv, pool, name, str(backing), meta.mode, self.host.name)

    def reset(self, name: str) -> None:
        dom, meta = self._our_domain(name)
        if self._state(dom, name) != STATE_SHUTOFF:
            self._destroy(dom, name)
        parent = self._remote_parent(meta)
        self._parents.drop_clone_state(name)
        self._fresh_disk(name, meta, only_if_missing=False, parent=parent)
        if parent is not None:
            display = self._facts_of(dom).display
            if display is None or not self._write_state(dom, name, meta, parent, display):
                self._fresh_disk(name, meta, only_if_missing=False)  # no state: boot the base
        self._hub.forget(name)
        self.start(name)
        self._log("clone reset", meta.pool, name, "reset")

    def delete(self, name: str) -> None:
        self._undefine_ours(name)
        delete_clone_volume(self._libvirt, self._storage(), name, self.host.name)
        self._hub.forget(name, disown=True)
        self._log("clone deleted", None, name, "delete")

    def _log(self, message: str, pool: str | None, name: str, action: str) -> None:
        log.info(message, extra=fields(pool=pool, clone=name, action=action, host=self.host.name))


def log_upload(host: str, base: BaseImage, seconds: float) -> None:
    log.info(
        "image version uploaded",
        extra=fields(host=host, image=base.image, version=base.version, seconds=round(seconds, 1)),
    )
