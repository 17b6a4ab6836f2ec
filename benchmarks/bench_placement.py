"""Planner cost with placement over several hosts: µs per desktop at 100 / 1 000 / 10 000
desktops over 10 and 50 hosts; time per desktop must stay flat as the pool grows.

    .venv/bin/python benchmarks/bench_placement.py

Each pass has half of the pool running (free, spread over the hosts) and the other half to
be made, so every new desktop goes through the placement rule (usable, room, least loaded).
One host in ten is drained and one lost, with a desktop kept for it. Prints µs per pass and
per desktop, and the ratio of µs per desktop at 10 000 to 100 desktops (1.0 = linear).
"""

from __future__ import annotations

import time
from collections import Counter

from imagepipe.pool.actions import CreateClone
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    HostRoom,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.planner import plan

NOW = 1_700_000_000.0
MB = 1024**2


def pool(n: int, hosts: int) -> tuple[PoolSpec, Observed, PoolRecord]:
    spec = PoolSpec(
        name="big",
        image="img",
        initial=n,
        free=n,
        max=n,
        memory=256 * MB,
        port_first=10000,
        port_last=10000 + 2 * n,
    )
    names = [f"h{i:02d}" for i in range(hosts)]
    lost, drained = names[-1], names[-2]
    clones: list[ObservedClone] = []
    records: dict[str, CloneRecord] = {}
    on_host: Counter[str] = Counter()
    for slot in range(n // 2):
        host = names[slot % (hosts - 2)]
        name = spec.clone_name(slot)
        display = Endpoint(f"10.1.0.{slot % (hosts - 2)}", spec.port_for(slot))
        info = CloneInfo(name, "big", slot, "img", 1, Power.RUNNING, display, True, host=host)
        backend = Backend(name, display, BackendState.READY, 0, 0)
        clones.append(ObservedClone(info, backend=backend))
        records[name] = CloneRecord(
            name, slot, 1, CloneState.FREE, NOW - 30, sessions_seen=0, host=host
        )
        on_host[host] += 1
    kept = spec.clone_name(n // 2)
    records[kept] = CloneRecord(kept, n // 2, 1, CloneState.IN_USE, NOW - 30, dirty=True, host=lost)
    capacity = n // (hosts - 2) + 2
    rooms = tuple(
        HostRoom(
            name=h,
            address="10.1.0.1",
            usable=h not in (lost, drained),
            desktops=on_host[h],
            memory=on_host[h] * spec.memory,
            max_desktops=capacity,
            max_memory=capacity * spec.memory,
        )
        for h in names
    )
    observed = Observed(
        tuple(clones),
        target_version=1,
        base_ready=True,
        hosts=rooms,
        lost_hosts=frozenset({lost}),
        draining_hosts=frozenset({drained}),
    )
    return spec, observed, PoolRecord("big", records, target_version=1)


def per_pass_us(n: int, hosts: int) -> tuple[float, int]:
    spec, observed, record = pool(n, hosts)
    made = sum(isinstance(a, CreateClone) for a in plan(spec, observed, record, NOW))
    repeats = max(3, 20_000 // n)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            plan(spec, observed, record, NOW)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6, made


def main() -> None:
    print(f"{'hosts':>5} {'desktops':>8} {'placed':>7} {'µs/pass':>10} {'µs/desktop':>10}")
    for hosts in (10, 50):
        per: dict[int, float] = {}
        for n in (100, 1_000, 10_000):
            us, made = per_pass_us(n, hosts)
            per[n] = us / n
            print(f"{hosts:>5} {n:>8} {made:>7} {us:>10.0f} {us / n:>10.2f}")
        print(
            f"      ratio µs/desktop 10000 / 100 over {hosts} hosts: {per[10_000] / per[100]:.2f}"
        )


if __name__ == "__main__":
    main()
