"""The keeper: observe → plan → execute, for every pool, again and again.

Level-triggered: each pass reconciles everything the hypervisor and the balancer report
with what the pools want; hypervisor events (a client connects, a guest powers off) only
make the next pass come sooner, so a missed event costs one tick, never correctness.

On start it finishes or undoes what a previous keeper left half done (the journal), and it
adopts clones the store does not know (a lost or older store): the planner rebuilds their
records from the clones' own metadata and their observed sessions, so a clone in use is
never mistaken for a free one. stop() (SIGTERM, Ctrl-C) starts no new action, lets the
actions in flight finish, and returns; running desktops keep running.

Several keepers on one shared store (`lead`, imagepipe/app/leadership.py): only the leader
passes. Each term (an epoch of the lease) writes through a store handle fenced with that
epoch and starts by recovering the journal after observing the host, so it finishes or
undoes what the previous leader left in flight. The executor starts an action only while
the term lasts; a write refused by the fence (FencedError) ends the term at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from imagepipe.errors import FencedError, ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.actions import Action, CreateClone, ForgetClone, RecordClone, RecordPool
from imagepipe.pool.executor import ExecutionReport, Executor, ExecutorSettings
from imagepipe.pool.hosts import HostPass, ensure_of, host_pass
from imagepipe.pool.learning import Learned, learned
from imagepipe.pool.model import (
    Backend,
    BaseImage,
    CloneInfo,
    CloneState,
    HostSpec,
    HostState,
    Observed,
    OnLogoff,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.observe import HostObservation, belongs_to, observe
from imagepipe.pool.planner import failures_after, logins_in, next_timer, plan
from imagepipe.pool.planner.failures import HostBreaker, counts_against_pool, host_breaker_after
from imagepipe.pool.planner.forecast import BUCKET, HISTORY_DAYS, day_and_bucket
from imagepipe.pool.ports import (
    Balancer,
    Channels,
    Clock,
    EventKind,
    Hypervisor,
    HypervisorEvent,
    Images,
    Notifier,
)
from imagepipe.pool.rollout.driver import RolloutDriver
from imagepipe.pool.store import Store
from imagepipe.pool.teardown import plan_down
from imagepipe.record import replace

log = logging.getLogger(__name__)

FOLLOW_UP = 0.5  # seconds before the pass that follows one which changed the host
TIMER_SLACK = 0.05  # wake just after a timer falls due, not just before
QUICK_PASSES = 10  # at most this many quick passes in a row, so a plan that never settles
# (say, a balancer that accepts a change but never shows it) costs a tick, not a busy loop
_MEMORY = (RecordClone, ForgetClone, RecordPool)  # actions that only write the store


@dataclass(frozen=True)
class KeeperOptions:
    tick: float = 5.0  # seconds between passes when nothing happens
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


@dataclass(frozen=True)
class PassReport:
    at: float
    actions: tuple[Action, ...] = ()
    execution: ExecutionReport = field(default_factory=ExecutionReport)
    observation: HostObservation = field(default_factory=HostObservation)
    adopted: tuple[str, ...] = ()  # clones whose records were rebuilt from metadata
    not_planned: Mapping[str, str] = field(default_factory=dict)  # pool -> why
    notes: Mapping[str, str] = field(default_factory=dict)  # pool -> why it makes no clones
    hosts: tuple[HostState, ...] = ()  # several hosts: each one's state (lost since when)
    host_breakers: Mapping[str, float] = field(default_factory=dict)  # open ones -> until

    @property
    def ok(self) -> bool:
        return self.execution.ok and not self.not_planned


class KeeperHooks(Protocol):
    """What a service around the keeper does between passes (systemd notify, reload,
    metrics: imagepipe/app/service.py). Called from the keeper's own loop."""

    def before_pass(self, keeper: Keeper) -> None: ...

    def observed(self, keeper: Keeper, host: HostObservation) -> None:
        """The pass has observed the host (before it plans and acts)."""

    def after_pass(self, keeper: Keeper, report: PassReport | None, seconds: float) -> None:
        """`report` None: the pass failed as a whole (logged). `seconds`: how long it took."""


