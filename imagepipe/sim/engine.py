"""Discrete-event simulation of a day: logins, the keeper's passes, and the executor.

The keeper plans on every event (a login, a logoff, an operation finishing, a clone coming
up) and on a periodic tick, like `imagepipe keep`. The executor runs each clone's actions
in order, at most `parallel` hypervisor operations at a time; balancer and record actions
take no time. Time is kept here and injected into the planner: nothing sleeps.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import IntEnum
from zoneinfo import ZoneInfo

from imagepipe.pool.model import (
    Action,
    BackendState,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CloneRecord,
    CreateClone,
    DeleteClone,
    ForgetClone,
    PoolRecord,
    PoolSpec,
    Power,
    RecordClone,
    RecordPool,
    ResetClone,
    ResumeClone,
    StartClone,
    StopClone,
    SuspendClone,
)
from imagepipe.pool.planner import next_timer
from imagepipe.sim.policies import Policy
from imagepipe.sim.report import SimResult
from imagepipe.sim.trace import Login
from imagepipe.sim.world import Latencies, SimClone, World

DAY = 86400.0


@dataclass(frozen=True)
class SimSettings:
    latencies: Latencies = field(default_factory=Latencies)
    parallel: int = 4  # hypervisor operations at the same time (the keeper's default)
    tick: float = 15.0  # seconds between periodic keeper passes
    pass_gap: float = 2.0  # at least this long between passes: events in between are batched
    version: int = 1  # the image version the pool's channel resolves to


class _Kind(IntEnum):  # order within one instant: finished work first, then users
    DONE = 0
    BOOTED = 1
    LOGOFF = 2
    LOGIN = 3
    TICK = 4


@dataclass(frozen=True)
class _Event:
    at: float
    kind: _Kind
    seq: int
    login: Login | None = None
    clone: str = ""
    token: int = 0
    action: Action | None = None

    def __lt__(self, other: _Event) -> bool:
        return (self.at, self.kind, self.seq) < (other.at, other.kind, other.seq)


@dataclass
class _Waiting:
    login: Login
    since: float


@dataclass
class _Day:
    spec: PoolSpec
    policy: Policy
    settings: SimSettings
    epoch: float  # the simulated day's local midnight, as seconds since the epoch
    world: World
    events: list[_Event] = field(default_factory=list)
    seq: int = 0
    records: dict[str, CloneRecord] = field(default_factory=dict)
    pool: RecordPool | None = None
    busy: set[str] = field(default_factory=set)  # clones with an action chain in progress
    queue: deque[tuple[str, list[Action]]] = field(default_factory=deque)  # wait for a worker
    rest: dict[str, list[Action]] = field(default_factory=dict)  # after the running operation
    workers: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)
    waits: list[float] = field(default_factory=list)
    instant: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    passes: int = 0
    peak: int = 0
    quiet_until: float = 0.0  # after a pass with nothing to do: no timer fires before this

    # ---- events ----------------------------------------------------------------------

    def push(self, at: float, kind: _Kind, **values: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, _Event(at, kind, self.seq, **values))  # type: ignore[arg-type]

    @property
    def parallel(self) -> int:
        return self.policy.parallel or self.settings.parallel

    # ---- the keeper ------------------------------------------------------------------

    def keeper_pass(self, now: float) -> None:
        self.passes += 1
        pool = self.pool
        record = PoolRecord(
            pool=self.spec.name,
            clones=self.records,
            target_version=pool.target_version if pool else None,
            failures=pool.failures if pool else 0,
            breaker_open_until=pool.breaker_open_until if pool else None,
            rollout_started_at=pool.rollout_started_at if pool else None,
        )
        observed = replace(self.world.observe(), in_flight=frozenset(self.busy))
        actions = self.policy.plan(self.spec, observed, record, self.epoch + now)
        self.quiet_until = now
        if not actions:
            wake = next_timer(self.spec, record, self.epoch + now)
            self.quiet_until = float("inf") if wake is None else wake - self.epoch
        chains: dict[str, list[Action]] = {}
        for action in actions:
            if isinstance(action, RecordClone):
                self.records[action.clone] = action.record
            elif isinstance(action, ForgetClone):
                self.records.pop(action.clone, None)
            elif isinstance(action, RecordPool):
                self.pool = action
            else:
                chains.setdefault(action.clone, []).append(action)
        for clone, chain in chains.items():
            if clone not in self.busy:  # the real executor skips a clone still being worked on
                self.busy.add(clone)
                self.advance_chain(clone, chain, now)

    # ---- the executor ----------------------------------------------------------------

    def advance_chain(self, clone: str, chain: list[Action], now: float) -> None:
        while chain and isinstance(chain[0], BalancerEnable | BalancerDrain | BalancerRemove):
            self.balancer(chain.pop(0))
        if not chain:
            self.busy.discard(clone)
            return
        if self.workers >= self.parallel:
            self.queue.append((clone, chain))
            return
        self.workers += 1
        action = chain.pop(0)
        self.push(now + self.duration(action), _Kind.DONE, action=action, clone=clone)
        if chain:
            self.rest[clone] = chain

    def finish(self, action: Action, now: float) -> None:
        self.workers -= 1
        self.operations[action.kind] += 1
        self.apply(action, now)
        rest = self.rest.pop(action.clone, None)
        if rest is None:
            self.busy.discard(action.clone)
        else:
            self.advance_chain(action.clone, rest, now)
        while self.queue and self.workers < self.parallel:
            clone, chain = self.queue.popleft()
            self.advance_chain(clone, chain, now)

    def duration(self, action: Action) -> float:
        lat = self.settings.latencies
        durations: dict[type[Action], float] = {
            CreateClone: lat.clone,
            StartClone: lat.start,
            ResetClone: lat.reset,
            DeleteClone: lat.delete,
            SuspendClone: lat.suspend,
            ResumeClone: lat.resume,
            StopClone: lat.stop,
        }
        return durations.get(type(action), 0.0)

    def balancer(self, action: Action) -> None:
        self.operations[action.kind] += 1
        if isinstance(action, BalancerEnable):
            self.world.set_backend(action.clone, BackendState.READY)
        elif isinstance(action, BalancerDrain):
            if action.clone in self.world.backends:
                self.world.set_backend(action.clone, BackendState.DRAIN)
        else:
            self.world.set_backend(action.clone, None)

    def apply(self, action: Action, now: float) -> None:
        """The effect of a finished hypervisor operation (a missing clone: nothing)."""
        if isinstance(action, CreateClone):
            self.world.add(
                SimClone(
                    name=action.clone,
                    slot=action.slot,
                    version=action.version,
                    display=action.display,
                )
            )
            self.peak = max(self.peak, len(self.world.clones))
            return
        clone = self.world.clones.get(action.clone)
        if clone is None:
            return
        self.world.touch(clone)
        if isinstance(action, DeleteClone):
            self.world.remove(action.clone)
        elif isinstance(action, StartClone | ResetClone):
            if isinstance(action, ResetClone):  # what the executor tells the store
                clone.user = None
                kept = self.records.get(action.clone)
                if kept is not None and kept.dirty:
                    self.records[action.clone] = replace(kept, dirty=False)
            self.power(clone, Power.RUNNING)
            self.push(
                now + self.settings.latencies.boot,
                _Kind.BOOTED,
                clone=clone.name,
                token=clone.boot_id,
            )
        elif isinstance(action, ResumeClone):
            self.power(clone, Power.RUNNING)
            clone.ready = True
        elif isinstance(action, SuspendClone):
            self.power(clone, Power.SUSPENDED)
        elif isinstance(action, StopClone):
            self.power(clone, Power.SHUTOFF)

    @staticmethod
    def power(clone: SimClone, power: Power) -> None:
        clone.power = power
        clone.ready = False
        clone.boot_id += 1
        if power is not Power.RUNNING:
            clone.user = None

    # ---- users -----------------------------------------------------------------------

    def serve(self, now: float) -> None:
        if not self.waiting:
            return
        for clone in self.world.takers():
            if not self.waiting:
                return
            waiting = self.waiting.popleft()
            self.waits.append(now - waiting.since)
            self.instant += now == waiting.since
            self.log_in(clone, waiting.login, now)

    def log_in(self, clone: SimClone, login: Login, now: float) -> None:
        clone.user = login.user
        self.world.touch(clone)
        self.push(
            now + login.length, _Kind.LOGOFF, clone=clone.name, token=clone.boot_id, login=login
        )

    def log_off(self, event: _Event) -> None:
        clone = self.world.clones.get(event.clone)
        login = event.login
        if clone is None or login is None or clone.boot_id != event.token:
            return
        if clone.user == login.user:
            clone.user = None
            self.world.touch(clone)

    def booted(self, event: _Event) -> None:
        clone = self.world.clones.get(event.clone)
        if clone is not None and clone.boot_id == event.token and clone.power is Power.RUNNING:
            clone.ready = True
            self.world.touch(clone)


def day_epoch(spec: PoolSpec) -> float:
    """Local midnight of a fixed Monday (2024-01-08) in the pool's timezone."""
    return datetime(2024, 1, 8, tzinfo=ZoneInfo(spec.timezone)).timestamp()


