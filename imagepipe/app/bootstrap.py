"""The composition root: the one place that turns settings into adapters.

    with Runtime(settings) as runtime:                      # what a command uses, opened on
        runtime.registry.images()                           # first use, closed at the end
    with Runtime(settings, Adapters(hypervisor=fake)):      # tests, embedders: inject any
    runtime = bootstrap(settings)                           # the keeper's, opened at once

Nothing else builds an adapter: the image registry, Packer, the state store (read-write or
read-only), the hypervisor, the balancer and the libvirt disk importer are built here when a
command first asks for them, and Runtime.close() closes every one it built (injected ones
belong to whoever passed them). Adapter modules are imported inside the functions that build
them, so a command pays only for what it uses (`imagepipe --help` imports none), and a missing
optional dependency (libvirt-python, pyvbox) is a clear EnvironmentMissingError when it is
needed, not an ImportError at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from imagepipe.errors import BadInputError, ConfigError, EnvironmentMissingError, ImagepipeError
from imagepipe.log import fields
from imagepipe.private import private_dir
from imagepipe.record import Record

if TYPE_CHECKING:
    from imagepipe.config import Settings
    from imagepipe.hypervisors.libvirt.importer import DomainImporter
    from imagepipe.hypervisors.virtualbox.hypervisor import VmSnapshot
    from imagepipe.images.integrity import CheckedImages
    from imagepipe.images.packer import Packer
    from imagepipe.images.registry import Registry
    from imagepipe.pool.keeper import Keeper, KeeperOptions
    from imagepipe.pool.model import BaseImage, PoolSpec
    from imagepipe.pool.ports import Balancer, Channels, Clock, Hypervisor, Images
    from imagepipe.pool.store import Store
    from imagepipe.stores.copy import CopyReport

log = logging.getLogger(__name__)

T = TypeVar("T")


class SystemClock:
    """The real clock (imagepipe.pool.ports.Clock)."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class _Closable(Protocol):
    def close(self) -> None: ...


class Adapters(Record, kw_only=False):
    """Adapters to use instead of the ones the settings name: the seam for tests, the
    benchmarks and anything that embeds imagepipe. None = build from the settings.

    `images` is what the keeper resolves versions with; `registry` is the whole registry the
    `images` and `build` commands work on (given alone, it serves as `images` too)."""

    hypervisor: Hypervisor | None = None
    balancer: Balancer | None = None
    images: Images | None = None
    clock: Clock | None = None
    registry: Registry | None = None
    packer: Packer | None = None
    store: Store | None = None  # the state store, read-write (a campaign's wrapped store)


