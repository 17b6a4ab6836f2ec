"""The status read model: each pool and desktop as the keeper sees it, for `imagepipe status`.

One live observation of the host (the hypervisor is the truth for what exists) joined with the
store's records (read-only: what cannot be observed). A desktop the store remembers but the host
does not have is reported as `missing`, never as free, and the pool's counts add up: free +
in use + other = total desktops that exist. States are the planner's own, computed with the
same rollout target the keeper uses, so status shows exactly what the keeper acts on.
`to_json` is the stable document for scripts (schema "imagepipe.status/1", docs/keeper.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from imagepipe import schema
from imagepipe.app.bootstrap import Runtime
from imagepipe.pool.learning import learned
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    HostState,
    InstanceHealth,
    Observed,
    ObservedClone,
    PoolDown,
    PoolRecord,
    PoolSpec,
    RolloutPolicy,
)
from imagepipe.pool.observe import HostObservation, observe
from imagepipe.pool.planner import classify, free_target, session_unread
from imagepipe.pool.planner.forecast import day_and_bucket
from imagepipe.pool.ports import Hosts
from imagepipe.record import Record, field, replace

if TYPE_CHECKING:
    from imagepipe.pool.store import Store

SCHEMA = "imagepipe.status/1"
IN_USE = (CloneState.IN_USE, CloneState.DISCONNECTED)
MISSING = "missing"  # remembered by the store, not on the host
UNSEEN = "unseen"  # remembered on a host that is lost: it may still run there
UNKNOWN = "unknown"  # a read this status needed failed (its session, its readiness, the balancer)
RESTS_ON_READY = (CloneState.FREE, CloneState.BOOTING)


class CloneStatus(Record, kw_only=False):
    name: str
    slot: int
    version: int | None
    state: str  # planner.classify: free, in_use, booting, ...; unknown: session/readiness unread
    power: str | None  # running, shutoff, ...; None when the clone does not exist (yet)
    display: str | None  # host:port a remote-desktop client connects to
    balancer: str | None  # ready, drain, maint, unknown (unread); None = not in the balancer
    connections: int
    client: str | None  # remote-display client address
    users: tuple[str, ...]
    since: float | None  # connected since (epoch seconds)
    failures: int
    started_by: str | None = None  # restore (instant desktop) or boot; None: not running
    host: str = ""  # the host it runs on ("": the only host)


class PoolStatus(Record, kw_only=False):
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
    going_down: str | None = None  # `pools down`: "as sessions end" or "now"; None = kept
    unknown: int = 0  # desktops whose state could not be read (counted in total, not free)


class StrayClone(Record, kw_only=False):
    name: str
    pool: str
    version: int
    power: str


class LeaderStatus(Record, kw_only=False):
    """Which keeper leads, when several share the state (the store's lease)."""

    holder: str  # host/pid of the keeper
    epoch: int
    lease_left: float  # seconds; 0 or less: the lease ran out (nobody leads right now)


class HostStatus(Record, kw_only=False):
    schema: str
    generated_at: float
    pools: tuple[PoolStatus, ...]
    stray_clones: tuple[StrayClone, ...]
    balancer_error: str | None
    leader: LeaderStatus | None = None  # None: no keeper ever took the lease (one keeper)
    # several hosts (settings `hosts:`): each one connected or lost, since when; empty: one host
    hosts: tuple[HostState, ...] = ()
    balancer_instances: tuple[InstanceHealth, ...] = ()  # a balancer pair: each instance
    # several hosts: those whose circuit breaker the running keeper holds open, until when
    host_breakers: dict[str, float] = field(default_factory=dict)


def collect(runtime: Runtime, specs: Sequence[PoolSpec]) -> HostStatus:
    """One live observation plus the store's records (read-only). Give a runtime whose
    balancer is not managed (`manage_balancer=False`): status never starts or reloads a
    balancer, and never writes the store."""
    hypervisor = runtime.hypervisor
    host = observe(hypervisor, runtime.balancer, runtime.images, specs, partial=True)
    now = runtime.clock.now()
    reader = runtime.store_reader
    records, downs = load_records(reader, specs, now)
    lease = reader.leader(now)
    leader = None
    if lease is not None:
        leader = LeaderStatus(lease.holder, lease.epoch, round(lease.until - lease.now, 1))
    status = schema.replace(build_status(specs, host, records, now, downs), leader=leader)
    if runtime.settings.host_specs() and isinstance(hypervisor, Hosts):
        from imagepipe.pool.rollout.driver import open_host_breakers  # several hosts only

        breakers = open_host_breakers(reader, now)
        status = schema.replace(status, hosts=tuple(hypervisor.hosts()), host_breakers=breakers)
    return status


def load_records(
    store: Store, specs: Sequence[PoolSpec], now: float
) -> tuple[dict[str, PoolRecord], dict[str, PoolDown]]:
    """The pools' records, and which of them are being taken down. A learning pool's record
    carries what its login history taught, so its target_free is the keeper's; a pool an
    active rollout moves carries its policy (the old free desktops it holds show as free)."""
    active = {p: r for r in reversed(store.rollouts(active=True)) for p in r.pools}
    records = {}
    for spec in specs:
        record = store.load_pool(spec.name)
        if spec.learn is not None:
            day, _ = day_and_bucket(now, spec.timezone)
            record = replace(record, arrivals=learned(store, spec.name, day).arrivals)
        if spec.name in active:
            record = replace(record, rollout=active[spec.name].policy(spec))
        records[spec.name] = record
    downs = {s.name: d for s in specs if (d := store.pool_down(s.name)) is not None}
    return records, downs


def build_status(
    specs: Sequence[PoolSpec],
    host: HostObservation,
    records: Mapping[str, PoolRecord],
    now: float,
    downs: Mapping[str, PoolDown] | None = None,
) -> HostStatus:
    pools = []
    for spec in specs:
        record = records.get(spec.name, PoolRecord(pool=spec.name))
        observed = host.pools.get(spec.name) or host.partial.get(spec.name, Observed())
        note = host.unobservable.get(spec.name) or host.notes.get(spec.name)
        down = (downs or {}).get(spec.name)
        unread = Unread(host.unread_sessions, balancer=host.balancer_error is not None)
        pools.append(pool_status(spec, observed, record, note, now, down, unread))
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
        balancer_instances=host.balancer_instances,
    )


