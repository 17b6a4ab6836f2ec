"""Discrete-event simulation of days: logins, the keeper's passes, and the executor.

The keeper plans on every event (a login, a logoff, an operation finishing, a clone coming
up) and on a periodic tick, like `imagepipe keep`. The executor runs each clone's actions
in order, at most `parallel` hypervisor operations at a time; balancer and record actions
take no time. Time is kept here and injected into the planner: nothing sleeps.

Several days run back to back on the same host (the clones of one evening are there the next
morning). Like the keeper, the simulation records every login by time of week and, for a
pool that learns, hands the planner what the past days taught (planner/forecast.py).
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from imagepipe.pool.actions import (
    Action,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    ResetClone,
    ResumeClone,
    StartClone,
    StopClone,
    SuspendClone,
)
from imagepipe.pool.model import (
    Arrivals,
    BackendState,
    CloneRecord,
    CloneState,
    LoginHistory,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.planner import logins_in
from imagepipe.pool.planner.forecast import BUCKET, day_and_bucket, learn, zone
from imagepipe.record import replace
from imagepipe.sim.policies import Policy
from imagepipe.sim.replan import Replanner
from imagepipe.sim.report import SimResult, SimRun
from imagepipe.sim.timeline import Sample, Timeline
from imagepipe.sim.trace import Login
from imagepipe.sim.world import Latencies, SimClone, Start, World

DAY = 86400.0


@dataclass(frozen=True)
class SimSettings:
    latencies: Latencies = field(default_factory=Latencies)
    parallel: int = 4  # hypervisor operations at the same time (the keeper's default)
    tick: float = 15.0  # seconds between periodic keeper passes
    pass_gap: float = 2.0  # at least this long between passes: events in between are batched
    version: int = 1  # the image version the pool's channel resolves to
    start: Start | None = None  # how new and recycled desktops come up; None: the pool's
    sample: float | None = None  # record a Timeline sample this often (seconds); None: none


class _Kind(IntEnum):  # order within one instant: finished work first, then users
    DONE = 0
    BOOTED = 1
    LOGOFF = 2
    LOGIN = 3
    TICK = 4


@dataclass(slots=True)
class _Event:  # not frozen: a day makes some 10^4 of them, and a frozen one is slower to build
    at: float
    kind: _Kind
    seq: int
    login: Login | None = None
    clone: str = ""
    token: int = 0
    action: Action | None = None
    restored: bool = False  # a start or reset that restores the warm parent
    day: int = 0  # the simulated day a login belongs to


@dataclass
class _Waiting:
    login: Login
    since: float
    day: int


@dataclass
class _Stats:
    """What one simulated day measured (logins by the day they arrive)."""

    logins: int = 0
    waits: list[float] = field(default_factory=list)
    instant: int = 0
    never_served: int = 0
    idle_seconds: float = 0.0
    peak: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    passes: int = 0


@dataclass
class _Day:
    spec: PoolSpec
    policy: Policy
    settings: SimSettings
    epoch: float  # the simulated day's local midnight, as seconds since the epoch
    world: World
    replanner: Replanner  # plan() for this pool, told every record written here
    # a heap of (at, kind, seq, event): tuples compare without calling back into Python
    events: list[tuple[float, int, int, _Event]] = field(default_factory=list)
    seq: int = 0
    records: dict[str, CloneRecord] = field(default_factory=dict)
    pool: RecordPool | None = None
    busy: set[str] = field(default_factory=set)  # clones with an action chain in progress
    queue: deque[tuple[str, list[Action]]] = field(default_factory=deque)  # wait for a worker
    rest: dict[str, list[Action]] = field(default_factory=dict)  # after the running operation
    workers: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)
    stats: list[_Stats] = field(default_factory=lambda: [_Stats()])
    quiet_until: float = 0.0  # after a pass with nothing to do: no timer fires before this
    history: dict[int, dict[int, int]] = field(default_factory=dict)  # day -> bucket -> n
    arrivals: Arrivals | None = None  # what the history taught, for the day `learned_on`
    learned_on: int | None = None
    parent_ready: float = float("inf")  # when the warm parent can be restored (start: restore)
    arrived: int = 0  # logins so far (for the timeline)
    waited: int = 0  # logins served after a wait so far (for the timeline)
    samples: list[Sample] = field(default_factory=list)
    # what is asked again and again between two changes, kept until they change:
    _today: tuple[float, float, _Stats] | None = None  # the stats of [from, until)
    _in_flight: frozenset[str] | None = None  # `busy` as observed (None: busy changed)
    _record: PoolRecord | None = None  # the keeper's view of the store (`records` is live)
    _record_of: RecordPool | None = None  # the pool record `_record` was made of
    local_bucket: LocalBuckets = field(init=False)  # the pool's day_and_bucket, kept

    def __post_init__(self) -> None:
        self.local_bucket = LocalBuckets(self.spec.timezone)

    def today(self, now: float) -> _Stats:
        kept = self._today
        if kept is not None and kept[0] <= now < kept[1]:
            return kept[2]
        last = len(self.stats) - 1
        index = min(max(int(now // DAY), 0), last)
        since = -float("inf") if index == 0 else index * DAY
        until = float("inf") if index == last else (index + 1) * DAY
        self._today = (since, until, self.stats[index])
        return self.stats[index]

    def in_flight(self) -> frozenset[str]:
        """The clones with an action chain in progress, as the keeper observes them."""
        if self._in_flight is None:
            self._in_flight = frozenset(self.busy)
        return self._in_flight

    def record(self) -> PoolRecord:
        """What the keeper reads from the store: the clone records (the live `records`),
        the pool's record and what the history taught."""
        pool, kept = self.pool, self._record
        if kept is not None and kept.arrivals is self.arrivals and self._record_of is pool:
            return kept
        self._record_of = pool
        self._record = PoolRecord(
            pool=self.spec.name,
            clones=self.records,
            target_version=pool.target_version if pool else None,
            failures=pool.failures if pool else 0,
            breaker_open_until=pool.breaker_open_until if pool else None,
            rollout_started_at=pool.rollout_started_at if pool else None,
            arrivals=self.arrivals,
        )
        return self._record

    # ---- events ----------------------------------------------------------------------

    def push(self, at: float, kind: _Kind, **values: object) -> None:
        self.seq += 1
        event = _Event(at, kind, self.seq, **values)  # type: ignore[arg-type]
        heapq.heappush(self.events, (at, kind, self.seq, event))

    @property
    def parallel(self) -> int:
        return self.policy.parallel or self.settings.parallel

    # ---- the keeper ------------------------------------------------------------------

    def keeper_pass(self, now: float) -> None:
        self.today(now).passes += 1
        at = self.epoch + now
        if self.spec.learn is not None:
            day = self.local_bucket(at)[0]
            if day != self.learned_on:
                self.arrivals = learn(LoginHistory(BUCKET, self.history), day)
                self.learned_on = day
        record = self.record()
        observed = self.world.observe(in_flight=self.in_flight())
        actions = self.policy.plan(self.spec, observed, record, at, self.replanner)
        arrived = logins_in(record, actions)  # what the keeper writes to the store
        if arrived:  # the keeper's login history, by local day and bucket
            day, bucket = self.local_bucket(at)
            counts = self.history.setdefault(day, {})
            counts[bucket] = counts.get(bucket, 0) + arrived
        self.quiet_until = now
        if not actions:
            wake = self.replanner.next_timer(self.spec, record, self.epoch + now)
            self.quiet_until = float("inf") if wake is None else wake - self.epoch
        chains: dict[str, list[Action]] = {}
        for action in actions:
            if isinstance(action, RecordClone):
                self.records[action.clone] = action.record
                self.replanner.written.add(action.clone)
            elif isinstance(action, ForgetClone):
                self.records.pop(action.clone, None)
                self.replanner.written.add(action.clone)
            elif isinstance(action, RecordPool):
                self.pool = action
            else:
                chains.setdefault(action.clone, []).append(action)
        for clone, chain in chains.items():
            if clone not in self.busy:  # the real executor skips a clone still being worked on
                self.busy.add(clone)
                self._in_flight = None
                self.advance_chain(clone, chain, now)

    # ---- the executor ----------------------------------------------------------------

    def advance_chain(self, clone: str, chain: list[Action], now: float) -> None:
        while chain and isinstance(chain[0], _BALANCER):
            self.balancer(chain.pop(0), now)
        if not chain:
            self.busy.discard(clone)
            self._in_flight = None
            return
        if self.workers >= self.parallel:
            self.queue.append((clone, chain))
            return
        self.workers += 1
        action = chain.pop(0)
        restored = self.restores(action, now)
        took = self.settings.latencies.restore if restored else self.duration(action)
        self.push(now + took, _Kind.DONE, action=action, clone=clone, restored=restored)
        if chain:
            self.rest[clone] = chain

    @property
    def start(self) -> Start:
        """How desktops come up: as the settings override, else as the pool file says."""
        return self.spec.start if self.settings.start is None else self.settings.start

    def restores(self, action: Action, now: float) -> bool:
        """A start or reset restores the warm parent (start: restore, once it exists)."""
        return (
            self.start is Start.RESTORE
            and isinstance(action, StartClone | ResetClone)
            and now >= self.parent_ready
        )

    def finish(self, action: Action, now: float, restored: bool = False) -> None:
        self.workers -= 1
        self.today(now).operations[action.kind] += 1
        self.apply(action, now, restored)
        rest = self.rest.pop(action.clone, None)
        if rest is None:
            self.busy.discard(action.clone)
            self._in_flight = None
        else:
            self.advance_chain(action.clone, rest, now)
        while self.queue and self.workers < self.parallel:
            clone, chain = self.queue.popleft()
            self.advance_chain(clone, chain, now)

    def duration(self, action: Action) -> float:
        return _durations(self.settings.latencies).get(type(action), 0.0)

    def balancer(self, action: Action, now: float) -> None:
        self.today(now).operations[action.kind] += 1
        if isinstance(action, BalancerEnable):
            self.world.set_backend(action.clone, BackendState.READY)
        elif isinstance(action, BalancerDrain):
            if action.clone in self.world.backends:
                self.world.set_backend(action.clone, BackendState.DRAIN)
        else:
            self.world.set_backend(action.clone, None)

    def apply(self, action: Action, now: float, restored: bool = False) -> None:
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
            stats = self.today(now)
            stats.peak = max(stats.peak, len(self.world.clones))
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
                    self.replanner.written.add(action.clone)
            self.power(clone, Power.RUNNING)
            if restored:  # the restored guest runs on from where its parent was ready
                clone.ready = True
                return
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
        if power is not _RUNNING:
            clone.user = None

    # ---- users -----------------------------------------------------------------------

    def serve(self, now: float) -> None:
        if not self.waiting:
            return
        for clone in self.world.takers(len(self.waiting)):
            if not self.waiting:
                return
            waiting = self.waiting.popleft()
            stats = self.stats[waiting.day]
            stats.waits.append(now - waiting.since)
            stats.instant += now == waiting.since
            self.waited += now != waiting.since
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
        if clone is not None and clone.boot_id == event.token and clone.power is _RUNNING:
            clone.ready = True
            self.world.touch(clone)

    # ---- the timeline ----------------------------------------------------------------

    def sample(self, at: float, idle_now: int, since: float) -> None:
        """The state at `at`, unchanged since the events at `since` (idle: `idle_now`)."""
        idle = sum(day.idle_seconds for day in self.stats) + idle_now * (at - since)
        starting = sum(r.state in _STARTING for r in self.records.values())
        self.samples.append(
            Sample(
                at=at,
                arrived=self.arrived,
                in_use=sum(c.user is not None for c in self.world.clones.values()),
                free_ready=self.world.taker_count(),
                starting=starting,
                waiting=len(self.waiting),
                waited=self.waited + len(self.waiting),
                idle_hours=idle / 3600.0,
            )
        )


