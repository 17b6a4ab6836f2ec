"""Several hosts, for administrators (`imagepipe hosts`, `hosts drain`, `hosts undrain`).

The list joins the settings' hosts (address, capacity, labels), the hypervisor's view of
them (connected or lost since when, versions present, an upload under way) and the store's
records (the desktops the keeper last wrote down on each host, free or in use). A drain is an
intent in the state store; the keeper carries it out (imagepipe/pool/planner: no new
desktops there, free ones replaced elsewhere, in-use ones removed when their session ends).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from imagepipe.app.bootstrap import Runtime
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, HypervisorUnavailableError, ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import CloneState, HostSpec, HostState, PoolSpec
from imagepipe.pool.ports import HostList, Hosts
from imagepipe.pool.rollout.driver import open_host_breakers
from imagepipe.pool.store import Store

log = logging.getLogger(__name__)
IN_USE = (CloneState.IN_USE, CloneState.DISCONNECTED, CloneState.RETIRING)


@dataclass(frozen=True)
class HostRow:
    name: str
    uri: str
    address: str
    labels: tuple[str, ...]
    connected: bool | None  # None: the hypervisor cannot tell (it has no Hosts port)
    since: float | None  # lost since / connected since, as the hypervisor reports
    draining_since: float | None
    free: int
    in_use: int
    other: int  # booting, recycling, being deleted, ...
    lost: int  # desktops remembered on it while it is lost (not seen)
    versions: tuple[str, ...]  # "image vN"
    upload: str | None  # "image vN: 12.5 of 30.0 MiB (42 %)"
    upload_since: float | None  # when that upload started
    max_desktops: int | None
    max_memory: int | None
    # its circuit breaker (creates there failed) keeps new desktops off it until then, as the
    # running keeper's heartbeat says; None: closed, or no keeper runs
    breaker_open_until: float | None = None

    @property
    def state(self) -> str:
        if self.connected is False:
            return "lost"
        if self.draining_since is not None:
            return "draining"
        if self.breaker_open_until is not None:
            return "breaker"
        return "up" if self.connected else "unknown"

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["state"] = self.state
        return doc


def configured(settings: Settings) -> tuple[HostSpec, ...]:
    hosts = settings.host_specs()
    if not hosts:
        raise BadInputError(
            f"{settings.source}: no hosts configured; this keeper drives the one host "
            f"hypervisor.uri ({settings.hypervisor.uri}). Add a 'hosts:' list to the settings "
            "to spread pools over several hosts (docs/hosts.md)"
        )
    return hosts


def one_host(settings: Settings, host: str) -> HostSpec:
    hosts = configured(settings)
    for spec in hosts:
        if spec.name == host:
            return spec
    names = ", ".join(h.name for h in hosts)
    raise BadInputError(f"no host named {host} in {settings.source} (configured hosts: {names})")


def host_rows(runtime: Runtime, specs: Sequence[PoolSpec]) -> list[HostRow]:
    """Every configured host with its state, desktops and versions (reads the store
    read-only; asks the hypervisor for its hosts, never for an upload)."""
    hosts = configured(runtime.settings)
    hypervisor = runtime.hypervisor
    states = {}
    if isinstance(hypervisor, Hosts):
        # one observation first: which hosts answer, what they hold, an upload under way
        # (this process has seen nothing yet; every host would read as lost)
        with contextlib.suppress(HypervisorUnavailableError):
            hypervisor.list_clones()
        states = {s.name: s for s in hypervisor.hosts()}
    return rows(hosts, states, runtime.store_reader, specs, runtime.clock.now())


def rows(
    hosts: Sequence[HostSpec],
    states: dict[str, HostState],
    store: Store,
    specs: Sequence[PoolSpec],
    now: float,
) -> list[HostRow]:
    draining = store.draining_hosts()
    breakers = open_host_breakers(store, now)
    kinds = ("free", "in_use", "other", "lost")
    counts = {h.name: dict.fromkeys(kinds, 0) for h in hosts}
    for spec in specs:
        for record in store.load_pool(spec.name).clones.values():
            count = counts.get(record.host)
            if count is None:
                continue
            if record.lost_since is not None:
                count["lost"] += 1
            elif record.state is CloneState.FREE:
                count["free"] += 1
            elif record.state in IN_USE:
                count["in_use"] += 1
            else:
                count["other"] += 1
    out = []
    for host in hosts:
        state = states.get(host.name)
        upload = state.upload if state is not None else None
        out.append(
            HostRow(
                name=host.name,
                uri=host.uri,
                address=host.address,
                labels=host.labels,
                connected=state.connected if state is not None else None,
                since=state.since if state is not None else None,
                draining_since=draining.get(host.name),
                versions=tuple(f"{i} v{v}" for i, v in state.versions) if state else (),
                upload=upload.describe() if upload is not None else None,
                upload_since=upload.since if upload is not None else None,
                max_desktops=host.max_desktops,
                max_memory=host.max_memory,
                breaker_open_until=breakers.get(host.name),
                **counts[host.name],
            )
        )
    return out


def drain(runtime: Runtime, host: str, at: float) -> bool:
    """Drain the host from `at` on; False when it was drained already."""
    one_host(runtime.settings, host)
    return runtime.store.set_host_draining(host, at)


def undrain(runtime: Runtime, host: str) -> bool:
    """New desktops may go to the host again; False when it was not drained."""
    one_host(runtime.settings, host)
    return runtime.store.set_host_draining(host, None)


def desktops_on(store: Store, specs: Sequence[PoolSpec], host: str) -> int:
    """The desktops the store has on the host (every pool)."""
    return sum(
        1
        for spec in specs
        for record in store.load_pool(spec.name).clones.values()
        if record.host == host
    )


def sessions_on(store: Store, specs: Sequence[PoolSpec], host: str) -> int:
    """The desktops on the host that have a user, as the store remembers them."""
    return sum(
        1
        for spec in specs
        for record in store.load_pool(spec.name).clones.values()
        if record.host == host and record.state in IN_USE
    )


def apply_hosts(keeper: Keeper, hosts: Sequence[HostSpec]) -> None:
    """A reloaded `hosts:` list, between two passes: the desktops of a removed host are
    deleted there first (the reload made sure none has a user), then the hypervisor takes
    the new list and the keeper places by it."""
    hosts = tuple(hosts)
    if hosts == keeper.host_specs:
        return
    hypervisor = keeper.hypervisor
    if not isinstance(hypervisor, HostList):
        log.warning("this hypervisor cannot change its hosts while running; restart the keeper")
        return
    removed = {h.name for h in keeper.host_specs} - {h.name for h in hosts}
    for spec in keeper.specs.values():
        for record in keeper.store.load_pool(spec.name).clones.values():
            if record.host not in removed:
                continue
            try:
                hypervisor.delete(record.name)
            except ImagepipeError as exc:
                log.warning(
                    "desktop of a removed host not deleted; it stays on that host",
                    extra=fields(host=record.host, clone=record.name, error=str(exc)),
                )
            else:
                log.info(
                    "desktop of a removed host deleted",
                    extra=fields(host=record.host, clone=record.name, pool=spec.name),
                )
    hypervisor.set_hosts(hosts)
    keeper.host_specs = hosts


def wait_empty(
    runtime: Runtime,
    specs: Sequence[PoolSpec],
    host: str,
    *,
    sleep: Callable[[float], None],
    report: Callable[[int], None],
    every: float = 2.0,
) -> None:
    """Until the keeper has moved every desktop off the drained host (the in-use ones go
    when their users log off). Reports the count whenever it changes."""
    last = -1
    while True:
        left = desktops_on(runtime.store_reader, specs, host)
        if left != last:
            report(left)
            last = left
        if left == 0:
            return
        sleep(every)
