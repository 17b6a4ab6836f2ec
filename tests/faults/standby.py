"""The standby campaign over the fakes: two keepers on one shared store, with random pauses,
kills and database outages.

One round is one simulated day of tests/faults/campaign.py (the same users, fake host and
invariants), kept by two keepers instead of one. Both keepers share one state store (a real
SQLite file: its lease uses the fake clock, so a day replays exactly) and elect a leader through
imagepipe.app.leadership.Election; each has its own fault injector around the same fake host.
Each step, every keeper that is alive and not paused steps its election (its lease loop) and
passes if it leads (`Keeper.pass_if_leading`, what `imagepipe keep` does). Injected:

- pause: the leader stops (SIGSTOP) for a few steps while time goes on; when it wakes it
  carries on with the pass it was in (writes under its old epoch, without asking the election
  again) — the fence must refuse them if the other keeper took over meanwhile;
- kill: the leader is killed -9 inside a host call (before or after the call reached the host);
  a new keeper process starts on the same store a few steps later;
- outage: the store does not answer for a few steps (StoreUnavailableError on every call).

Checked after every step, besides the single-keeper invariants of the campaign:

- one_leader_acting: every change to the host (create, start, reset, delete, balancer change)
  is made by the keeper whose epoch is the store's and whose lease runs at that moment, and at
  the end of a step at most one keeper may act;
- no_double_action: no desktop is created while it exists (made twice);
- nothing_changed_while_store_down: no change to the host while the store does not answer;
- fenced_steps_down: a woken keeper whose writes are refused leads no more.

    python -m tests.faults.standby --rounds 300
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap, keeper_options
from imagepipe.app.leadership import Election, LeaseSettings
from imagepipe.errors import FencedError, ImagepipeError, StoreUnavailableError
from imagepipe.log import setup_logging
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.ports import Subscription
from imagepipe.pool.store import Store
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.faults.campaign import (
    CRASH_TARGETS,
    INVARIANTS,
    POLL,
    Day,
    Profile,
    Stats,
    _trace,
)
from tests.faults.injector import CrashAt, CrashPoint, FaultInjector, KeeperCrash
from tests.faults.ports import FaultyBalancer, FaultyHypervisor, FaultyImages

LEASE = LeaseSettings(lease=30.0, loop_wait=10.0, retry_timeout=10.0)
STANDBY_INVARIANTS = (
    "one_leader_acting",
    "no_double_action",
    "nothing_changed_while_store_down",
    "fenced_steps_down",
)


class Outage:
    """A store whose every call fails while `down()` (the database server unreachable)."""

    def __init__(self, inner: Store, down: Callable[[], bool]) -> None:
        self._inner = inner
        self._down = down

    def fenced(self, epoch: int) -> Store:
        return cast(Store, Outage(self._inner.fenced(epoch), self._down))

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._inner, name)

        def checked(*args: Any, **kwargs: Any) -> Any:
            if self._down():
                raise StoreUnavailableError("cannot reach the state database (cut off)")
            return call(*args, **kwargs)

        return checked


@dataclass
class Member:
    """One `imagepipe keep` process."""

    name: str
    injector: FaultInjector
    runtime: Runtime
    keeper: Keeper
    election: Election
    subscription: Subscription
    paused: int = 0  # steps left asleep (SIGSTOP)
    woke_in_pass: bool = False  # SIGCONT: it carries on with the pass it was in


@dataclass(frozen=True)
class StandbyProfile:
    steps: int = 30
    pause: float = 0.12  # per step: chance the leader is paused
    kill: float = 0.06  # per step: chance the leader is killed inside its next host call
    outage: float = 0.05  # per step: chance the store stops answering
    down_for: tuple[int, int] = (1, 4)  # steps a pause or an outage lasts
    restart_after: tuple[int, int] = (1, 3)  # steps before a killed keeper's successor starts


class StandbyDay(Day):
    def __init__(self, seed: int, profile: StandbyProfile, workdir: Path) -> None:
        self.standby = profile
        self.members: list[Member] = []
        self.acting: Member | None = None
        self.store_down = 0  # steps the store stays unreachable
        self.generation = 0
        self.restarts: list[int] = []  # steps at which a killed keeper's successor starts
        self.killed_at: float | None = None  # fake time of the last kill
        super().__init__(seed, Profile(steps=profile.steps, crashes=0), workdir)
        self.events = random.Random(seed * 31 + 7)

    # ---- the keepers ------------------------------------------------------------------

    def _boot(self) -> tuple[Runtime, Keeper, Subscription]:
        """The day's own view of the store (for the invariants) and two keepers."""
        observer = bootstrap(
            self.settings,
            Adapters(
                hypervisor=self.hv,
                balancer=FakeBalancer(self.lb_state),
                images=self.images,
                clock=self.clock,
            ),
        )
        self.members = [self._member(), self._member()]
        first = self.members[0]
        return observer, first.keeper, first.subscription

    def _member(self) -> Member:
        self.generation += 1
        name = f"keeper-{self.generation}"
        injector = self.injector.successor()
        store = cast(Store, Outage(SQLiteStore(self.settings.state_db), self._is_down))
        runtime = Runtime(
            self.settings,
            Adapters(
                hypervisor=FaultyHypervisor(self.hv, injector),
                balancer=FaultyBalancer(FakeBalancer(self.lb_state), injector),
                store=store,
                images=FaultyImages(self.images, injector),
                clock=self.clock,
            ),
        )
        keeper = runtime.keeper([self.spec])
        options = keeper_options(self.settings)
        keeper.reconfigure(
            [self.spec], (), replace(options, executor=replace(options.executor, poll=POLL))
        )
        election = Election(store, name, LEASE, self.clock)
        keeper.lead = election
        injector.guard = lambda operation, clone: self._guard_member(operation, clone, name)
        return Member(name, injector, runtime, keeper, election, self.hv.subscribe(keeper.on_event))

    def _is_down(self) -> bool:
        return self.store_down > 0

    def _drop(self, member: Member) -> None:
        member.injector.release_hangs()
        member.subscription.close()
        member.runtime.close()
        self.members.remove(member)

    def _leader(self) -> Member | None:
        for member in self.members:
            if member.keeper.may_act() and member.keeper._term is not None:
                return member
        return None

    # ---- a step -----------------------------------------------------------------------

    def _arm_crash(self) -> None:
        """The standby campaign's own events, drawn before each user event."""
        rng = self.events
        if self.store_down > 0:
            self.store_down -= 1
            if self.store_down == 0:
                _trace("store answers again")
        elif rng.random() < self.standby.outage:
            self.store_down = rng.randint(*self.standby.down_for)
            self.stats.injected["outage"] += 1
            _trace(f"store unreachable for {self.store_down} steps")
        if self.step in self.restarts:
            self.restarts.remove(self.step)
            self.members.append(self._member())
            _trace("a new keeper process starts")
        leader = self._leader()
        if leader is None:
            return
        draw = rng.random()
        if draw < self.standby.pause:
            leader.paused = rng.randint(*self.standby.down_for)
            self.stats.injected["pause"] += 1
            _trace(f"{leader.name} paused for {leader.paused} steps")
        elif draw < self.standby.pause + self.standby.kill:
            crash = CrashAt(
                operation=rng.choice(CRASH_TARGETS),
                occurrence=1,
                point=rng.choice((CrashPoint.BEFORE, CrashPoint.AFTER)),
            )
            leader.injector.crash_at(crash)
            _trace(f"{leader.name} to be killed at {crash}")

    def _pass(self) -> PassReport | None:
        self.stats.passes += 1
        last: PassReport | None = None
        order = list(self.members)
        self.events.shuffle(order)
        for member in order:
            report = self._member_pass(member)
            if report is not None:
                last = report
                self._check_offered(report)
        self.acting = None
        self.stats.checks["one_leader_acting"] += 1
        acting = [m.name for m in self.members if m.keeper.may_act() and m.keeper._term]
        if len(acting) > 1:
            self._violate("one_leader_acting", f"{acting} may all act")
        self.hv.tick()
        wait = 5.0
        for member in self.members:
            if member.keeper._term is not None and last is not None:
                wait = member.keeper.next_wait(last)
        self.clock.advance(max(min(wait, 5.0), 0.5))
        self._check_step()
        return last

    def _member_pass(self, member: Member) -> PassReport | None:
        if member.paused > 0:
            member.paused -= 1
            member.woke_in_pass = member.paused == 0
            return None
        self.acting = member
        report = None
        try:
            if member.woke_in_pass:
                member.woke_in_pass = False
                report = self._woken(member)
            else:
                member.election.step()
                if self.killed_at is not None and member.election.term() is not None:
                    self.stats.recovery_seconds.append(self.clock.now() - self.killed_at)
                    self.killed_at = None
                report = member.keeper.pass_if_leading()
        except KeeperCrash:
            pass
        except ImagepipeError:
            pass  # the store did not answer: the keeper logs it and tries next tick
        if member.injector.crashed:
            _trace(f"{member.name} killed: {member.injector.injected[-1]}")
            self.stats.injected["kill@" + member.injector.injected[-1].operation] += 1
            self._drop(member)
            self.killed_at = self.clock.now()
            self.restarts.append(self.step + self.events.randint(*self.standby.restart_after))
            return None
        return report

    def _woken(self, member: Member) -> PassReport | None:
        """SIGCONT: the keeper carries on with the pass it was in, under the epoch it had."""
        if member.keeper._term is None:
            return None
        try:
            return member.keeper.run_pass()
        except FencedError as exc:
            self.stats.injected["fenced"] += 1
            member.keeper._fenced(exc)
            self.stats.checks["fenced_steps_down"] += 1
            if member.keeper.may_act() or member.election.term() is not None:
                self._violate("fenced_steps_down", f"{member.name} still leads after {exc}")
            return None

    # ---- invariants -------------------------------------------------------------------

    def _guard(self, operation: str, name: str) -> None:
        """Day's own guard: replaced per keeper by _guard_member."""

    def _guard_member(self, operation: str, clone: str, member: str) -> None:
        super()._guard(operation, clone)
        self.stats.checks["nothing_changed_while_store_down"] += 1
        if self.store_down > 0:
            self._violate("nothing_changed_while_store_down", f"{member}: {operation} {clone}")
        self.stats.checks["one_leader_acting"] += 1
        lease = self.runtime.store.leader(self.clock.now())
        term = next((m.keeper._term for m in self.members if m.name == member), None)
        if lease is None or lease.holder != member or lease.epoch != term or not lease.held:
            self._violate(
                "one_leader_acting",
                f"{member} (epoch {term}) made {operation} {clone} while the store's lease "
                f"is {lease}",
            )
        if operation == "create_clone":
            self.stats.checks["no_double_action"] += 1
            if clone in self.hv.clones:
                self._violate("no_double_action", f"{member} created {clone}, which exists")

    def _end_of_day(self) -> None:
        """The day's end: the store answers, nobody is paused or about to be killed, a killed
        keeper's successor runs; then the pool must settle as in the single-keeper days."""
        self.store_down = 0
        for member in self.members:
            member.injector.disarm()
            member.paused = 0
        for _ in self.restarts:
            self.members.append(self._member())
        self.restarts = []
        super()._end_of_day()

    def close(self) -> None:
        for member in list(self.members):
            self._drop(member)
        self.runtime.close()

    def _restart(self) -> None:
        raise AssertionError("the standby campaign kills keepers itself")