def simulate_day(
    spec: PoolSpec, logins: list[Login], policy: Policy, settings: SimSettings = SimSettings()
) -> SimResult:
    """Run one day (longer if sessions run past midnight) and measure it."""
    day = _Day(
        spec=spec,
        policy=policy,
        settings=settings,
        epoch=day_epoch(spec),
        world=World(pool=spec.name, version=settings.version),
    )
    end = max([DAY] + [login.at + login.length + 3600.0 for login in logins])
    for login in logins:
        day.push(login.at, _Kind.LOGIN, login=login)
    ticks = int(end // settings.tick)
    for i in range(ticks + 1):
        day.push(i * settings.tick, _Kind.TICK)
    idle_seconds = 0.0
    idle_now = 0
    last = 0.0
    last_pass = -settings.pass_gap
    dirty = False
    deferred = False
    while day.events and day.events[0].at <= end:
        now = day.events[0].at
        idle_seconds += idle_now * (now - last)
        last = now
        woken = False
        while day.events and day.events[0].at == now:
            event = heapq.heappop(day.events)
            woken = woken or event.kind is not _Kind.TICK
            if event.kind is _Kind.DONE and event.action is not None:
                day.finish(event.action, now)
            elif event.kind is _Kind.BOOTED:
                day.booted(event)
            elif event.kind is _Kind.LOGOFF:
                day.log_off(event)
            elif event.kind is _Kind.LOGIN and event.login is not None:
                day.waiting.append(_Waiting(event.login, now))
        day.serve(now)
        dirty = dirty or woken
        if now < last_pass + settings.pass_gap:
            if dirty and not deferred:
                day.push(last_pass + settings.pass_gap, _Kind.TICK)
                deferred = True
        elif dirty or now >= day.quiet_until:  # else nothing can change: skip the tick
            day.keeper_pass(now)
            day.serve(now)
            last_pass, dirty, deferred = now, False, False
        idle_now = day.world.idle()
    for waiting in day.waiting:
        day.waits.append(end - waiting.since)
    return SimResult(
        policy=policy.name,
        logins=len(logins),
        instant=day.instant,
        waits=tuple(sorted(day.waits)),
        never_served=len(day.waiting),
        idle_desktop_hours=idle_seconds / 3600.0,
        peak_clones=day.peak,
        operations=dict(day.operations),
        simulated_seconds=end,
        passes=day.passes,
    )
