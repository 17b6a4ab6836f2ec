"""The fault campaign over the fakes: simulated days of users with faults and keeper crashes.

One round is one simulated day on a fresh host (FakeHypervisor + FakeBalancer + a real SQLite
store, all built through the composition root with a fake clock): users arrive through the
balancer, log in, disconnect, come back, log out; after every user event the keeper makes a
pass, through FaultyHypervisor / FaultyBalancer. A crash drops the keeper mid-pass at a chosen
call (inside create, start, reset, delete, or a balancer enable/drain/remove, before or after
the system did it): the state database as it was at that instant is what the next keeper gets,
built by bootstrap on the same store file with the same fakes reopened. Like `imagepipe keep`,
each keeper is subscribed to the hypervisor's events (a client connecting). While no keeper
runs (between a kill and the restart, and in the `restart` profile's graceful stops) users
may come and go through the balancer, whole sessions no keeper sees: only the balancer's
session counter tells the next keeper about them.

Time is the fake clock's only: a TIMEOUT or HANG fault moves it past the keeper's action
timeout and holds the call until the pass is over, so the executor gives up on the call as it
would after a minute, at no real cost; with --parallel 1 every seed replays exactly.

Checked after every step (and counted per invariant):

- live_session_untouched: no reset, delete, stop or suspend reaches a desktop a client is
  connected to or a user is logged in on; every user the day logged in still is.
- used_desktop_reset_first: a desktop a user used (the fake's dirty disk) is never enabled in
  the balancer before its reset, and none is left offered after a pass that planned the
  pool: the next user never sees the previous user's files.
- max_respected: never more than `max` clones.
- unique_slots: no two clones, and no two records, share a slot or a display.
- converges_after_crash: within RECOVERY_PASSES passes of the new keeper (no faults) the pool
  has its free target of clean, ready desktops in the balancer.
- nothing_orphaned: once settled, every clone has a record, every record a clone, every
  backend a clone.
- store_integrity: PRAGMA integrity_check of the state database after every crash and at the
  end of the day.

Run the long profile by hand:

    IMAGEPIPE_FAULT_ROUNDS=500 python -m tests.faults.campaign [--seed N] [--crash OP]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.config import KeeperSettings, Settings
from imagepipe.errors import ImagepipeError
from imagepipe.log import setup_logging
from imagepipe.pool.actions import ForgetClone, RecordClone, RecordPool
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.model import BackendState, PoolSpec, Power
from imagepipe.pool.planner import free_target
from imagepipe.pool.ports import Subscription
from imagepipe.record import replace
from tests.fakes.balancer import FakeBalancer, FakeBalancerState
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages
from tests.faults.injector import (
    CrashAt,
    CrashPoint,
    FaultInjector,
    FaultKind,
    KeeperCrash,
)
from tests.faults.ports import FaultyBalancer, FaultyHypervisor, FaultyImages

RECOVERY_PASSES = 10  # a crash must be healed within this many passes of the new keeper
SETTLE_PASSES = 60  # a day's end: passes (with timers) before the pool must be settled
ACTION_TIMEOUT = 60.0  # simulated seconds the keeper gives one call
LATE_BY = ACTION_TIMEOUT + 1.0  # simulated seconds a TIMEOUT or HANG fault takes
POLL = 0.002  # real seconds between the executor's looks at the (fake) clock
INVARIANTS = (
    "live_session_untouched",
    "used_desktop_reset_first",
    "max_respected",
    "unique_slots",
    "converges_after_crash",
    "nothing_orphaned",
    "store_integrity",
)
# the crash targets and, for each, the points in the call a crash can hit
CRASH_TARGETS = ("create_clone", "start", "reset", "delete", "enable", "drain", "remove")

POOL = PoolSpec(
    name="fc",
    image="tiny",
    initial=2,
    free=2,
    max=6,
    port_first=7100,
    port_last=7105,
    recycle_after=60.0,
    disconnect_timeout=24 * 3600.0,  # a disconnected user keeps the desktop all day
    shrink_after=600.0,
    boot_timeout=300.0,
    max_failures=1000,  # the breaker has its own tests; here it would only hide the rest
    retry_backoff=5.0,
)
USERS = tuple(f"u{i}" for i in range(5))
TRACE: list[bool] = []  # --trace: print each user event and crash on stderr


def _trace(message: str) -> None:
    if TRACE:
        print(f"--- {message}", file=sys.stderr)


@dataclass(frozen=True)
class Violation:
    seed: int
    step: int
    invariant: str
    detail: str
    recent: tuple[str, ...] = ()  # the last faults and crashes before it

    def __str__(self) -> str:
        tail = "; ".join(self.recent)
        return f"seed {self.seed} step {self.step}: {self.invariant}: {self.detail} [{tail}]"


@dataclass
class Stats:
    rounds: int = 0
    steps: int = 0
    passes: int = 0
    checks: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)  # fault kind or crash-point@op
    recovery_passes: list[int] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        self.rounds += other.rounds
        self.steps += other.steps
        self.passes += other.passes
        self.checks.update(other.checks)
        self.injected.update(other.injected)
        self.recovery_passes += other.recovery_passes
        self.recovery_seconds += other.recovery_seconds
        self.violations += other.violations

    def by_invariant(self) -> Counter[str]:
        return Counter(v.invariant for v in self.violations)

    def summary(self) -> str:
        lines = [f"rounds {self.rounds}  steps {self.steps}  keeper passes {self.passes}"]
        lines.append("injected: " + _counts(self.injected))
        found = self.by_invariant()
        for name in INVARIANTS:
            lines.append(f"  {name:26} checked {self.checks[name]:7}  violated {found[name]}")
        if self.recovery_passes:
            p, s = sorted(self.recovery_passes), sorted(self.recovery_seconds)
            lines.append(
                f"healed after a crash ({len(p)} times): passes median {p[len(p) // 2]} "
                f"max {p[-1]}; simulated seconds median {s[len(s) // 2]:.1f} max {s[-1]:.1f}"
            )
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "nothing"


@dataclass(frozen=True)
class Profile:
    """What a round injects."""

    faults: frozenset[FaultKind] = frozenset()
    fault_rate: float = 0.0
    crash_targets: tuple[str, ...] = ()  # operations a crash may hit
    crash_points: tuple[CrashPoint, ...] = (CrashPoint.BEFORE, CrashPoint.AFTER)
    crashes: int = 3  # crashes per day (if the targeted call happens often enough)
    steps: int = 40  # user events per day
    parallel: int = 1  # executor workers (1 = every seed replays exactly)
    rollout_at: int | None = None  # the step at which version 2 of the image is published
    fault_operations: tuple[str, ...] = ()  # only these calls get faults; () = every call
    restarts: int = 0  # keepers stopped (and started again) per day, users visiting meanwhile
    down_visits: float = 0.6  # chance that users come and go while no keeper runs


class Day:
    """One simulated day on a fresh fake host (one round)."""

    def __init__(self, seed: int, profile: Profile, workdir: Path, spec: PoolSpec = POOL) -> None:
        self.seed = seed
        self.profile = profile
        self.spec = spec
        self.rng = random.Random(seed)
        self.stats = Stats(rounds=1)
        self.clock = FakeClock()
        self.images = FakeImages()
        self.hv = FakeHypervisor(clock=self.clock.now, boot_ticks=1)
        self.hv.add_base(self.images.publish(spec.image, 1))
        self.lb_state = FakeBalancerState()
        self.settings = Settings(
            state_db=workdir / "state" / "state.db",
            run_dir=workdir / "run",
            registry=workdir / "registry",
            image_store=workdir / "images",
            pools_dir=workdir / "pools",
            keeper=KeeperSettings(
                tick=5.0, parallel=profile.parallel, action_timeout=ACTION_TIMEOUT
            ),
        )
        self.snapshot = workdir / "state" / "at-crash.db"
        self.step = 0
        self.sessions: dict[str, str] = {}  # user -> clone they are logged in on
        self.connected: set[str] = set()  # users whose client is connected
        self.crashes_left = profile.crashes if profile.crash_targets else 0
        # users who come and go while no keeper runs: their own random stream, so the rest
        # of a seed's day stays what it was without them
        self.down_rng = random.Random(seed * 104_729 + 3)
        self.restart_steps = frozenset(
            self.down_rng.sample(range(1, profile.steps + 1), min(profile.restarts, profile.steps))
        )
        self.injector = FaultInjector(
            rng=random.Random(seed * 7919 + 1),
            kinds=profile.faults,
            rate=profile.fault_rate,
            late_by=LATE_BY,
            advance=self.clock.advance,
            operations=profile.fault_operations,
            guard=self._guard,
        )
        self.runtime, self.keeper, self.subscription = self._boot()

    # ---- the keeper's life -----------------------------------------------------------

    def _boot(self) -> tuple[Runtime, Keeper, Subscription]:
        """A keeper as `imagepipe keep` starts it: through the composition root, subscribed
        to the hypervisor's events (Keeper.run; here the day drives the passes itself). Its
        executor looks at the fake clock often, so a slow call times out at once."""
        adapters = Adapters(
            hypervisor=FaultyHypervisor(self.hv, self.injector),
            balancer=FaultyBalancer(FakeBalancer(self.lb_state), self.injector),
            images=FaultyImages(self.images, self.injector),
            clock=self.clock,
        )
        runtime = bootstrap(self.settings, adapters)
        keeper = runtime.keeper([self.spec])
        options = keeper.settings
        keeper.reconfigure(
            [self.spec], (), replace(options, executor=replace(options.executor, poll=POLL))
        )
        return runtime, keeper, runtime.hypervisor.subscribe(keeper.on_event)

    def kill_at(self, crash: CrashAt) -> None:
        """Kill the keeper at that call; the next pass that reaches it dies there."""
        self.injector.crash_at(crash, on_crash=self._save_state_at_crash)

    def _arm_crash(self) -> None:
        if self.crashes_left <= 0 or self.injector.crashed:
            return
        crash = CrashAt(
            operation=self.rng.choice(self.profile.crash_targets),
            occurrence=self.rng.randint(1, 3),
            point=self.rng.choice(self.profile.crash_points),
        )
        self.kill_at(crash)

    def _save_state_at_crash(self) -> None:
        """What a kill -9 leaves: every committed transaction, nothing after this instant."""
        self.snapshot.unlink(missing_ok=True)
        source = sqlite3.connect(self.settings.state_db)
        target = sqlite3.connect(self.snapshot)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()

    def _restart(self) -> None:
        """Drop the dead keeper; a new one starts on the database as it was at the crash."""
        self.crashes_left -= 1
        self.injector.release_hangs()
        self.subscription.close()
        self.runtime.close()
        db = self.settings.state_db
        for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.move(self.snapshot, db)
        self._check_integrity()
        self._visits_while_down()
        self.injector = self.injector.successor()
        self.runtime, self.keeper, self.subscription = self._boot()
        self._recover()

    def stop_keeper(self) -> None:
        """The keeper stops (SIGTERM: an upgrade, a restart): no passes, no events, the
        desktops stay in the balancer, so users can still log in."""
        self.injector.release_hangs()
        self.subscription.close()
        self.runtime.close()

    def start_keeper(self) -> None:
        """A new keeper on the same state database and host, as `imagepipe keep` starts."""
        self.runtime, self.keeper, self.subscription = self._boot()

    def _restart_gracefully(self) -> None:
        """The keeper is stopped between two passes, users may come and go, it starts again
        and must heal the pool like after a kill."""
        _trace("keeper stopped")
        self.stop_keeper()
        self._visits_while_down()
        self.start_keeper()
        self.stats.injected["restart"] += 1
        self._recover()

    def _visits_while_down(self) -> None:
        """While no keeper runs, users may connect through the balancer, log in, work, log out
        and disconnect: whole sessions no keeper saw (only the balancer counted them)."""
        if self.down_rng.random() >= self.profile.down_visits:
            return
        idle = [u for u in USERS if u not in self.sessions]
        for user in self.down_rng.sample(idle, min(len(idle), self.down_rng.randint(1, 2))):
            if self.visit(user) is not None:
                self.stats.injected["visit-while-down"] += 1

    def _recover(self) -> None:
        """The new keeper, with no faults, must bring the pool back to its free target."""
        self.injector.quiet = True
        started, passes = self.clock.now(), 0
        self.stats.checks["converges_after_crash"] += 1
        while True:
            passes += 1
            self._pass()
            if self.free_ready() >= self.want():
                self.stats.recovery_passes.append(passes)
                self.stats.recovery_seconds.append(self.clock.now() - started)
                break
            if passes >= RECOVERY_PASSES:
                self._violate(
                    "converges_after_crash",
                    f"{self.free_ready()} of {self.want()} free desktops "
                    f"{passes} passes ({self.clock.now() - started:.0f}s) after the restart; "
                    f"records {self._records()}",
                )
                break
        self.injector.quiet = False

    # ---- a pass ----------------------------------------------------------------------

    def run_pass(self) -> PassReport | None:
        """One keeper pass, then time moves on as the keeper would sleep; a keeper killed in
        the pass is replaced (and must heal the pool) before this returns."""
        return self._pass()

    def _pass(self) -> PassReport | None:
        self.stats.passes += 1
        report = None
        try:
            report = self.keeper.run_pass()
        except KeeperCrash:
            pass
        except ImagepipeError:
            pass  # a failed read: the keeper logs it and tries again next tick
        self.injector.release_hangs()
        if self.injector.crashed:
            _trace(f"keeper killed: {self.injector.injected[-1]}")
            self.stats.injected[self.injector.injected[-1].kind + "@" + self._crash_op()] += 1
            self._restart()
            return None
        if report is not None:
            self._check_offered(report)
        self.hv.tick()
        wait = self.keeper.next_wait(report) if report is not None else 5.0
        self.clock.advance(max(wait, 0.5))
        self._check_step()
        return report

    def _crash_op(self) -> str:
        return self.injector.injected[-1].operation

    # ---- the users -------------------------------------------------------------------

    def _user_event(self) -> None:
        rng = self.rng
        idle = [u for u in USERS if u not in self.sessions]
        gone = [u for u in self.sessions if u not in self.connected]
        here = sorted(self.connected)
        choices = ["wait"]
        if idle:
            choices += ["arrive"] * 3
        if here:
            choices += ["logout"] * 2 + ["disconnect"]
        if gone:
            choices += ["reconnect"]
        event = rng.choice(choices)
        _trace(f"step {self.step} t={self.clock.now() - 1_700_000_000:.0f}: {event}")
        if event == "arrive":
            self.arrive(rng.choice(idle))
        elif event == "logout":
            self.logout(rng.choice(here))
        elif event == "disconnect":
            user = rng.choice(here)
            self.hv.disconnect(self.sessions[user])
            self._lb_disconnect(self.sessions[user])
            self.connected.discard(user)
        elif event == "reconnect":
            user = rng.choice(gone)
            clone = self.sessions[user]
            self.hv.connect(clone, _client(user))
            self.connected.add(user)
        else:
            self.clock.advance(rng.choice((30.0, 90.0, 400.0, 900.0)))

    def arrive(self, user: str) -> str | None:
        """The user connects to the shared address and logs in on the desktop the balancer
        picked; None when there was none to pick."""
        balancer = FakeBalancer(self.lb_state)
        if not self.lb_state.running:
            return None
        name = balancer.route()
        if name is None:
            return None  # every desktop busy: the user waits (HAProxy queues)
        clone = self.hv.clones.get(name)
        if clone is None or clone.power is not Power.RUNNING:
            balancer.disconnect(name)  # a stale backend: the user tries again later
            return None
        self.hv.connect(name, _client(user))
        self.hv.login(name, user)
        _trace(f"{user} logs in on {name}")
        self.sessions[user] = name
        self.connected.add(user)
        return name

    def visit(self, user: str) -> str | None:
        """A whole short session: arrive through the balancer, log in, log out, disconnect."""
        desktop = self.arrive(user)
        if desktop is not None:
            self.logout(user)
        return desktop

    def logout(self, user: str) -> None:
        """The user logs out and closes the client."""
        clone = self.sessions.pop(user)
        _trace(f"{user} logs out of {clone}")
        self.connected.discard(user)
        self.hv.logout(clone, user)
        self.hv.disconnect(clone)
        self._lb_disconnect(clone)

    def _lb_disconnect(self, name: str) -> None:
        server = self.lb_state.servers.get(name)
        if server is not None and server.connections:
            server.connections -= 1

    # ---- the day ---------------------------------------------------------------------

    def start(self) -> None:
        """The first passes of the day: the pool fills up."""
        for _ in range(3):
            self._pass()

    def close(self) -> None:
        self.injector.release_hangs()
        self.subscription.close()
        self.runtime.close()

    def run(self) -> Stats:
        try:
            self.start()
            for step in range(1, self.profile.steps + 1):
                self.step = step
                self.stats.steps += 1
                self._arm_crash()
                if step in self.restart_steps:
                    self._restart_gracefully()
                if step == self.profile.rollout_at:
                    self.hv.add_base(self.images.publish(self.spec.image, 2))
                    _trace(f"step {step}: version 2 published")
                self._user_event()
                self._pass()
            self._end_of_day()
        finally:
            self.close()
        for item in self.injector.injected:
            if not item.kind.startswith("crash"):
                self.stats.injected[item.kind] += 1
        return self.stats

    def _end_of_day(self) -> None:
        """Everybody logs off; with no more faults the pool must settle with nothing left over."""
        self.injector.disarm()
        for user in list(self.sessions):
            self.logout(user)
        self.injector.quiet = True
        self.step += 1
        for _ in range(SETTLE_PASSES):
            report = self._pass()
            if (
                report is not None
                and _settled(report)
                and not self._retries_pending()
                and self.free_ready() >= self.want()
            ):
                break
        else:
            self.stats.checks["converges_after_crash"] += 1
            self._violate("converges_after_crash", f"the pool never settled; {self._records()}")
        self._check_orphans()
        self._check_integrity()

    # ---- invariants ------------------------------------------------------------------

    def _guard(self, operation: str, name: str) -> None:
        """Runs just before a mutating call reaches the fake host."""
        clone = self.hv.clones.get(name)
        if operation in ("reset", "delete", "stop", "suspend"):
            self.stats.checks["live_session_untouched"] += 1
            if clone is not None and clone.power is Power.RUNNING and clone.session.active:
                self._violate(
                    "live_session_untouched",
                    f"{operation} {name} while {clone.session.client or 'no client'} "
                    f"is connected and {list(clone.session.users)} logged in",
                )
        if operation == "enable":
            self.stats.checks["used_desktop_reset_first"] += 1
            if clone is not None and clone.dirty and not clone.session.active:
                self._violate(
                    "used_desktop_reset_first",
                    f"{name} put in the balancer as ready with the previous user's disk "
                    f"(never reset since its last user); records {self._records()}",
                )

    def _check_offered(self, report: PassReport) -> None:
        """After a pass that planned the pool, with the balancer read and nothing done to the
        desktop refused, no desktop the balancer offers has a previous user's disk (one that
        was never put in again, because it never left, included)."""
        if self.spec.name in report.not_planned or report.observation.balancer_error:
            return
        refused = {o.action.clone for o in report.execution.failed}
        refused |= {a.clone for a in report.execution.skipped}
        self.stats.checks["used_desktop_reset_first"] += 1
        for name in sorted(self._offered() - refused):
            if self.hv.clones[name].dirty:
                self._violate(
                    "used_desktop_reset_first",
                    f"{name} offered by the balancer with the previous user's disk after a "
                    f"pass that planned the pool; records {self._records()}",
                )

    def _check_step(self) -> None:
        clones = [c for c in self.hv.clones.values() if c.spec.pool == self.spec.name]
        self.stats.checks["max_respected"] += 1
        # during a rollout, old-version desktops somebody is on may go over max (blue/green)
        target = max(self.images.versions[self.spec.image])
        counted = [c for c in clones if c.spec.base.version == target or not c.session.active]
        if len(counted) > self.spec.max:
            self._violate(
                "max_respected",
                f"{len(counted)} clones (not counting old ones in use), max {self.spec.max}",
            )
        self.stats.checks["unique_slots"] += 1
        slots = Counter(c.spec.slot for c in clones)
        ports = Counter(c.spec.display.port for c in clones)
        records = self.runtime.store.load_pool(self.spec.name).clones.values()
        record_slots = Counter(r.slot for r in records)
        doubled = [s for s, n in (slots + ports + record_slots).items() if n > 1]
        if any(n > 1 for n in (*slots.values(), *ports.values(), *record_slots.values())):
            self._violate("unique_slots", f"slots or ports used twice: {doubled}")
        self.stats.checks["live_session_untouched"] += 1
        for user, name in self.sessions.items():
            clone = self.hv.clones.get(name)
            if clone is None or user not in clone.session.users:
                self._violate(
                    "live_session_untouched", f"{user} lost the session on {name} (clone gone)"
                )

    def _check_orphans(self) -> None:
        self.stats.checks["nothing_orphaned"] += 1
        clones = {n for n, c in self.hv.clones.items() if c.spec.pool == self.spec.name}
        records = set(self.runtime.store.load_pool(self.spec.name).clones)
        backends = set(self.lb_state.servers)
        problems = []
        if clones - records:
            problems.append(f"clones nobody records: {sorted(clones - records)}")
        if records - clones:
            problems.append(f"records of no clone: {sorted(records - clones)}")
        if backends - clones:
            problems.append(f"backends of no clone: {sorted(backends - clones)}")
        if problems:
            self._violate("nothing_orphaned", "; ".join(problems))

    def _check_integrity(self) -> None:
        self.stats.checks["store_integrity"] += 1
        db = sqlite3.connect(self.settings.state_db)
        try:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
        if result != "ok":
            self._violate("store_integrity", f"PRAGMA integrity_check: {result}")

    def _offered(self) -> set[str]:
        """Desktops a new user can get now: running, booted, nobody on them, ready in the
        balancer. (Whether they are clean is used_desktop_reset_first's business, so that
        each invariant points at one bug.)"""
        offered = set()
        for name, clone in self.hv.clones.items():
            server = self.lb_state.servers.get(name)
            if (
                clone.power is Power.RUNNING
                and clone.boot_ticks_left == 0
                and not clone.session.active
                and server is not None
                and server.state is BackendState.READY
                and server.connections == 0
            ):
                offered.add(name)
        return offered

    def free_ready(self) -> int:
        return len(self._offered())

    def want(self) -> int:
        """The free target, less what max leaves no room for: desktops in use, and used
        ones waiting for their reset."""
        offered = self._offered()
        used = sum(
            1
            for name, c in self.hv.clones.items()
            if c.session.active or (c.dirty and name not in offered)
        )
        return min(free_target(self.spec, self.clock.now()), self.spec.max - used)

    def _retries_pending(self) -> bool:
        """A failed record waits for its retry (README "Failures"): not settled yet."""
        pool = self.runtime.store.load_pool(self.spec.name)
        return any(r.retry_at is not None for r in pool.clones.values())

    def _records(self) -> str:
        pool = self.runtime.store.load_pool(self.spec.name)
        return ", ".join(f"{r.name}:{r.state.value}" for r in pool.clones.values()) or "none"

    def _violate(self, invariant: str, detail: str) -> None:
        recent = tuple(
            f"{i.kind} {i.operation} {i.name}".strip() for i in self.injector.injected[-4:]
        )
        self.stats.violations.append(Violation(self.seed, self.step, invariant, detail, recent))


def _client(user: str) -> str:
    """A remote-desktop client address of the user's own."""
    return f"10.0.{len(user) % 250}.{sum(map(ord, user)) % 250 + 1}"


