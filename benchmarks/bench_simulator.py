"""imagepipe's planner vs the original tool's policy on the same morning storm.

    .venv/bin/python benchmarks/bench_simulator.py [USERS] [DAYS] [LONG_DAYS]

Speed: a classroom pool (initial 5, free 3, USERS/5 free on weekday mornings, standby
suspend) and USERS (default 100) people arriving around 08:30 with the default latencies
(clone 4s, boot 30s, reset 15s). Prints the instant-login share and p95 wait of both, their
ratio, the CPU time each simulated day took, its planner passes, the cost of one pass (keeper,
planner and executor together), and how much of it the policy's plan() took (per clone it was
handed); then the same for a 500-user day (goal: 1.5 s each).

With LONG_DAYS (e.g. 28) it then runs 500 users over LONG_DAYS morning storms per policy
(goal: 20 s) instead of the sizing tables.

Sizing (issue 13): a plain pool file (initial 2, free 2, max USERS + 20, no schedule) over
DAYS (default 5) morning storms, Monday to Friday, one seed per day. On the same logins:
the original tool's policy, the plain pool, the hand-written schedule above, and the plain
pool with `learn: {enabled: true}`, each booting (30 s) and restoring (0.8 s) desktops.
Prints the last day (the pool has learned from the days before it) and the goal: >= 99.5 %
of logins find a ready desktop, with fewer idle desktop-hours than the original policy.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from imagepipe.pool.actions import Action
from imagepipe.pool.model import LearnSpec, Observed, PoolRecord, PoolSpec, ScheduleRule, Standby
from imagepipe.record import replace
from imagepipe.sim.engine import SimSettings, simulate, simulate_day
from imagepipe.sim.policies import POLICIES, Planner, Policy
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.report import SimResult
from imagepipe.sim.world import Start
from imagepipe.units import format_duration


def spec(max_size: int, morning_free: int) -> PoolSpec:
    rule = ScheduleRule(frozenset(range(5)), 7 * 60, 12 * 60, morning_free)
    return PoolSpec(
        name="lab",
        image="win10",
        initial=5,
        free=3,
        max=max_size,
        port_first=20000,
        port_last=20000 + 2 * max_size,
        schedule=(rule,),
        standby=Standby.SUSPEND,
    )


@dataclass
class Timed:
    """A policy as the simulator runs it, with the CPU time its passes took and the clones
    they were handed (what the rest of a simulated day costs is the simulator's own)."""

    policy: Policy
    seconds: float = 0.0
    visits: int = 0
    name: str = field(init=False)
    parallel: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.name, self.parallel = self.policy.name, self.policy.parallel

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, planner: Planner
    ) -> list[Action]:
        began = time.process_time()
        actions = self.policy.plan(spec, observed, record, now, planner)
        self.seconds += time.process_time() - began
        self.visits += len(observed.clones)
        return actions


def run(pool: PoolSpec, users: int) -> None:
    logins = make_profile("morning-storm", users, 1)
    results: list[tuple[SimResult, float]] = []
    timed: list[Timed] = []
    for name in ("imagepipe", "original"):
        policy = Timed(POLICIES[name])
        start = time.process_time()
        result = simulate_day(pool, logins, policy, SimSettings(start=Start.BOOT))
        results.append((result, time.process_time() - start))
        timed.append(policy)
    print(f"\n{users} users, {len(logins)} logins, pool max {pool.max}:")
    print(
        f"{'policy':>10} {'instant':>8} {'p95 wait':>9} {'p99 wait':>9} {'idle d-h':>9} "
        f"{'sim cpu':>9} {'passes':>7} {'ms/pass':>8} {'policy cpu':>10} {'µs/clone':>8}"
    )
    for (result, took), policy in zip(results, timed, strict=True):
        print(
            f"{result.policy:>10} {result.instant_share:>8.1%} "
            f"{format_duration(result.wait(0.95)):>9} {format_duration(result.wait(0.99)):>9} "
            f"{result.idle_desktop_hours:>9.1f} {took:>8.2f}s {result.passes:>7} "
            f"{took / max(result.passes, 1) * 1e3:>8.3f} {policy.seconds:>9.2f}s "
            f"{policy.seconds / max(policy.visits, 1) * 1e6:>8.2f}"
        )
    ours, original = results[0][0], results[1][0]
    ratio = original.wait(0.95) / ours.wait(0.95) if ours.wait(0.95) else float("inf")
    print(
        f"instant share imagepipe/original: "
        f"{ours.instant_share / max(original.instant_share, 1e-9):.2f}x; "
        f"p95 wait original/imagepipe: {ratio:.1f}x"
    )


