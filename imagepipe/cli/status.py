"""`imagepipe status`: the pools and their desktops, as the keeper sees them.

Reads the store read-only and observes the host live; it never blocks the keeper.
`--json` prints a stable document for scripts (schema "imagepipe.status/1", in docs/keeper.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from imagepipe.cli.app import GLOBALS
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import BadInputError
from imagepipe.images.registry import Registry
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.observe import HostObservation, observe
from imagepipe.pool.planner import classify, free_target
from imagepipe.pool.store import Store
from imagepipe.pool.wiring import build_balancer, build_hypervisor

SCHEMA = "imagepipe.status/1"
WATCH_EVERY = 2.0
IN_USE = (CloneState.IN_USE, CloneState.DISCONNECTED)


@dataclass(frozen=True)
class CloneStatus:
    name: str
    slot: int
    version: int | None
    state: str  # planner.classify: free, in_use, booting, recycling, ...
    power: str | None  # running, shutoff, ...; None when the clone does not exist (yet)
    display: str | None  # host:port a remote-desktop client connects to
    balancer: str | None  # ready, drain, maint; None = not in the balancer
    connections: int
    client: str | None  # remote-display client address
    users: tuple[str, ...]
    since: float | None  # connected since (epoch seconds)
    failures: int


@dataclass(frozen=True)
class PoolStatus:
    name: str
    image: str
    version: int | None  # the version the pool runs now (channel or pin resolved)
    target_free: int
    free: int
    in_use: int
    total: int
    max: int
    failures: int
    breaker_open_until: float | None
    note: str | None  # why the pool cannot make clones or was not observed
    clones: tuple[CloneStatus, ...]


@dataclass(frozen=True)
class StrayClone:
    name: str
    pool: str
    version: int
    power: str


@dataclass(frozen=True)
class HostStatus:
    schema: str
    generated_at: float
    pools: tuple[PoolStatus, ...]
    stray_clones: tuple[StrayClone, ...]
    balancer_error: str | None


def status(
    pool: str | None = typer.Argument(None, help="Show only this pool."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema imagepipe.status/1)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """Show each pool's sizes and each desktop's state, display, balancer state and session."""
    settings = load_settings(GLOBALS.config)
    specs = load_pools([settings.pools_dir])
    if pool is not None:
        specs = [s for s in specs if s.name == pool]
        if not specs:
            raise BadInputError(f"no pool named {pool} in {settings.pools_dir}")
    console = Console()
    if not watch:
        snapshot = collect(settings, specs)
        if as_json:
            typer.echo(to_json(snapshot))
        else:
            console.print(render(snapshot))
        return
    try:
        with Live(render(collect(settings, specs)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(WATCH_EVERY)
                live.update(render(collect(settings, specs)), refresh=True)
    except KeyboardInterrupt:
        return


def collect(settings: Settings, specs: Sequence[PoolSpec]) -> HostStatus:
    """One live observation plus the store's records (read-only)."""
    hypervisor = build_hypervisor(settings)
    balancer = build_balancer(settings, manage=False)
    try:
        registry = Registry(settings.registry, settings.image_store)
        host = observe(hypervisor, balancer, registry, specs)
        records = _records(settings, specs)
    finally:
        balancer.close()
        hypervisor.close()
    return build_status(specs, host, records, time.time())


def _records(settings: Settings, specs: Sequence[PoolSpec]) -> dict[str, PoolRecord]:
    if not settings.state_db.exists():
        return {}
    store = Store.open_readonly(settings.state_db)
    try:
        return {s.name: store.load_pool(s.name) for s in specs}
    finally:
        store.close()


def build_status(
    specs: Sequence[PoolSpec],
    host: HostObservation,
    records: Mapping[str, PoolRecord],
    now: float,
) -> HostStatus:
    pools = []
    for spec in specs:
        record = records.get(spec.name, PoolRecord(pool=spec.name))
        observed = host.pools.get(spec.name, Observed())
        note = host.unobservable.get(spec.name) or host.notes.get(spec.name)
        pools.append(pool_status(spec, observed, record, note, now))
    strays = tuple(
        StrayClone(name=c.name, pool=c.pool, version=c.version, power=str(c.power))
        for c in host.stray_clones
    )
    return HostStatus(
        schema=SCHEMA,
        generated_at=now,
        pools=tuple(pools),
        stray_clones=strays,
        balancer_error=host.balancer_error,
    )


