"""imagepipe's planner vs the original tool's policy on the same morning storm.

    .venv/bin/python benchmarks/bench_simulator.py [USERS]

A 30-seat classroom pool (initial 5, free 3, 10 free on weekday mornings) and USERS
(default 100) people arriving around 08:30 with the default latencies (clone 4s, boot 30s,
reset 15s). Prints the instant-login share and p95 wait of both, their ratio, how long
each simulated day took to compute, its planner passes and the cost of one pass (keeper,
planner and executor together); then the same for a 500-user day (target: under 3 s each).
"""

from __future__ import annotations

import sys
import time

from imagepipe.pool.model import PoolSpec, ScheduleRule, Standby
from imagepipe.sim.engine import SimSettings, simulate_day
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.report import SimResult
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


def run(pool: PoolSpec, users: int) -> None:
    logins = make_profile("morning-storm", users, 1)
    results: list[tuple[SimResult, float]] = []
    for name in ("imagepipe", "original"):
        start = time.perf_counter()
        result = simulate_day(pool, logins, POLICIES[name], SimSettings())
        results.append((result, time.perf_counter() - start))
    print(f"\n{users} users, {len(logins)} logins, pool max {pool.max}:")
    print(
        f"{'policy':>10} {'instant':>8} {'p95 wait':>9} {'p99 wait':>9} {'idle d-h':>9} "
        f"{'sim time':>9} {'passes':>7} {'ms/pass':>8}"
    )
    for result, took in results:
        print(
            f"{result.policy:>10} {result.instant_share:>8.1%} "
            f"{format_duration(result.wait(0.95)):>9} {format_duration(result.wait(0.99)):>9} "
            f"{result.idle_desktop_hours:>9.1f} {took:>8.2f}s {result.passes:>7} "
            f"{took / max(result.passes, 1) * 1e3:>8.3f}"
        )
    ours, original = results[0][0], results[1][0]
    ratio = original.wait(0.95) / ours.wait(0.95) if ours.wait(0.95) else float("inf")
    print(
        f"instant share imagepipe/original: "
        f"{ours.instant_share / max(original.instant_share, 1e-9):.2f}x; "
        f"p95 wait original/imagepipe: {ratio:.1f}x"
    )


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    run(spec(max_size=users + 20, morning_free=max(10, users // 5)), users)
    run(spec(max_size=600, morning_free=100), 500)


if __name__ == "__main__":
    main()