class Runtime:
    """The adapters one command uses, each opened on first use; close() (or the end of a
    `with`) closes the ones this runtime built, newest first.

    `manage_balancer=False` gives a balancer that never starts or reloads HAProxy (status,
    dry runs); None follows the settings."""

    def __init__(
        self,
        settings: Settings,
        adapters: Adapters = Adapters(),
        *,
        manage_balancer: bool | None = None,
    ) -> None:
        self.settings = settings
        self.adapters = adapters
        self.manage_balancer = manage_balancer
        self._built: dict[str, object] = {}
        self._closers: list[tuple[str, Callable[[], None]]] = []

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self, name: str, given: T | None, build: Callable[[], T], *, closes: bool) -> T:
        if given is not None:
            return given
        if name not in self._built:
            adapter = build()
            self._built[name] = adapter
            if closes:
                self._closers.append((name, cast(_Closable, adapter).close))
        return cast(T, self._built[name])

    @property
    def owned(self) -> frozenset[str]:
        """The adapters this runtime built so far, and so closes (never an injected one)."""
        return frozenset(self._built)

    @property
    def hypervisor(self) -> Hypervisor:
        given = self.adapters.hypervisor
        return self._open("hypervisor", given, lambda: build_hypervisor(self.settings), closes=True)

    @property
    def balancer(self) -> Balancer:
        return self._open(
            "balancer",
            self.adapters.balancer,
            lambda: build_balancer(self.settings, manage=self.manage_balancer),
            closes=True,
        )

    @property
    def store(self) -> Store:
        """The state store, read-write (its folder and the run folder are made if missing)."""
        given = self.adapters.store
        return self._open("store", given, lambda: open_store(self.settings), closes=True)

    @property
    def store_reader(self) -> Store:
        """The state store read-only, never blocking the keeper and never creating anything;
        a database that does not exist yet reads as empty."""
        return self._open(
            "store_reader", None, lambda: open_store_readonly(self.settings), closes=True
        )

    @property
    def registry(self) -> Registry:
        """The image registry (versions, channels, the image store)."""
        return self._open(
            "registry", self.adapters.registry, lambda: build_registry(self.settings), closes=False
        )

    @property
    def images(self) -> Images:
        """What the keeper resolves image versions with: the registry, whose versions resolve
        only while their files match the recorded checksums (images/integrity.py)."""
        if self.adapters.images is not None:
            return self.adapters.images
        return self._open("images", None, lambda: build_checked_images(self.registry), closes=False)

    @property
    def channels(self) -> Channels | None:
        """The registry's channels, when the images adapter can move them."""
        from imagepipe.pool.ports import Channels

        images = self.images
        return images if isinstance(images, Channels) else None

    @property
    def packer(self) -> Packer:
        return self._open(
            "packer",
            self.adapters.packer,
            lambda: build_packer(
                packer_version_cache(self.settings), packer_validated_cache(self.settings)
            ),
            closes=False,
        )

    @property
    def clock(self) -> Clock:
        return self.adapters.clock or SYSTEM_CLOCK

    def domain_importer(self) -> DomainImporter:
        """A libvirt connection for `images import --from-domain` (app/image_import.py)."""
        return self._open(
            "domain_importer", None, lambda: build_domain_importer(self.settings), closes=True
        )

    def describe_virtualbox_vm(self, vm: str) -> VmSnapshot:
        """A VirtualBox VM and its current snapshot (`images import --from-vm`)."""
        from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor

        hypervisor = self._open("virtualbox", None, VirtualBoxHypervisor, closes=True)
        return hypervisor.describe_vm(vm)

    def keeper(self, specs: Sequence[PoolSpec], *, other_pools: Sequence[str] = ()) -> Keeper:
        """A keeper for these pools on this runtime's adapters. On several hosts the keeper
        also removes the versions the registry pruned from them (never `status` or `hosts`)."""
        from imagepipe.pool.keeper import Keeper

        if self.settings.hosts:
            from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor

            if isinstance(self.hypervisor, MultiHostHypervisor):
                self.hypervisor.tidy_with(pruned_in(self.settings))
        return Keeper(
            hypervisor=self.hypervisor,
            balancer=self.balancer,
            store=self.store,
            images=self.images,
            specs=specs,
            clock=self.clock,
            settings=keeper_options(self.settings),
            other_pools=other_pools,
            channels=self.channels,
            hosts=self.settings.host_specs(),
        )

    def stop_managed_balancer(self) -> bool:
        """Stop the HAProxy imagepipe started (the demo's); False when there is none to stop."""
        from imagepipe.balancers.haproxy.balancer import HAProxyBalancer

        balancer = self.balancer
        if not isinstance(balancer, HAProxyBalancer) or not balancer.manage:
            return False
        balancer.shutdown()
        return True

    def close(self) -> None:
        """Close what this runtime built, newest first; a managed HAProxy and running
        desktops keep running. A part that cannot close is logged, the others still close."""
        while self._closers:
            name, close = self._closers.pop()
            self._built.pop(name, None)
            try:
                close()
            except ImagepipeError as exc:
                log.warning("could not close cleanly", extra=fields(part=name, error=str(exc)))


def bootstrap(
    settings: Settings,
    adapters: Adapters = Adapters(),
    *,
    manage_balancer: bool | None = None,
) -> Runtime:
    """A runtime with every adapter the keeper needs already open (the injected ones, else
    the configured ones), or a clear error about what is missing. Nothing is left open when
    it fails."""
    runtime = Runtime(settings, adapters, manage_balancer=manage_balancer)
    try:
        _ = (runtime.store, runtime.hypervisor, runtime.balancer, runtime.images)
    except BaseException:
        runtime.close()
        raise
    return runtime


def keeper_options(settings: Settings) -> KeeperOptions:
    from imagepipe.pool.executor import ExecutorSettings
    from imagepipe.pool.keeper import KeeperOptions

    cfg = settings.keeper
    return KeeperOptions(
        tick=cfg.tick,
        executor=ExecutorSettings(parallel=cfg.parallel, action_timeout=cfg.action_timeout),
    )


def clone_state_dir(settings: Settings) -> Path:
    """Where clone overlays and console sockets live: beside the state database."""
    return settings.state_db.parent / "clones"