def run_standby_campaign(
    profile: StandbyProfile, seeds: Iterable[int], workdir: Path | None = None
) -> Stats:
    total = Stats()
    with tempfile.TemporaryDirectory(prefix="imagepipe-standby-", dir=workdir) as tmp:
        for seed in seeds:
            day_dir = Path(tmp) / f"seed-{seed}"
            day_dir.mkdir()
            total.merge(StandbyDay(seed, profile, day_dir).run())
    return total


ALL_INVARIANTS = INVARIANTS + STANDBY_INVARIANTS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--trace", action="store_true", help="the keepers' log and each step")
    args = parser.parse_args(argv)
    setup_logging("info" if args.trace else "critical")
    if args.trace:
        from tests.faults.campaign import TRACE

        TRACE.append(True)
    stats = run_standby_campaign(StandbyProfile(), range(args.seed, args.seed + args.rounds))
    print(stats.summary())
    for name in STANDBY_INVARIANTS:
        found = sum(v.invariant == name for v in stats.violations)
        print(f"  {name:32} checked {stats.checks[name]:7}  violated {found}")
    if stats.recovery_seconds:
        s = sorted(stats.recovery_seconds)
        print(f"leader killed -> the next one leads: simulated seconds median {s[len(s) // 2]:.0f}")
    for violation in stats.violations[:10]:
        print(f"  ! {violation}")
    return 1 if stats.violations else 0


if __name__ == "__main__":
    sys.exit(main())