_STARTING = (CloneState.CREATING, CloneState.BOOTING)
# Enum members read on every event or pass, named once: Python 3.11 reads a member through
# its class (`Power.RUNNING`) on EnumType.__getattr__'s slow path, some 15 times slower.
_DONE, _BOOTED, _LOGOFF, _LOGIN = _Kind.DONE, _Kind.BOOTED, _Kind.LOGOFF, _Kind.LOGIN
_TICK = _Kind.TICK
_RUNNING = Power.RUNNING
_BALANCER = (BalancerEnable, BalancerDrain, BalancerRemove)


@lru_cache(maxsize=16)
def _durations(lat: Latencies) -> dict[type[Action], float]:
    """How long each hypervisor operation takes (read-only)."""
    return {
        CreateClone: lat.clone,
        StartClone: lat.start,
        ResetClone: lat.reset,
        DeleteClone: lat.delete,
        SuspendClone: lat.suspend,
        ResumeClone: lat.resume,
        StopClone: lat.stop,
    }


_CLOCK_ROUNDING = 1e-3  # seconds: a local clock reading rounds to microseconds


@dataclass
class LocalBuckets:
    """day_and_bucket(at, timezone), asked at every keeper pass: computed again only once
    `at` leaves the span it was last computed for, the rest of its bucket on the local
    clock while the zone keeps its UTC offset (no zone changes its offset twice within one
    bucket). A moment within a millisecond of the bucket's end is computed again."""

    timezone: str
    _kept: tuple[float, float, tuple[int, int]] | None = None  # [from, until), the value

    def __call__(self, at: float) -> tuple[int, int]:
        kept = self._kept
        if kept is not None and kept[0] <= at < kept[1]:
            return kept[2]
        value = day_and_bucket(at, self.timezone)
        tz = zone(self.timezone)
        local = datetime.fromtimestamp(at, tz)
        into = (local.hour * 3600 + local.minute * 60 + local.second) % BUCKET
        until = at - into - local.microsecond / 1e6 + BUCKET - _CLOCK_ROUNDING
        if datetime.fromtimestamp(until, tz).utcoffset() != local.utcoffset():
            until = at  # the offset changes within the bucket: nothing kept
        self._kept = (at, until, value)
        return value