# ---- how each adapter is built (Runtime calls these; so do tests of one adapter) ------------


def build_hypervisor(settings: Settings) -> Hypervisor:
    driver = settings.hypervisor.driver
    if driver == "libvirt":
        try:
            from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
        except ImportError as exc:
            raise EnvironmentMissingError(
                f"the libvirt hypervisor needs libvirt-python ({exc}); "
                "install it with: pip install 'imagepipe[libvirt]'"
            ) from exc
        if settings.hosts:
            from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor

            def checksums(base: BaseImage) -> dict[str, str]:
                record = build_registry(settings).resolve(base.image, base.version)
                return {artifact.name: artifact.sha256 for artifact in record.artifacts}

            return MultiHostHypervisor(
                settings.host_specs(), state_dir=clone_state_dir(settings), checksums=checksums
            )
        return LibvirtHypervisor(settings.hypervisor.uri, state_dir=clone_state_dir(settings))
    if driver == "virtualbox":
        from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor

        return VirtualBoxHypervisor()  # EnvironmentMissingError without pyvbox/vboxapi
    raise EnvironmentMissingError(
        f"hypervisor driver {driver!r} is not available in this version of imagepipe; "
        "set hypervisor.driver: libvirt or virtualbox in the settings file"
    )


def pruned_in(settings: Settings) -> Callable[[str, int], bool]:
    """(image, version) -> the registry has pruned it (its copies on hosts may go)."""
    from imagepipe.images.records import Status

    def pruned(image: str, version: int) -> bool:
        records = build_registry(settings).versions(image, fetch=False)
        return any(r.version == version and r.status is Status.PRUNED for r in records)

    return pruned


def build_balancer(settings: Settings, *, manage: bool | None = None) -> Balancer:
    """The configured balancer; `manage=False` never starts or reloads HAProxy (for status)."""
    cfg = settings.balancer
    if cfg.driver == "none":
        from imagepipe.balancers.null import NullBalancer

        return NullBalancer()
    if cfg.driver == "haproxy" and cfg.instances:
        return _haproxy_group(settings, manage)
    if cfg.driver == "haproxy":
        from imagepipe.balancers.haproxy.balancer import HAProxyBalancer

        return HAProxyBalancer(
            bind=cfg.bind,
            admin_socket=settings.admin_socket_path,
            config_path=settings.run_dir / "haproxy.cfg",
            pid_file=settings.run_dir / "haproxy.pid",
            manage=cfg.manage if manage is None else manage and cfg.manage,
            balance=cfg.balance,
            persist=cfg.persist,
            persist_expire=cfg.persist_expire,
            web_socket=settings.web_balancer_socket if settings.web else None,
        )
    if cfg.driver == "ipvs":
        from imagepipe.balancers.ipvs.balancer import IPVSBalancer
        from imagepipe.balancers.ipvs.parse import Forward

        if cfg.vip is None:
            raise BadInputError("balancer.driver ipvs needs balancer.vip (the users' address)")
        return IPVSBalancer(
            vip=cfg.vip,
            port=cfg.port,
            scheduler=cfg.scheduler,
            forward=Forward(cfg.forward),
            persistence=round(cfg.persistence),
            names_file=str(cfg.ipvs_names_file) if cfg.ipvs_names_file else None,
            set_sysctls=cfg.ipvs_sysctls,
        )
    raise EnvironmentMissingError(
        f"balancer driver {cfg.driver!r} is not available on this host; "
        "set balancer.driver: haproxy (or none) in the settings file"
    )


def _haproxy_group(settings: Settings, manage: bool | None) -> Balancer:
    """balancer.instances: each HAProxy with its own admin socket (and, managed, its own
    haproxy-NAME.cfg and .pid in run_dir), kept in step by one BalancerGroup. The web
    entrance's socket goes to the first instance."""
    from imagepipe.balancers.group import BalancerGroup
    from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
    from imagepipe.balancers.haproxy.config import Peer, parse_bind

    cfg = settings.balancer
    peers = tuple(Peer(i.name, parse_bind(i.peer)) for i in cfg.instances if i.peer)
    members: list[tuple[str, Balancer]] = []
    for index, instance in enumerate(cfg.instances):
        managed = cfg.manage if instance.manage is None else instance.manage
        members.append(
            (
                instance.name,
                HAProxyBalancer(
                    bind=instance.bind or cfg.bind,
                    admin_socket=instance.admin_socket,
                    config_path=settings.run_dir / f"haproxy-{instance.name}.cfg",
                    pid_file=settings.run_dir / f"haproxy-{instance.name}.pid",
                    manage=managed if manage is None else manage and managed,
                    balance=cfg.balance,
                    persist=cfg.persist,
                    persist_expire=cfg.persist_expire,
                    web_socket=settings.web_balancer_socket
                    if settings.web and index == 0
                    else None,
                    peers=peers if instance.peer else (),
                    local_peer=instance.name if instance.peer else None,
                ),
            )
        )
    return BalancerGroup(members)