def _settled(report: PassReport) -> bool:
    return not [
        a for a in report.actions if not isinstance(a, RecordClone | RecordPool | ForgetClone)
    ]


def run_campaign(profile: Profile, seeds: Iterable[int], workdir: Path | None = None) -> Stats:
    """Run one day per seed; the merged figures and every violation found."""
    total = Stats()
    with tempfile.TemporaryDirectory(prefix="imagepipe-faults-", dir=workdir) as tmp:
        for seed in seeds:
            day_dir = Path(tmp) / f"seed-{seed}"
            day_dir.mkdir()
            total.merge(Day(seed, profile, day_dir).run())
    return total


def rounds_from_env(default: int) -> int:
    """IMAGEPIPE_FAULT_ROUNDS: the long profile, by hand."""
    value = os.environ.get("IMAGEPIPE_FAULT_ROUNDS")
    return int(value) if value else default


PROFILES: dict[str, Profile] = {
    **{f"crash-{op}": Profile(crash_targets=(op,)) for op in CRASH_TARGETS},
    **{
        f"fault-{kind.value}": Profile(
            faults=frozenset({kind}),
            fault_rate=0.04 if kind in (FaultKind.TIMEOUT, FaultKind.HANG) else 0.08,
        )
        for kind in FaultKind
    },
    "fault-registry": Profile(
        faults=frozenset({FaultKind.FATAL}), fault_rate=0.5, fault_operations=("resolve",)
    ),
    "rollout": Profile(crash_targets=CRASH_TARGETS, rollout_at=15, crashes=4),
    "restart": Profile(restarts=4, down_visits=0.9),
    "mixed": Profile(
        faults=frozenset(FaultKind),
        fault_rate=0.05,
        crash_targets=CRASH_TARGETS,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds_from_env(20))
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES))
    parser.add_argument("--show", type=int, default=3, help="violations shown per invariant")
    parser.add_argument("--trace", action="store_true", help="the keeper's log and each step")
    parser.add_argument(
        "--parallel", type=int, default=1, help="executor workers (above 1 a seed may not replay)"
    )
    args = parser.parse_args(argv)
    setup_logging("info" if args.trace else "critical")  # the figures, not the log
    if args.trace:
        TRACE.append(True)
    found = 0
    for name in args.profile or sorted(PROFILES):
        profile = replace(PROFILES[name], parallel=args.parallel)
        stats = run_campaign(profile, range(args.seed, args.seed + args.rounds))
        print(f"== {name}\n{stats.summary()}")
        shown: Counter[str] = Counter()
        for violation in stats.violations:
            if shown[violation.invariant] < args.show:
                print(f"  ! {violation}")
            shown[violation.invariant] += 1
        found += len(stats.violations)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
