"""Build the adapters from the settings, in one startup function (nothing at import time).

runtime = build_runtime(settings)      # hypervisor, balancer, store, registry
try: ...
finally: runtime.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from imagepipe.balancers.base import Balancer
from imagepipe.config import Settings
from imagepipe.errors import EnvironmentMissingError, ImagepipeError
from imagepipe.hypervisors.base import Hypervisor
from imagepipe.images.registry import Registry
from imagepipe.log import fields
from imagepipe.pool.model import Backend, Endpoint
from imagepipe.pool.store import Store

log = logging.getLogger(__name__)


class NullBalancer:
    """balancer.driver: none — users connect to each desktop's own display port.
    Records nothing and reports nothing."""

    def ensure_frontend(self) -> None:
        return None

    def list_backends(self) -> list[Backend]:
        return []

    def enable(self, name: str, address: Endpoint) -> None:
        return None

    def drain(self, name: str) -> None:
        return None

    def remove(self, name: str) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class Runtime:
    settings: Settings
    hypervisor: Hypervisor
    balancer: Balancer
    store: Store
    registry: Registry

    def close(self) -> None:
        """Release every adapter; a managed HAProxy and running desktops keep running."""
        for name, closer in (
            ("balancer", self.balancer.close),
            ("hypervisor", self.hypervisor.close),
            ("store", self.store.close),
        ):
            try:
                closer()
            except ImagepipeError as exc:
                log.warning("could not close cleanly", extra=fields(part=name, error=str(exc)))


def clone_state_dir(settings: Settings) -> Path:
    """Where clone overlays and console sockets live: beside the state database."""
    return settings.state_db.parent / "clones"


def build_hypervisor(settings: Settings) -> Hypervisor:
    driver = settings.hypervisor.driver
    if driver == "libvirt":
        try:
            from imagepipe.hypervisors.libvirt import LibvirtHypervisor
        except ImportError as exc:
            raise EnvironmentMissingError(
                f"the libvirt hypervisor needs libvirt-python ({exc}); "
                "install it with: pip install 'imagepipe[libvirt]'"
            ) from exc
        return LibvirtHypervisor(settings.hypervisor.uri, state_dir=clone_state_dir(settings))
    raise EnvironmentMissingError(
        f"hypervisor driver {driver!r} is not available in this version of imagepipe; "
        "set hypervisor.driver: libvirt in the settings file"
    )


def build_balancer(settings: Settings, *, manage: bool | None = None) -> Balancer:
    """The configured balancer; `manage=False` never starts or reloads HAProxy (for status)."""
    cfg = settings.balancer
    if cfg.driver == "none":
        return NullBalancer()
    if cfg.driver == "haproxy":
        from imagepipe.balancers.haproxy import HAProxyBalancer

        return HAProxyBalancer(
            bind=cfg.bind,
            admin_socket=settings.admin_socket_path,
            config_path=settings.run_dir / "haproxy.cfg",
            pid_file=settings.run_dir / "haproxy.pid",
            manage=cfg.manage if manage is None else manage and cfg.manage,
            balance=cfg.balance,
        )
    raise EnvironmentMissingError(
        f"balancer driver {cfg.driver!r} is not available on this host; "
        "set balancer.driver: haproxy (or none) in the settings file"
    )


def build_runtime(settings: Settings) -> Runtime:
    """Every adapter the keeper needs, or a clear error about what is missing."""
    store = _open_store(settings)
    try:
        hypervisor = build_hypervisor(settings)
        try:
            balancer = build_balancer(settings)
        except BaseException:
            hypervisor.close()
            raise
    except BaseException:
        store.close()
        raise
    registry = Registry(settings.registry, settings.image_store)
    return Runtime(
        settings=settings, hypervisor=hypervisor, balancer=balancer, store=store, registry=registry
    )


def _open_store(settings: Settings) -> Store:
    try:
        settings.state_db.parent.mkdir(parents=True, exist_ok=True)
        settings.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentMissingError(
            f"cannot create {settings.state_db.parent} or {settings.run_dir}: {exc.strerror}; "
            "run as root or set state_db and run_dir in the settings file"
        ) from exc
    return Store(settings.state_db)