def build_registry(settings: Settings) -> Registry:
    """The registry the settings name (Registry.check_readable says if it is not one)."""
    from imagepipe.images.registry import Registry

    return Registry(
        settings.registry,
        settings.image_store,
        remote=settings.registry_remote,
        fetch_every=settings.registry_fetch_every,
    )


def build_checked_images(registry: Registry) -> CheckedImages:
    from imagepipe.images.integrity import CheckedImages

    return CheckedImages(registry)


def build_packer(version_cache: Path | None = None, validated_cache: Path | None = None) -> Packer:
    """Packer on PATH; with `version_cache`, `packer version` is asked once per install; with
    `validated_cache`, an unchanged template is validated once."""
    from imagepipe.images.packer import Packer

    return Packer(version_cache=version_cache, validated_cache=validated_cache)


def packer_version_cache(settings: Settings) -> Path:
    """In the image store, which a build writes to anyway."""
    return settings.image_store / ".packer-version.json"


def packer_validated_cache(settings: Settings) -> Path:
    """Beside the build directories (owner-only file: its digests cover secret values)."""
    return settings.image_store / ".packer-validated.json"


def build_domain_importer(settings: Settings) -> DomainImporter:
    from imagepipe.hypervisors.libvirt.importer import DomainImporter

    return DomainImporter(settings.hypervisor.uri)


def open_store(settings: Settings) -> Store:
    """The state store the settings name, for reading and writing (made when missing):
    PostgreSQL when `state:` is set, else SQLite in state_db."""
    try:
        if settings.state is None:
            private_dir(settings.state_db.parent)
        private_dir(settings.run_dir)
    except OSError as exc:
        raise EnvironmentMissingError(
            f"cannot create {settings.state_db.parent} or {settings.run_dir}: {exc.strerror}; "
            "run as root or set state_db and run_dir in the settings file"
        ) from exc
    if settings.state is not None:
        from imagepipe.stores.postgres import PostgresStore

        # a call that waits longer than keeper.lease_retry would outlast what the lease allows
        return PostgresStore(
            settings.state,
            password=state_password(settings),
            timeout=settings.keeper.lease_retry,
        )
    from imagepipe.stores.sqlite import SQLiteStore

    return SQLiteStore(settings.state_db)


def open_store_readonly(settings: Settings) -> Store:
    """The state store for reading only (`status`, `images prune`): never blocks the keeper;
    a state the keeper has not made yet reads as empty."""
    if settings.state is not None:
        from imagepipe.stores.postgres import PostgresStore

        return PostgresStore.open_readonly(settings.state, password=state_password(settings))
    from imagepipe.stores.sqlite import SQLiteStore

    return SQLiteStore.open_readonly(settings.state_db)


def copy_state(settings: Settings, target: str, *, password: str | None, now: float) -> CopyReport:
    """`imagepipe store copy`: the SQLite state of the settings into PostgreSQL, verified."""
    from imagepipe.stores.copy import copy_state as copy_between

    return copy_between(settings.state_db, target, password=password, now=now)


def state_password(settings: Settings) -> str | None:
    """The PostgreSQL password from state_password_file; None leaves it to libpq
    (PGPASSWORD, ~/.pgpass or PGPASSFILE)."""
    path = settings.state_password_file
    if path is None:
        return None
    return read_password_file(path, file=settings.source, key="state_password_file")


def read_password_file(path: Path, *, file: str | None, key: str) -> str:
    """A password file's first line. ConfigError naming `file` and `key` (where the path
    was given) when it cannot be read or is empty; the message never holds the password."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(
            f"cannot read the password file {path}: {reason}", file=file, key=key
        ) from None
    if not lines or not lines[0].strip():
        raise ConfigError(
            f"the password file {path} is empty; its first line is the password",
            file=file,
            key=key,
        )
    return lines[0].strip()