class Lead(Protocol):
    """Whether this keeper leads (imagepipe/app/leadership.py Election)."""

    def term(self) -> int | None:
        """The epoch to act under, or None while this keeper must not act."""
        ...

    def fenced(self, error: FencedError) -> None:
        """A write under the term's epoch was refused: step down."""
        ...

    def working(self, busy: bool) -> None:
        """The keeper's loop is alive: busy in a pass and making progress now, or waiting
        for the next pass. A pass that shows no progress for too long is wedged: its keeper
        must not go on leading."""
        ...


class NoHooks:
    def before_pass(self, keeper: Keeper) -> None:
        pass

    def observed(self, keeper: Keeper, host: HostObservation) -> None:
        pass

    def after_pass(self, keeper: Keeper, report: PassReport | None, seconds: float) -> None:
        pass


class Keeper:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        balancer: Balancer,
        store: Store,
        images: Images,
        specs: Sequence[PoolSpec],
        clock: Clock,
        settings: KeeperOptions = KeeperOptions(),
        other_pools: Sequence[str] = (),
        hooks: KeeperHooks | None = None,
        channels: Channels | None = None,
        hosts: Sequence[HostSpec] = (),
    ) -> None:
        """`specs`: the pools to keep. `other_pools`: configured pools another keeper looks
        after (`keep --pool`); their clones are left alone and not reported as strays.
        `channels`: the registry's channels, for a rollout's automatic rollback.
        `hosts`: several hosts (settings `hosts:`); empty: the hypervisor's one host."""
        self.hypervisor = hypervisor
        self.balancer = balancer
        self.store = store
        self._shared_store = store  # unfenced; each term writes through store.fenced(epoch)
        self.images = images
        self.specs = {s.name: s for s in specs}
        self.host_specs = tuple(hosts)
        self._lost_reported: set[str] = set()  # lost hosts already logged
        # each host's circuit breaker (planner/failures.py HostBreaker), kept by this keeper
        self._host_breakers: dict[str, HostBreaker] = {}
        self.other_pools = tuple(other_pools)
        self.clock = clock
        self.settings = settings
        self.executor = Executor(hypervisor, balancer, store, self._base, clock, settings.executor)
        self.rollouts = RolloutDriver(
            store,
            tick=settings.tick,
            channels=channels,
            notifier=hypervisor if isinstance(hypervisor, Notifier) else None,
        )
        self._wake = threading.Event()
        self._touched: set[str] = set()  # clones a client connected to since the last pass
        self._touched_lock = threading.Lock()
        self._stopping = threading.Event()
        self._recovered = False
        self._strays_reported: set[str] = set()
        self._quick_passes = 0  # quick passes in a row (see next_wait)
        self._notes_reported: dict[str, str] = {}  # pool -> the reason last logged
        self.hooks: KeeperHooks = hooks or NoHooks()
        self.lead: Lead | None = None  # None: the only keeper of its store, always acting
        self._term: int | None = None  # the epoch this keeper acts under while it leads
        self.executor.gate = self.may_act
        self.executor.alive = self._alive
        self._busy = False  # in a pass (run or pass_if_leading), for the lead's progress
        self._learned: dict[str, tuple[int, Learned]] = {}  # pool -> (day, what it taught)
        # the records this pass read, while nothing has written any since (next_wait)
        self._records: dict[str, PoolRecord] = {}

    # ---- control ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop soon: no new actions; those in flight finish; desktops keep running.
        Safe to call from a signal handler or another thread."""
        self._stopping.set()
        self.executor.stop()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        """Make the next pass start now."""
        self._wake.set()

    def reconfigure(
        self, specs: Sequence[PoolSpec], other_pools: Sequence[str], settings: KeeperOptions
    ) -> None:
        """Keep these pools from the next pass on (a reload); call between passes."""
        self.specs = {s.name: s for s in specs}
        self.other_pools = tuple(other_pools)
        self.settings = settings
        self.executor.settings = settings.executor
        self._records = {}

    def run(self) -> None:
        """Pass after pass until stop(); woken early by hypervisor events."""
        subscription = self.hypervisor.subscribe(self.on_event)
        log.info(
            "keeper started",
            extra=fields(pools=",".join(self.specs) or "none", tick=self.settings.tick),
        )
        failing: str | None = None  # the error every pass has failed with, said once
        try:
            while not self.stopping:
                self._wake.clear()
                if not self._begin_term():
                    self._wake.wait(self.settings.tick)
                    continue
                self._progress()
                self.hooks.before_pass(self)
                began = time.monotonic()
                try:
                    report: PassReport | None = self.run_pass()
                except FencedError as exc:
                    self._fenced(exc)
                    report = None
                except ImagepipeError as exc:
                    if str(exc) == failing:
                        log.debug("pass failed again; retrying next tick")
                    else:
                        log.error("pass failed; retrying next tick", extra=fields(error=str(exc)))
                    failing, report = str(exc), None
                else:
                    if failing is not None:
                        log.info("passes work again", extra=fields(after_error=failing))
                        failing = None
                self.hooks.after_pass(self, report, time.monotonic() - began)
                if not self.stopping:
                    wait = self.settings.tick if report is None else self.next_wait(report)
                    self._progress(busy=False)
                    self._wake.wait(wait)
        finally:
            subscription.close()
            with contextlib.suppress(ImagepipeError):
                self.rollouts.stopped(self.clock.now())
            log.info("keeper stopped; running desktops keep running")

    def pass_if_leading(self) -> PassReport | None:
        """One pass if this keeper leads; None when it does not, or when the fence refused
        one of its writes (it has stepped down)."""
        if not self._begin_term():
            return None
        self._progress()
        try:
            return self.run_pass()
        except FencedError as exc:
            self._fenced(exc)
            return None
        finally:
            self._progress(busy=False)

    def _progress(self, *, busy: bool = True) -> None:
        """Tell the lead that this keeper's loop is alive (see Lead.working)."""
        self._busy = busy
        if self.lead is not None:
            self.lead.working(busy)

    def _alive(self) -> None:
        """The executor waits for actions: a pass in progress is not wedged."""
        if self._busy:
            self._progress()

    def may_act(self) -> bool:
        """Whether an action may start now: always for the only keeper of a store; for one
        of several, while the term it passes under lasts."""
        return self.lead is None or (self._term is not None and self.lead.term() == self._term)

    def _begin_term(self) -> bool:
        """Before a pass: whether this keeper leads. A new term writes through a store handle
        fenced with its epoch and recovers the journal in its first pass (after observing
        the host), as a restarted keeper does."""
        if self.lead is None:
            return True
        term = self.lead.term()
        if term is None:
            self._term = None
            return False
        if term != self._term:
            self._use_store(self._shared_store.fenced(term))
            self._term = term
            self._recovered = False
            log.info(
                "taking over: observing the host and the journal first", extra=fields(epoch=term)
            )
        return True

    def _use_store(self, store: Store) -> None:
        self.store = store
        self.executor.store = store
        self.rollouts.store = store

    def _fenced(self, error: FencedError) -> None:
        """A write was refused by the fence: this keeper leads no more; the pass stopped
        where the write was refused (nothing after it was done)."""
        self._term = None
        if self.lead is not None:
            self.lead.fenced(error)
        else:
            log.error("write refused by the leader lease", extra=fields(error=str(error)))

    def next_wait(self, report: PassReport) -> float:
        """How long to sleep after this pass unless an event comes first.

        A pass that changed something on the host is followed almost at once: a clone it
        created is started, one it started is put in the balancer, without waiting a tick.
        Otherwise sleep until the soonest planner timer (a recycle, disconnect, shrink or
        retry falling due), and never longer than a tick. Failed actions never cause a quick
        pass: their retry is timed by the planner's backoff."""
        changed = any(o.ok and not isinstance(o.action, _MEMORY) for o in report.execution.outcomes)
        if changed and self._quick_passes < QUICK_PASSES:
            self._quick_passes += 1
            return min(FOLLOW_UP, self.settings.tick)
        self._quick_passes = 0
        now = self.clock.now()
        wait = self.settings.tick
        for spec in self.specs.values():
            due = next_timer(spec, self.rollouts.record(spec, self._record(spec, now)), now)
            if due is not None:
                wait = min(wait, due - now + TIMER_SLACK)
        due = self.rollouts.next_due(now)
        if due is not None:
            wait = min(wait, due - now + TIMER_SLACK)
        return max(wait, 0.0)

    # ---- one pass --------------------------------------------------------------------

    def recover(self) -> None:
        """Finish or undo what a previous keeper left open (run once, before the first pass)."""
        self.executor.recover()
        self._recovered = True

    def run_pass(self) -> PassReport:
        if not self._recovered:
            self.recover()
            self._alive()
        now = self.clock.now()
        # the heartbeat and every read the pass plans with: one round trip to a shared store
        state = self.store.begin_pass(
            self.rollouts.heartbeat(now, self.host_breakers(now)), list(self.specs)
        )
        self.rollouts.load(state.rollouts)
        with self._touched_lock:
            touched = frozenset(self._touched)
        self._ensure_frontend()
        records = {
            name: self._learn(spec, state.records[name], now) for name, spec in self.specs.items()
        }
        self._records = dict(records)
        host = observe(
            self.hypervisor,
            self.balancer,
            self.images,
            list(self.specs.values()),
            also_configured=self.other_pools,
            # several hosts: read only the sessions that can have changed, in parallel
            unchanged=self._unchanged(records, touched) if self.host_specs else None,
            parallel=max(self.settings.executor.parallel, len(self.host_specs))
            if self.host_specs
            else 1,
            progress=self._alive,  # each host call that returns: the pass is not wedged
        )
        self.hooks.observed(self, host)
        self._report_strays(host)
        self._report_notes(host)
        actions: list[Action] = []
        adopted: list[str] = []
        arrived: dict[str, tuple[int, str]] = {}  # pool -> (logins, its timezone)
        not_planned = dict(host.unobservable)
        hosts = self._hosts(host, state.draining)
        placed: dict[str, Observed] = {}  # several hosts: each pool with its hosts' rooms
        for spec in self.specs.values():
            observed = host.pools.get(spec.name)
            if observed is None:
                continue
            observed = replace(
                observed, in_flight=self.executor.in_flight(spec.name), touched=touched
            )
            if hosts is not None:
                observed = placed[spec.name] = self._placement(hosts, spec, observed)
            record = self.rollouts.record(spec, records[spec.name])
            down = state.down.get(spec.name)
            if down is not None:  # being taken down: its own rule (pool/teardown.py)
                actions += plan_down(spec, observed, record, down, now)
                continue
            adopted += self._adopted(spec, observed, record)
            planned = plan(spec, observed, record, now)
            if hosts is not None:
                hosts.placed(spec, planned)
            arrived[spec.name] = (logins_in(record, planned), spec.timezone)
            actions += planned
        if self.stopping:
            return PassReport(at=now, observation=host, adopted=tuple(adopted))
        if actions:
            self._records = {}  # the records change: read them again after the actions
        execution = self.executor.run(self.specs, actions)  # records first: touched is written
        with self._touched_lock:  # forgotten only once its pool was planned (its record dirty)
            self._touched -= {n for n in touched if any(belongs_to(p, n) for p in host.pools)}
        self._record_failures(execution)
        self._record_logins(arrived, now)
        later = self.clock.now()
        judged = replace(host, pools={**host.pools, **placed})  # rollouts see uploads too
        if self.rollouts.after_pass(
            self.specs, judged, lambda spec: self._record(spec, later), later
        ):
            self._records = {}  # a rollout rolled back writes the pool's record
        log.debug(
            "pass done",
            extra=fields(
                pools=len(self.specs),
                actions=len(actions),
                failed=len(execution.failed),
                skipped=len(execution.skipped),
                adopted=len(adopted) or None,
            ),
        )
        return PassReport(
            at=now,
            actions=tuple(actions),
            execution=execution,
            observation=host,
            adopted=tuple(adopted),
            not_planned=not_planned,
            notes=dict(host.notes),
            hosts=tuple(hosts.states.values()) if hosts is not None else (),
            host_breakers=self.host_breakers(later),
        )

    def _unchanged(
        self, records: Mapping[str, PoolRecord], touched: frozenset[str]
    ) -> Callable[[CloneInfo, Backend | None], bool]:
        """Which running clones need no session read this pass: shared desktops the store
        has as free or booting, whose balancer entry has no connection and no session since
        the record's count (a booting one has none to have), and that no event touched. A
        client on any of them shows in the balancer's counters or in a connect event, which
        makes the next pass read it."""

        def unchanged(info: CloneInfo, backend: Backend | None) -> bool:
            spec = self.specs.get(info.pool)
            rec = records[info.pool].clones.get(info.name) if spec is not None else None
            if spec is None or rec is None or info.name in touched:
                return False
            if rec.slot != info.slot or rec.version != info.version or rec.dirty:
                return False
            if spec.on_logoff is OnLogoff.KEEP or info.slot in spec.assignments.values():
                return False  # reached without the balancer: read every pass
            if backend is None:
                return rec.state in (CloneState.BOOTING, CloneState.CREATING)
            return (
                rec.state is CloneState.FREE
                and backend.connections == 0
                and backend.sessions_total is not None
                and backend.sessions_total == rec.sessions_seen
            )

        return unchanged

    def _hosts(self, host: HostObservation, draining: Mapping[str, float]) -> HostPass | None:
        """Several hosts: this pass's view of them, every observed desktop counted."""
        if not self.host_specs:
            return None
        hosts = host_pass(self.hypervisor, self.host_specs, draining)
        hosts.count(host.pools, self.specs)
        hosts.breakers = self.host_breakers(self.clock.now())
        for name in sorted(hosts.lost - self._lost_reported):
            state = hosts.states[name]
            log.warning("host lost", extra=fields(host=name, since=state.since))
        for name in sorted(self._lost_reported - hosts.lost):
            log.info("host back", extra=fields(host=name))
        self._lost_reported = set(hosts.lost)
        return hosts

    def _placement(self, hosts: HostPass, spec: PoolSpec, observed: Observed) -> Observed:
        version = observed.target_version
        base = self._base(spec.image, version) if version is not None else None
        return replace(
            observed,
            hosts=hosts.rooms(spec, base, ensure_of(self.hypervisor)),
            lost_hosts=hosts.lost,
            draining_hosts=hosts.draining,
        )

    def _record(self, spec: PoolSpec, now: float) -> PoolRecord:
        """The pool's record as the keeper plans with it: the one this pass read while
        nothing has written since, or else read again."""
        record = self._records.get(spec.name)
        if record is not None:
            return record
        return self._learn(spec, self.store.load_pool(spec.name), now)

    def _learn(self, spec: PoolSpec, record: PoolRecord, now: float) -> PoolRecord:
        """For a pool that learns, the record with what its login history taught (learned
        once a day: only the days before today count)."""
        if spec.learn is None:
            return record
        day, _ = day_and_bucket(now, spec.timezone)
        known = self._learned.get(spec.name)
        if known is None or known[0] != day:
            known = (day, learned(self.store, spec.name, day))
            self._learned[spec.name] = known
            if known[1].arrivals is not None:
                log.info(
                    "learned the logins to expect",
                    extra=fields(pool=spec.name, days=known[1].days),
                )
        return replace(record, arrivals=known[1].arrivals)

    def _record_logins(self, arrived: Mapping[str, tuple[int, str]], now: float) -> None:
        """Every pool's logins go into its history, so learning has something to start
        from the day it is turned on."""
        for pool, (logins, timezone) in arrived.items():
            if logins:
                day, bucket = day_and_bucket(now, timezone)
                self.store.record_logins(
                    pool, day, bucket, logins, seconds=BUCKET, keep_days=HISTORY_DAYS
                )

    def _record_failures(self, execution: ExecutionReport) -> None:
        """The executor reports; the planner's failure policy says what the failures mean
        (the clone's backoff or replacement, the pool's breaker); the store remembers it."""
        failed: dict[str, list[Action]] = {}
        for outcome in execution.failed:
            failed.setdefault(outcome.action.pool, []).append(outcome.action)
        now = self.clock.now()
        blamed = self._judge_hosts(execution, now)
        for pool, actions in failed.items():
            spec = self.specs.get(pool)
            if spec is None:
                continue
            record = self.store.load_pool(pool)
            memory = failures_after(spec, record, actions, now, blamed)
            self.store.apply(pool, memory)
            for opened in memory:
                if (
                    isinstance(opened, RecordPool)
                    and opened.breaker_open_until is not None
                    and record.breaker_open_until is None
                ):
                    log.warning(
                        "circuit breaker open: no new clones until the cool-down ends",
                        extra=fields(
                            pool=pool, failures=opened.failures, cooldown=spec.breaker_cooldown
                        ),
                    )

    def host_breakers(self, now: float) -> dict[str, float]:
        """The hosts whose circuit breaker is open at `now`, with until when."""
        return {
            name: b.open_until
            for name, b in sorted(self._host_breakers.items())
            if b.open_until is not None and b.is_open(now)
        }

    def _action_host(self, action: Action) -> str | None:
        """The host a create or start ran on (None: another action, or a single host)."""
        if not self.host_specs or not counts_against_pool(action):
            return None
        if isinstance(action, CreateClone):
            return action.host
        record = self._records.get(action.pool) or self.store.load_pool(action.pool)
        clone = record.clones.get(action.clone)
        return clone.host if clone is not None else None

    def _judge_hosts(self, execution: ExecutionReport, now: float) -> Callable[[Action], bool]:
        """Each host's breaker after this pass's creates and starts there; the answer says
        which failures are the host's, not the pool's: those on a host whose breaker is open
        while another host can still take desktops."""
        failed: Counter[str] = Counter()
        succeeded: Counter[str] = Counter()
        cooldown: dict[str, float] = {}
        for outcome in execution.outcomes:
            where = self._action_host(outcome.action)
            if where is None:
                continue
            (succeeded if outcome.ok else failed)[where] += 1
            spec = self.specs.get(outcome.action.pool)
            if spec is not None:
                cooldown[where] = max(cooldown.get(where, 0.0), spec.breaker_cooldown)
        for where in failed.keys() | succeeded.keys():
            before = self._host_breakers.get(where, HostBreaker())
            after = host_breaker_after(
                before, failed[where], succeeded[where], cooldown.get(where, 600.0), now
            )
            self._host_breakers[where] = after
            if after.is_open(now) and not before.is_open(now):
                log.warning(
                    "host circuit breaker open: no new desktops there until the cool-down ends",
                    extra=fields(host=where, failures=after.failures, until=after.open_until),
                )
        closed = {h.name for h in self.host_specs} - {
            name for name, b in self._host_breakers.items() if b.is_open(now)
        }

        def blamed(action: Action) -> bool:
            where = self._action_host(action)
            return where is not None and where not in closed and bool(closed)

        return blamed

    def _adopted(self, spec: PoolSpec, observed: Observed, record: PoolRecord) -> list[str]:
        """Clones the store does not know (a lost or older store). The planner rebuilds
        their records from the clones' metadata and observed sessions in this same pass
        (a clone somebody is on comes back as in use, never as free)."""
        missing = [c for c in observed.clones if c.name not in record.clones]
        for clone in missing:
            log.info(
                "adopting a clone the store did not know",
                extra=fields(
                    pool=spec.name,
                    clone=clone.name,
                    version=clone.info.version,
                    power=clone.info.power,
                    in_use=clone.session.active,
                ),
            )
        return [c.name for c in missing]

    def _ensure_frontend(self) -> None:
        """The shared address must listen (a crashed or restarted balancer comes back);
        idempotent, so every pass checks it. A failure is logged; the pass goes on."""
        try:
            self.balancer.ensure_frontend()
        except ImagepipeError as exc:
            log.error("balancer not available", extra=fields(error=str(exc)))

    def _report_notes(self, host: HostObservation) -> None:
        """Say once, not every pass, why a pool makes no desktops (its image was never built,
        its base is running), and say when that is over."""
        for pool, note in host.notes.items():
            if self._notes_reported.get(pool) != note:
                log.warning("pool cannot make desktops", extra=fields(pool=pool, reason=note))
                self._notes_reported[pool] = note
        for pool in [p for p in self._notes_reported if p not in host.notes]:
            if pool in host.pools:
                log.info("pool can make desktops again", extra=fields(pool=pool))
                del self._notes_reported[pool]

    def _report_strays(self, host: HostObservation) -> None:
        """Clones of pools that are no longer configured: said once, never deleted."""
        for stray in host.stray_clones:
            if stray.name not in self._strays_reported:
                self._strays_reported.add(stray.name)
                log.warning(
                    "clone of a pool that is not configured; left alone "
                    "(delete it, or add the pool back)",
                    extra=fields(pool=stray.pool, clone=stray.name),
                )

    def _base(self, image: str, version: int) -> BaseImage:
        return self.images.resolve(image, version).base_image()

    def on_event(self, event: HypervisorEvent) -> None:
        """The hypervisor subscription's callback (any thread): wake the next pass. A client
        that connected is remembered until a pass has written it down, so a session that
        starts and ends between two passes still marks its desktop for reset."""
        log.debug(
            "hypervisor event",
            extra=fields(clone=event.clone, kind=event.kind, client=event.client),
        )
        if event.kind is EventKind.SESSION_CONNECTED:
            with self._touched_lock:
                self._touched.add(event.clone)
        self._wake.set()
