"""FaultyHypervisor and FaultyBalancer: the Hypervisor and Balancer ports with faults and
crashes injected by a FaultInjector, around any adapter (the fakes, or the real libvirt and
HAProxy adapters). Inject them through the composition root:

    runtime = bootstrap(settings, Adapters(hypervisor=FaultyHypervisor(hv, injector),
                                           balancer=FaultyBalancer(lb, injector)))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from imagepipe.errors import InvalidStateError
from imagepipe.pool.model import Backend, BaseImage, CloneInfo, CloneSpec, Endpoint, GuestSession
from imagepipe.pool.ports import (
    Balancer,
    Hypervisor,
    HypervisorEvent,
    Images,
    ImageVersion,
    Subscription,
)
from tests.faults.injector import FaultInjector

T = TypeVar("T")


class FaultyHypervisor:
    """Implements imagepipe.pool.ports.Hypervisor around `inner`."""

    def __init__(self, inner: Hypervisor, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector

    def _do(self, operation: str, name: str, call: Callable[[], T], *, mutating: bool) -> T:
        return cast(T, self.injector.call(operation, name, call, mutating=mutating))

    def list_clones(self) -> list[CloneInfo]:
        return self._do("list_clones", "", self.inner.list_clones, mutating=False)

    def base_ready(self, base: BaseImage) -> bool:
        return self._do("base_ready", "", lambda: self.inner.base_ready(base), mutating=False)

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        return self._do(
            "create_clone", spec.name, lambda: self.inner.create_clone(spec), mutating=True
        )

    def start(self, name: str) -> None:
        self._do("start", name, lambda: self.inner.start(name), mutating=True)

    def stop(self, name: str, timeout: float) -> None:
        self._do("stop", name, lambda: self.inner.stop(name, timeout), mutating=True)

    def reset(self, name: str) -> None:
        self._do("reset", name, lambda: self.inner.reset(name), mutating=True)

    def suspend(self, name: str) -> None:
        self._do("suspend", name, lambda: self.inner.suspend(name), mutating=True)

    def resume(self, name: str) -> None:
        self._do("resume", name, lambda: self.inner.resume(name), mutating=True)

    def delete(self, name: str) -> None:
        self._do("delete", name, lambda: self.inner.delete(name), mutating=True)

    def display(self, name: str) -> Endpoint | None:
        return self._do("display", name, lambda: self.inner.display(name), mutating=False)

    def sessions(self, name: str) -> GuestSession:
        return self._do("sessions", name, lambda: self.inner.sessions(name), mutating=False)

    def notify_users(self, name: str, text: str) -> None:
        """The optional Notifier port, passed through (a rollout's deadline warning)."""
        notify = getattr(self.inner, "notify_users", None)
        if notify is None:
            raise InvalidStateError(f"the hypervisor cannot show {name} a message")
        self._do("notify_users", name, lambda: notify(name, text), mutating=False)

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> Subscription:
        return self.inner.subscribe(callback)

    def close(self) -> None:
        self.inner.close()


class FaultyBalancer:
    """Implements imagepipe.pool.ports.Balancer around `inner`."""

    def __init__(self, inner: Balancer, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector

    def _do(self, operation: str, name: str, call: Callable[[], T], *, mutating: bool) -> T:
        return cast(T, self.injector.call(operation, name, call, mutating=mutating))

    def ensure_frontend(self) -> None:
        self._do("ensure_frontend", "", self.inner.ensure_frontend, mutating=False)

    def list_backends(self) -> list[Backend]:
        return self._do("list_backends", "", self.inner.list_backends, mutating=False)

    def enable(self, name: str, address: Endpoint) -> None:
        self._do("enable", name, lambda: self.inner.enable(name, address), mutating=True)

    def drain(self, name: str) -> None:
        self._do("drain", name, lambda: self.inner.drain(name), mutating=True)

    def remove(self, name: str) -> None:
        self._do("remove", name, lambda: self.inner.remove(name), mutating=True)

    def close(self) -> None:
        self.inner.close()


class FaultyImages:
    """Implements imagepipe.pool.ports.Images around `inner`: the registry's files become
    unreadable (a fault on resolve)."""

    def __init__(self, inner: Images, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector

    def resolve(self, image: str, ref: str | int | None = None) -> ImageVersion:
        return cast(
            ImageVersion,
            self.injector.call(
                "resolve", image, lambda: self.inner.resolve(image, ref), mutating=False
            ),
        )


def _conforms(
    hv: FaultyHypervisor, lb: FaultyBalancer, images: FaultyImages
) -> tuple[Hypervisor, Balancer, Images]:
    return hv, lb, images  # mypy checks that the wrappers have the ports' shapes