def plain(max_size: int) -> PoolSpec:
    """A pool file without schedule: size {initial: 2, free: 2, max: max_size}."""
    return PoolSpec(
        name="lab",
        image="win10",
        initial=2,
        free=2,
        max=max_size,
        port_first=20000,
        port_last=20000 + 2 * max_size,
    )


def sizing(users: int, days: int) -> None:
    week = [make_profile("morning-storm", users, 1 + day) for day in range(days)]
    pool = plain(users + 20)
    learned = replace(pool, learn=LearnSpec())
    scheduled = spec(max_size=users + 20, morning_free=max(10, users // 5))
    columns = [
        ("original", pool, "original", Start.BOOT),
        ("plain", pool, "imagepipe", Start.BOOT),
        ("schedule", scheduled, "imagepipe", Start.BOOT),
        ("learned", learned, "imagepipe", Start.BOOT),
        ("plain restore", pool, "imagepipe", Start.RESTORE),
        ("schedule restore", scheduled, "imagepipe", Start.RESTORE),
        ("learned restore", learned, "imagepipe", Start.RESTORE),
    ]
    print(f"\nsizing: {users} users, {days} days of morning storm, plain pool max {pool.max}:")
    print(
        f"{'pool':>17} {'instant':>8} {'p95 wait':>9} {'idle d-h':>9} {'peak':>5} "
        f"{'by day: instant / idle d-h':<40} {'took':>6}"
    )
    last: dict[str, SimResult] = {}
    for label, pool_spec, policy, start in columns:
        began = time.perf_counter()
        result = simulate(pool_spec, week, POLICIES[policy], SimSettings(start=start), label)
        took = time.perf_counter() - began
        day = last[label] = result.last_day
        by_day = " ".join(f"{d.instant_share:.0%}/{d.idle_desktop_hours:.0f}" for d in result.days)
        print(
            f"{label:>17} {day.instant_share:>8.1%} {format_duration(day.wait(0.95)):>9} "
            f"{day.idle_desktop_hours:>9.1f} {day.peak_clones:>5} {by_day:<40} {took:>5.1f}s"
        )
    original = last["original"].idle_desktop_hours
    for label in ("learned", "learned restore"):
        day = last[label]
        goal = day.instant_share >= 0.995 and day.idle_desktop_hours < original
        print(
            f"{label}: last day {day.instant_share:.1%} ready at once (goal >= 99.5 %), "
            f"idle desktop-hours {day.idle_desktop_hours / original:.2f}x the original's "
            f"(goal < 1): {'met' if goal else 'NOT met'}"
        )


def weeks(users: int, days: int) -> None:
    """CPU time of `days` morning storms back to back, per policy (the learned pool is the
    one administrators simulate for weeks: it needs four of them of history)."""
    history = [make_profile("morning-storm", users, 1 + day) for day in range(days)]
    pool = plain(users + 20)
    print(f"\n{users} users over {days} days, plain pool max {pool.max}:")
    print(f"{'pool':>10} {'sim cpu':>9} {'per day':>8} {'passes':>8} {'policy cpu':>10}")
    for label, pool_spec, name in (
        ("learned", replace(pool, learn=LearnSpec()), "imagepipe"),
        ("original", pool, "original"),
    ):
        policy = Timed(POLICIES[name])
        began = time.process_time()
        result = simulate(pool_spec, history, policy, SimSettings(start=Start.BOOT), label)
        took = time.process_time() - began
        print(
            f"{label:>10} {took:>8.1f}s {took / days:>7.2f}s {result.total.passes:>8} "
            f"{policy.seconds:>9.1f}s"
        )


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    days = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    run(spec(max_size=users + 20, morning_free=max(10, users // 5)), users)
    run(spec(max_size=600, morning_free=100), 500)
    if len(sys.argv) > 3:  # the long run only: the sizing tables take minutes per day
        weeks(500, int(sys.argv[3]))
        return
    sizing(users, days)
    sizing(500, days)


if __name__ == "__main__":
    main()