def pool_status(
    spec: PoolSpec, observed: Observed, record: PoolRecord, note: str | None, now: float
) -> PoolStatus:
    seen = observed.by_name()
    names = sorted(set(seen) | set(record.clones), key=lambda n: _slot_of(n, seen, record))
    clones = tuple(clone_status(spec, seen.get(n), record.clones.get(n), now) for n in names)
    return PoolStatus(
        name=spec.name,
        image=spec.image,
        version=observed.target_version,
        target_free=free_target(spec, now),
        free=sum(1 for c in clones if c.state == CloneState.FREE),
        in_use=sum(1 for c in clones if c.state in IN_USE),
        total=len(seen),
        max=spec.max,
        failures=record.failures,
        breaker_open_until=record.breaker_open_until,
        note=note,
        clones=clones,
    )


def clone_status(
    spec: PoolSpec, seen: ObservedClone | None, record: CloneRecord | None, now: float
) -> CloneStatus:
    state = classify(spec, seen, record, now)
    backend = seen.backend if seen else None
    session = seen.session if seen else None
    name = seen.name if seen else record.name if record else ""
    return CloneStatus(
        name=name,
        slot=seen.info.slot if seen else record.slot if record else -1,
        version=seen.info.version if seen else record.version if record else None,
        state=str(state),
        power=str(seen.info.power) if seen else None,
        display=str(seen.info.display) if seen and seen.info.display else None,
        balancer=str(backend.state) if backend else None,
        connections=backend.connections if backend else 0,
        client=session.client if session else None,
        users=session.users if session else (),
        since=session.connected_since if session else None,
        failures=record.failures if record else 0,
    )


def _slot_of(name: str, seen: Mapping[str, ObservedClone], record: PoolRecord) -> int:
    if name in seen:
        return seen[name].info.slot
    return record.clones[name].slot


def to_json(snapshot: HostStatus) -> str:
    return json.dumps(asdict(snapshot), indent=2, sort_keys=False)


def render(snapshot: HostStatus) -> Group:
    parts: list[Table | Text] = []
    for pool in snapshot.pools:
        version = f"v{pool.version}" if pool.version is not None else "no version"
        title = (
            f"{pool.name}  ({pool.image} {version})  free {pool.free}/{pool.target_free}  "
            f"in use {pool.in_use}  total {pool.total}/{pool.max}"
        )
        parts.append(Text(title, style="bold"))  # not a table title: those wrap to its width
        table = Table()
        for column in ("clone", "version", "state", "display", "balancer", "session"):
            table.add_column(column)
        for clone in pool.clones:
            table.add_row(
                clone.name,
                f"v{clone.version}" if clone.version is not None else "-",
                clone.state + (f" ({clone.failures} failures)" if clone.failures else ""),
                clone.display or "-",
                _balancer_cell(clone),
                _session_cell(clone, snapshot.generated_at),
            )
        parts.append(table)
        if pool.breaker_open_until and pool.breaker_open_until > snapshot.generated_at:
            wait = pool.breaker_open_until - snapshot.generated_at
            parts.append(
                Text(
                    f"  {pool.name}: circuit breaker open for {wait:.0f}s more "
                    f"after {pool.failures} failures",
                    style="red",
                )
            )
        if pool.note:
            parts.append(Text(f"  {pool.name}: {pool.note}", style="yellow"))
    for stray in snapshot.stray_clones:
        parts.append(
            Text(
                f"clone {stray.name} belongs to pool {stray.pool}, which is not configured "
                f"({stray.power}); delete it or add the pool back",
                style="yellow",
            )
        )
    if snapshot.balancer_error:
        parts.append(Text(f"balancer: {snapshot.balancer_error}", style="red"))
    if not snapshot.pools:
        parts.append(Text("no pools configured"))
    return Group(*parts)


def _balancer_cell(clone: CloneStatus) -> str:
    if clone.balancer is None:
        return "-"
    return clone.balancer + (f" ({clone.connections} conn)" if clone.connections else "")


def _session_cell(clone: CloneStatus, now: float) -> str:
    if clone.client is None and not clone.users:
        return "-"
    where = clone.client or "disconnected"
    since = f" {int(now - clone.since)}s" if clone.since else ""
    who = ",".join(clone.users)
    return f"{who}@{where}{since}" if who else f"{where}{since}"
