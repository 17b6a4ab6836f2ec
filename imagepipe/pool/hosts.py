"""Several hosts, as the keeper sees them in one pass: which are lost or drained, which hold
a pool's version (asking the hypervisor to upload it where not), and how full each is.

The keeper turns that into each pool's Observed.hosts / lost_hosts / draining_hosts; the
planner's placement rule (planner/placement.py) decides from those alone. A hypervisor
without the Hosts port is the one host "" that holds every version (Observed.hosts empty).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from imagepipe.errors import ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.actions import Action, CreateClone
from imagepipe.pool.model import (
    BaseImage,
    HostRoom,
    HostSpec,
    HostState,
    HostUpload,
    Observed,
    PoolSpec,
)
from imagepipe.pool.ports import Hosts

log = logging.getLogger(__name__)


@dataclass
class HostPass:
    """One pass over the configured hosts: their state and the desktops counted on them."""

    specs: Sequence[HostSpec]
    states: Mapping[str, HostState]
    draining: frozenset[str]
    desktops: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    _held: dict[tuple[str, str, int], bool] = field(default_factory=dict)
    breakers: dict[str, float] = field(default_factory=dict)  # host -> its breaker open until

    @property
    def lost(self) -> frozenset[str]:
        return frozenset(n for n, s in self.states.items() if not s.connected)

    def count(self, observed: Mapping[str, Observed], pools: Mapping[str, PoolSpec]) -> None:
        """Every observed desktop of every pool on its host (capacity is the host's)."""
        for name, seen in observed.items():
            size = pools[name].memory if name in pools else 0
            for oc in seen.clones:
                self._add(oc.info.host, size)

    def placed(self, spec: PoolSpec, actions: Iterable[Action]) -> None:
        """Count the desktops a pool's plan makes, so the next pool's placement sees them."""
        for action in actions:
            if isinstance(action, CreateClone):
                self._add(action.host, spec.memory)

    def rooms(
        self,
        spec: PoolSpec,
        base: BaseImage | None,
        ensure: Callable[[str, BaseImage], bool],
    ) -> tuple[HostRoom, ...]:
        """The hosts as this pool's placement sees them. A host the pool may use that is
        connected and not drained is asked for the pool's version (an upload starts where it
        is missing); it takes new desktops only once it holds it."""
        rooms = []
        for host in self.specs:
            usable = (
                spec.may_use(host)
                and host.name not in self.lost
                and host.name not in self.draining
                and host.name not in self.breakers
                and self.states.get(host.name) is not None
                and base is not None
                and self._holds(host.name, base, ensure)
            )
            rooms.append(
                HostRoom(
                    name=host.name,
                    address=host.address,
                    usable=usable,
                    desktops=self.desktops.get(host.name, 0),
                    memory=self.memory.get(host.name, 0),
                    max_desktops=host.max_desktops,
                    max_memory=host.max_memory,
                    upload=self._upload_of(host.name, base) if not usable else None,
                    breaker_open_until=self.breakers.get(host.name),
                )
            )
        return tuple(rooms)

    def _upload_of(self, host: str, base: BaseImage | None) -> HostUpload | None:
        """The upload of `base` to `host` under way, as the hypervisor reported it."""
        state = self.states.get(host)
        upload = state.upload if state is not None else None
        if (
            upload is None
            or base is None
            or (upload.image, upload.version) != (base.image, base.version)
        ):
            return None
        return upload

    def _holds(self, host: str, base: BaseImage, ensure: Callable[[str, BaseImage], bool]) -> bool:
        key = (host, base.image, base.version)
        state = self.states.get(host)
        if state is not None and (base.image, base.version) in state.versions:
            return True  # the host said so in hosts(): no call
        if key not in self._held:
            try:
                self._held[key] = ensure(host, base)
            except ImagepipeError as exc:
                log.warning(
                    "cannot bring a version to a host",
                    extra=fields(host=host, image=base.image, version=base.version, error=str(exc)),
                )
                self._held[key] = False
        return self._held[key]

    def _add(self, host: str, memory: int) -> None:
        self.desktops[host] = self.desktops.get(host, 0) + 1
        self.memory[host] = self.memory.get(host, 0) + memory


def host_pass(hypervisor: object, specs: Sequence[HostSpec], draining: Iterable[str]) -> HostPass:
    """The pass's view of the configured hosts. A hypervisor without the Hosts port, given
    a host list, reports none lost."""
    if isinstance(hypervisor, Hosts):
        states = {s.name: s for s in hypervisor.hosts()}
    else:
        states = {h.name: HostState(name=h.name, connected=True, since=None) for h in specs}
    return HostPass(specs=specs, states=states, draining=frozenset(draining))


def ensure_of(hypervisor: object) -> Callable[[str, BaseImage], bool]:
    """The hypervisor's ensure_version; without the Hosts port every host holds every
    version."""
    if isinstance(hypervisor, Hosts):
        return hypervisor.ensure_version
    return lambda host, base: True
