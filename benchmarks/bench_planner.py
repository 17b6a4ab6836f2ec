"""Planner cost per pass at 10, 100, 1 000 and 5 000 clones; time per clone must stay flat.

    .venv/bin/python benchmarks/bench_planner.py

Each pool is a busy mix: free, in use, disconnected, recycling, booting, plus creates in
flight and orphan backends, so every rule runs. Prints µs per pass and per clone, and the
ratio of µs per clone at 5 000 to 100 clones (1.0 = linear).
"""

from __future__ import annotations

import time

from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.planner import plan

NOW = 1_700_000_000.0
KINDS = ("free", "in_use", "disconnected", "recycling", "booting")


def pool(n: int) -> tuple[PoolSpec, Observed, PoolRecord]:
    spec = PoolSpec(
        name="big",
        image="img",
        initial=n // 2,
        free=n // 5,
        max=n + n // 10,
        port_first=10000,
        port_last=10000 + 2 * n,
    )
    clones: list[ObservedClone] = []
    records: dict[str, CloneRecord] = {}
    for slot in range(n):
        kind = KINDS[slot % len(KINDS)]
        name = spec.clone_name(slot)
        display = Endpoint("127.0.0.1", spec.port_for(slot))
        ready = kind != "booting"
        info = CloneInfo(name, "big", slot, "img", 1, Power.RUNNING, display, ready)
        session = GuestSession()
        state = CloneState.FREE
        if kind == "in_use":
            session, state = GuestSession("10.0.0.1", NOW, ("u",)), CloneState.IN_USE
        elif kind == "disconnected":
            session, state = GuestSession(None, None, ("u",)), CloneState.DISCONNECTED
        elif kind == "recycling":
            state = CloneState.RECYCLING
        elif kind == "booting":
            state = CloneState.BOOTING
        backend_state = BackendState.READY if kind == "free" else BackendState.DRAIN
        backend = Backend(name, display, backend_state, int(session.active))
        clones.append(ObservedClone(info, session, backend))
        records[name] = CloneRecord(
            name,
            slot,
            1,
            state,
            NOW - 30,
            session_ended_at=NOW - 30 if kind == "recycling" else None,
            last_user="u" if session.users else None,
            dirty=kind in ("in_use", "disconnected", "recycling"),  # users were on these
        )
    in_flight = []
    for slot in range(n, n + n // 20):  # creates in flight
        name = spec.clone_name(slot)
        records[name] = CloneRecord(name, slot, 1, CloneState.CREATING, NOW - 5)
        in_flight.append(name)
    orphans = tuple(
        Backend(f"gone-{i}", Endpoint("127.0.0.1", 1), BackendState.DRAIN, 1)
        for i in range(n // 50)
    )
    observed = Observed(
        tuple(clones),
        orphans,
        target_version=1,
        base_ready=True,
        in_flight=frozenset(in_flight),
    )
    return spec, observed, PoolRecord("big", records, target_version=1)


def per_pass_us(n: int) -> float:
    spec, observed, record = pool(n)
    repeats = max(3, 20_000 // n)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            plan(spec, observed, record, NOW)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def main() -> None:
    print(f"{'clones':>7} {'µs/pass':>12} {'µs/clone':>9}")
    per_clone: dict[int, float] = {}
    for n in (10, 100, 1_000, 5_000):
        us = per_pass_us(n)
        per_clone[n] = us / n
        print(f"{n:>7} {us:>12.0f} {us / n:>9.2f}")
    print(f"ratio µs/clone 5000 / 100: {per_clone[5_000] / per_clone[100]:.2f} (1.00 = linear)")


if __name__ == "__main__":
    main()