class Unread(Record, kw_only=False):
    """What this status could not read: some clones' sessions, the balancer's backends."""

    sessions: frozenset[str] = frozenset()
    balancer: bool = False


def pool_status(
    spec: PoolSpec,
    observed: Observed,
    record: PoolRecord,
    note: str | None,
    now: float,
    down: PoolDown | None = None,
    unread: Unread = Unread(),
) -> PoolStatus:
    seen = observed.by_name()
    target = observed.target_version
    if target is None:
        target = record.target_version
    names = sorted(set(seen) | set(record.clones), key=lambda n: _slot_of(n, seen, record))
    clones = tuple(
        clone_status(spec, seen.get(n), record.clones.get(n), now, target, record.rollout, unread)
        for n in names
    )
    existing = [c for c in clones if c.power is not None]  # what the host has
    return PoolStatus(
        name=spec.name,
        image=spec.image,
        version=observed.target_version,
        target_free=free_target(spec, now, record.arrivals),
        free=sum(1 for c in existing if c.state == CloneState.FREE),
        in_use=sum(1 for c in existing if c.state in IN_USE),
        total=len(existing),
        max=spec.max,
        failures=record.failures,
        breaker_open_until=record.breaker_open_until,
        note=note,
        clones=clones,
        going_down=None if down is None else ("now" if down.now else "as sessions end"),
        unknown=sum(1 for c in existing if c.state == UNKNOWN),
    )


def clone_status(
    spec: PoolSpec,
    seen: ObservedClone | None,
    record: CloneRecord | None,
    now: float,
    target_version: int | None = None,
    rollout: RolloutPolicy | None = None,
    unread: Unread = Unread(),
) -> CloneStatus:
    """One desktop. `target_version` is the version the pool rolls towards (as in the
    keeper's pass), so a desktop of an older version shows as retiring, not in use. What
    could not be read (`unread`) shows as unknown, never as a guess."""
    if seen is None:
        return _missing(record)
    if seen.name in unread.sessions or session_unread(spec, seen.session, record, now):
        state = UNKNOWN
    else:
        planned = classify(spec, seen, record, now, target_version=target_version, rollout=rollout)
        # free or booting rests on whether it is ready; a readiness read that did not answer
        # in time (ready None: a late guest agent reply) says neither
        state = UNKNOWN if seen.info.ready is None and planned in RESTS_ON_READY else str(planned)
    backend = seen.backend
    session = seen.session
    balancer = UNKNOWN if unread.balancer else str(backend.state) if backend else None
    return CloneStatus(
        name=seen.name,
        slot=seen.info.slot,
        version=seen.info.version,
        state=state,
        power=str(seen.info.power),
        display=str(seen.info.display) if seen.info.display else None,
        balancer=balancer,
        connections=backend.connections if backend else 0,
        client=session.client,
        users=session.users,
        since=session.connected_since,
        failures=record.failures if record else 0,
        started_by=str(seen.info.started_by) if seen.info.started_by else None,
        host=seen.info.host,
    )


def _missing(record: CloneRecord | None) -> CloneStatus:
    """A desktop the store remembers and the host does not have: being created, just deleted
    (the keeper forgets it next pass), or gone behind the keeper's back (deleted by hand, a
    host rebuilt): `missing`. None of them is a desktop anybody can use."""
    assert record is not None
    expected = (CloneState.CREATING, CloneState.DELETING)
    state = str(record.state) if record.state in expected else MISSING
    if record.lost_since is not None:
        state = UNSEEN  # its host is lost: it may still run there, in use
    return CloneStatus(
        name=record.name,
        slot=record.slot,
        version=record.version,
        state=state,
        power=None,
        display=None,
        balancer=None,
        connections=0,
        client=None,
        users=(),
        since=None,
        failures=record.failures,
        host=record.host,
    )


def _slot_of(name: str, seen: Mapping[str, ObservedClone], record: PoolRecord) -> int:
    if name in seen:
        return seen[name].info.slot
    return record.clones[name].slot


def to_json(snapshot: HostStatus) -> str:
    return json.dumps(schema.dump(snapshot), indent=2, sort_keys=False)
