"""The composition root: the one place that turns settings into adapters.

    runtime = bootstrap(settings)                      # the configured adapters
    runtime = bootstrap(settings, hypervisor=fake)     # tests, benchmarks: inject any of them
    try: ...
    finally: runtime.close()

The CLI, the demo, the tests and the benchmarks all build their runtime here; nothing else
imports an adapter module. Adapters are imported lazily so a missing optional dependency
(libvirt-python, pyvbox) is a clear EnvironmentMissingError, not an ImportError at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imagepipe.balancers.null import NullBalancer
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, ConfigError, EnvironmentMissingError, ImagepipeError
from imagepipe.images.registry import Registry
from imagepipe.log import fields
from imagepipe.pool.executor import ExecutorSettings
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import BaseImage, PoolSpec
from imagepipe.pool.ports import Balancer, Channels, Clock, Hypervisor, Images
from imagepipe.pool.store import Store
from imagepipe.private import private_dir

if TYPE_CHECKING:
    from imagepipe.hypervisors.libvirt.importer import DomainImporter
    from imagepipe.hypervisors.virtualbox.hypervisor import VmSnapshot
    from imagepipe.stores.copy import CopyReport

log = logging.getLogger(__name__)


class SystemClock:
    """The real clock (imagepipe.pool.ports.Clock)."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class Adapters:
    """Adapters to use instead of the ones the settings name: the seam for tests, the
    benchmarks and anything that embeds imagepipe. None = build from the settings."""

    hypervisor: Hypervisor | None = None
    balancer: Balancer | None = None
    images: Images | None = None
    clock: Clock | None = None


@dataclass
class Runtime:
    settings: Settings
    hypervisor: Hypervisor
    balancer: Balancer
    store: Store
    images: Images
    clock: Clock = field(default_factory=SystemClock)
    # the adapters bootstrap built (and so closes); injected ones belong to their caller
    owned: frozenset[str] = frozenset({"hypervisor", "balancer"})

    @property
    def registry(self) -> Images:  # the name the keeper's callers used before
        return self.images

    def keeper(self, specs: Sequence[PoolSpec], *, other_pools: Sequence[str] = ()) -> Keeper:
        """A keeper for these pools on this runtime's adapters."""
        return Keeper(
            hypervisor=self.hypervisor,
            balancer=self.balancer,
            store=self.store,
            images=self.images,
            specs=specs,
            clock=self.clock,
            settings=keeper_options(self.settings),
            other_pools=other_pools,
            channels=self.images if isinstance(self.images, Channels) else None,
            hosts=self.settings.host_specs(),
        )

    def close(self) -> None:
        """Release every adapter; a managed HAProxy and running desktops keep running."""
        for name, closer in (
            ("balancer", self.balancer.close),
            ("hypervisor", self.hypervisor.close),
            ("store", self.store.close),
        ):
            if name != "store" and name not in self.owned:
                continue
            try:
                closer()
            except ImagepipeError as exc:
                log.warning("could not close cleanly", extra=fields(part=name, error=str(exc)))


def keeper_options(settings: Settings) -> KeeperOptions:
    cfg = settings.keeper
    return KeeperOptions(
        tick=cfg.tick,
        executor=ExecutorSettings(parallel=cfg.parallel, action_timeout=cfg.action_timeout),
    )


def clone_state_dir(settings: Settings) -> Path:
    """Where clone overlays and console sockets live: beside the state database."""
    return settings.state_db.parent / "clones"


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
                record = build_images(settings).resolve(base.image, base.version)
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


def describe_virtualbox_vm(vm: str) -> VmSnapshot:
    """A VirtualBox VM and its current snapshot (`images import --from-vm`): connect, read,
    close."""
    from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor

    hypervisor = VirtualBoxHypervisor()
    try:
        return hypervisor.describe_vm(vm)
    finally:
        hypervisor.close()


def domain_importer(settings: Settings) -> DomainImporter:
    """A libvirt connection for `images import --from-domain` (app/image_import.py)."""
    from imagepipe.hypervisors.libvirt.importer import DomainImporter

    return DomainImporter(settings.hypervisor.uri)


def build_balancer(settings: Settings, *, manage: bool | None = None) -> Balancer:
    """The configured balancer; `manage=False` never starts or reloads HAProxy (for status)."""
    cfg = settings.balancer
    if cfg.driver == "none":
        return NullBalancer()
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


def build_images(settings: Settings) -> Registry:
    return Registry(settings.registry, settings.image_store)


def bootstrap(
    settings: Settings,
    adapters: Adapters = Adapters(),
    *,
    manage_balancer: bool | None = None,
) -> Runtime:
    """Every adapter the keeper needs (the injected ones, else the configured ones), or a
    clear error about what is missing. Nothing is left open when it fails."""
    store = open_store(settings)
    opened: list[Hypervisor | Balancer] = []
    try:
        hypervisor = adapters.hypervisor or build_hypervisor(settings)
        if adapters.hypervisor is None:
            opened.append(hypervisor)
        balancer = adapters.balancer or build_balancer(settings, manage=manage_balancer)
    except BaseException:
        for adapter in opened:
            adapter.close()
        store.close()
        raise
    return Runtime(
        settings=settings,
        hypervisor=hypervisor,
        balancer=balancer,
        store=store,
        images=adapters.images or build_images(settings),
        clock=adapters.clock or SystemClock(),
        owned=frozenset(
            name
            for name, given in (
                ("hypervisor", adapters.hypervisor),
                ("balancer", adapters.balancer),
            )
            if given is None
        ),
    )


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

        return PostgresStore(settings.state, password=state_password(settings))
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


def stop_managed_balancer(balancer: Balancer) -> bool:
    """Stop the HAProxy imagepipe started (the demo's); False when there is none to stop."""
    from imagepipe.balancers.haproxy.balancer import HAProxyBalancer

    if not isinstance(balancer, HAProxyBalancer) or not balancer.manage:
        return False
    balancer.shutdown()
    return True