def day_epoch(spec: PoolSpec) -> float:
    """Local midnight of a fixed Monday (2024-01-08) in the pool's timezone."""
    return datetime(2024, 1, 8, tzinfo=ZoneInfo(spec.timezone)).timestamp()


def simulate_day(
    spec: PoolSpec, logins: list[Login], policy: Policy, settings: SimSettings = SimSettings()
) -> SimResult:
    """Run one day (longer if sessions run past midnight) and measure it."""
    return simulate(spec, [logins], policy, settings).total


def simulate(
    spec: PoolSpec,
    days: list[list[Login]],
    policy: Policy,
    settings: SimSettings = SimSettings(),
    label: str | None = None,
) -> SimRun:
    """Run the days back to back, day i's logins `i` days after the first midnight (a Monday),
    and measure each day and all of them."""
    if not days:
        raise ValueError("simulate needs at least one day of logins")
    world = World(pool=spec.name, version=settings.version)
    run = _Day(
        spec=spec,
        policy=policy,
        settings=settings,
        epoch=day_epoch(spec),
        world=world,
        replanner=Replanner(world),
        stats=[_Stats() for _ in days],
    )
    if run.start is Start.RESTORE:  # the keeper makes the version's warm parent first
        lat = settings.latencies
        run.parent_ready = lat.start + lat.boot + lat.save
    end = float(len(days)) * DAY
    for index, logins in enumerate(days):
        run.stats[index].logins = len(logins)
        for login in logins:
            at = index * DAY + login.at
            end = max(end, at + login.length + 3600.0)
            run.push(at, _Kind.LOGIN, login=login, day=index)
    ticks = int(end // settings.tick)  # the periodic ticks 0..ticks: the next one is kept
    tick = 0  # here rather than in the heap, which stays small (the order is the same: a
    tick_at = 0.0  # tick comes last in its instant, and any two ticks do the same)
    idle_now = 0
    last = 0.0
    last_pass = -settings.pass_gap
    dirty = False
    deferred = False
    step = settings.sample
    sample_at = 0.0 if step else float("inf")
    while (run.events and run.events[0][0] <= end) or tick <= ticks:
        now = min(run.events[0][0], tick_at) if run.events else tick_at
        if now > end:
            break
        while step and sample_at < now:
            run.sample(sample_at, idle_now, last)
            sample_at += step
        _count_idle(run, idle_now, last, now)
        last = now
        woken = False
        while run.events and run.events[0][0] == now:
            event = heapq.heappop(run.events)[3]
            kind = event.kind
            woken = woken or kind is not _TICK
            if kind is _DONE and event.action is not None:
                run.finish(event.action, now, event.restored)
            elif kind is _BOOTED:
                run.booted(event)
            elif kind is _LOGOFF:
                run.log_off(event)
            elif kind is _LOGIN and event.login is not None:
                run.waiting.append(_Waiting(event.login, now, event.day))
                run.arrived += 1
        if now == tick_at:
            tick += 1
            tick_at = tick * settings.tick if tick <= ticks else float("inf")
        run.serve(now)
        dirty = dirty or woken
        if now < last_pass + settings.pass_gap:
            if dirty and not deferred:
                run.push(last_pass + settings.pass_gap, _Kind.TICK)
                deferred = True
        elif dirty or now >= run.quiet_until:  # else nothing can change: skip the tick
            run.keeper_pass(now)
            run.serve(now)
            last_pass, dirty, deferred = now, False, False
        idle_now = run.world.idle()
        stats = run.today(now)
        stats.peak = max(stats.peak, len(run.world.clones))
    while step and sample_at <= end:
        run.sample(sample_at, idle_now, last)
        sample_at += step
    _count_idle(run, idle_now, last, end)
    for waiting in run.waiting:
        run.stats[waiting.day].waits.append(end - waiting.since)
        run.stats[waiting.day].never_served += 1
    name = label or policy.name
    last_day = len(days) - 1
    results = tuple(
        _result(name, [stats], DAY if i < last_day else end - i * DAY)
        for i, stats in enumerate(run.stats)
    )
    timeline = None
    if step:
        timeline = Timeline(step, run.epoch, spec.timezone, tuple(run.samples))
    return SimRun(policy=name, days=results, total=_result(name, run.stats, end), timeline=timeline)


def _count_idle(run: _Day, idle: int, since: float, until: float) -> None:
    """Idle desktop-seconds from `since` to `until`, on the days they fall in."""
    kept = run._today  # the usual case: both in the day last asked for
    if kept is not None and kept[0] <= since and until <= kept[1] and since < until:
        kept[2].idle_seconds += idle * (until - since)
        return
    while since < until:
        day = min(int(since // DAY), len(run.stats) - 1)
        edge = until if day == len(run.stats) - 1 else min(until, (day + 1) * DAY)
        run.stats[day].idle_seconds += idle * (edge - since)
        since = edge


def _result(policy: str, stats: list[_Stats], seconds: float) -> SimResult:
    operations: Counter[str] = Counter()
    for day in stats:
        operations.update(day.operations)
    return SimResult(
        policy=policy,
        logins=sum(day.logins for day in stats),
        instant=sum(day.instant for day in stats),
        waits=tuple(sorted(w for day in stats for w in day.waits)),
        never_served=sum(day.never_served for day in stats),
        idle_desktop_hours=sum(day.idle_seconds for day in stats) / 3600.0,
        peak_clones=max(day.peak for day in stats),
        operations=dict(operations),
        simulated_seconds=seconds,
        passes=sum(day.passes for day in stats),
    )
