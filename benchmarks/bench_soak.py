"""Soak: a long simulated day at an accelerated clock, over the fakes. Does the keeper's
process grow? (The original tool's TODO had "memory leak?".)

A real Keeper, planner, executor and SQLite store, built through the composition root, keep a
pool of 20 desktops on FakeHypervisor + FakeBalancer with a fake clock, through the fault
campaign's harness (tests/faults/campaign.py, so every invariant is checked on the way).
Users follow a working day: few at night, a morning rush, churn all day, leaving in the
evening. Every simulated hour the benchmark samples the process's resident memory (RSS), open
file descriptors and threads; it prints the samples and the growth from the first hour (after
warm-up) to the last, and the growth of the second half against the first half.

    python benchmarks/bench_soak.py [--hours 24] [--desktops 20] [--seed 1]

The fakes' own call logs (FakeHypervisor.calls, FakeBalancerState.calls) grow by design; they
are cleared every simulated hour so they do not count as the keeper's memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from imagepipe.record import replace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root is not on sys.path

from tests.faults.campaign import POOL, Day, Profile  # noqa: E402

HOUR = 3600.0
DAY_START = 7  # local hours of the simulated working day (UTC on the fake clock)
DAY_END = 19


@dataclass(frozen=True)
class Sample:
    hour: float
    passes: int
    rss_kib: int
    fds: int
    threads: int
    users: int


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wanted_users(hour_of_day: float, desktops: int) -> int:
    """How many users are logged in at this time of day: a few at night, a morning rush to
    80 % of the pool, a dip at lunch, gone in the evening."""
    busy = int(desktops * 0.8)
    if hour_of_day < DAY_START or hour_of_day >= DAY_END:
        return 1
    if hour_of_day < 9:
        return max(1, int(busy * (hour_of_day - DAY_START) / 2))
    if 12 <= hour_of_day < 13:
        return busy // 2
    return busy


def soak(hours: float, desktops: int, seed: int, workdir: Path) -> list[Sample]:
    spec = replace(
        POOL,
        name="soak",
        initial=4,
        free=4,
        max=desktops + 4,
        port_first=7300,
        port_last=7300 + desktops + 3,
        shrink_after=1800.0,
    )
    day = Day(seed, Profile(steps=0), workdir, spec=spec)
    rng = random.Random(seed)
    users = [f"user{i:02d}" for i in range(desktops)]
    start = day.clock.now()
    # start at midnight of the fake clock's day, so the simulated day has its shape
    day.clock.advance(HOUR * 24 - start % (HOUR * 24))
    start = day.clock.now()
    samples: list[Sample] = []
    next_sample = start
    passes = 0
    try:
        day.start()
        while day.clock.now() - start < hours * HOUR:
            now = day.clock.now()
            hour_of_day = (now % (HOUR * 24)) / HOUR
            logged = list(day.sessions)
            target = wanted_users(hour_of_day, desktops)
            if len(logged) < target:
                idle = [u for u in users if u not in day.sessions]
                day.arrive(rng.choice(idle))
            elif len(logged) > target or (logged and rng.random() < 0.02):
                day.logout(rng.choice(logged))
            day.run_pass()
            passes += 1
            if now >= next_sample:
                day.hv.calls.clear()
                day.lb_state.calls.clear()
                gc.collect()
                samples.append(
                    Sample(
                        hour=(now - start) / HOUR,
                        passes=passes,
                        rss_kib=rss_kib(),
                        fds=open_fds(),
                        threads=threading.active_count(),
                        users=len(day.sessions),
                    )
                )
                next_sample += HOUR
    finally:
        day.close()
    if day.stats.violations:
        print(f"invariant violations during the soak: {len(day.stats.violations)}")
        for violation in day.stats.violations[:5]:
            print(f"  ! {violation}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--desktops", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagepipe-soak-") as tmp:
        began = time.monotonic()
        samples = soak(args.hours, args.desktops, args.seed, Path(tmp))
        took = time.monotonic() - began
    print(f"{'hour':>5} {'passes':>7} {'users':>5} {'RSS MiB':>8} {'fds':>4} {'threads':>7}")
    for s in samples:
        print(
            f"{s.hour:5.1f} {s.passes:7d} {s.users:5d} {s.rss_kib / 1024:8.1f} "
            f"{s.fds:4d} {s.threads:7d}"
        )
    if len(samples) < 3:
        print("too short to judge growth; run longer")
        return
    warm, last = samples[1], samples[-1]
    middle = samples[len(samples) // 2]
    first_half = middle.rss_kib - warm.rss_kib
    second_half = last.rss_kib - middle.rss_kib
    total_passes = last.passes
    print(
        f"\n{args.hours:g} simulated hours, {total_passes} keeper passes in {took:.1f} s "
        f"({total_passes / took:.0f} passes/s, {args.hours * HOUR / took:.0f}x real time)"
    )
    print(
        f"RSS {warm.rss_kib / 1024:.1f} -> {last.rss_kib / 1024:.1f} MiB after warm-up "
        f"({(last.rss_kib - warm.rss_kib) / 1024:+.2f} MiB, "
        f"{(last.rss_kib - warm.rss_kib) / max(last.hour - warm.hour, 1):+.1f} KiB per hour); "
        f"first half {first_half / 1024:+.2f} MiB, second half {second_half / 1024:+.2f} MiB"
    )
    print(
        f"open fds {warm.fds} -> {last.fds} ({last.fds - warm.fds:+d}); "
        f"threads {warm.threads} -> {last.threads} ({last.threads - warm.threads:+d})"
    )


if __name__ == "__main__":
    main()
