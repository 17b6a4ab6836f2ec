"""The simulator's Replanner answers what plan() answers, on every pass of seeded days.

It decides only the clones that changed or are not quiet (imagepipe/sim/replan.py); here
plan() runs beside it on the same inputs, pass after pass, over pools that grow, shrink,
suspend, resume, learn and restore, and both answers (and both wake-up timers) must be equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from imagepipe.pool.actions import Action
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    LearnSpec,
    Observed,
    PoolRecord,
    PoolSpec,
    ScheduleRule,
    Standby,
)
from imagepipe.pool.planner import next_timer, plan
from imagepipe.record import replace
from imagepipe.sim import engine
from imagepipe.sim.engine import SimSettings, simulate
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.replan import Replanner
from imagepipe.sim.world import Start

PLAIN = PoolSpec(name="lab", image="win10", initial=2, free=2, max=70, port_last=6200)
SCHEDULED = replace(
    PLAIN,
    initial=5,
    free=3,
    schedule=(ScheduleRule(frozenset(range(5)), 7 * 60, 12 * 60, 15),),
    standby=Standby.SUSPEND,
)


@dataclass
class Beside(Replanner):
    """The Replanner, checked against plan() on every pass."""

    passes: int = 0

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float
    ) -> list[Action]:
        wanted = plan(spec, observed, record, now)
        got = super().plan(spec, observed, record, now)
        assert got == wanted, f"pass {self.passes} at {now}: {got} != {wanted}"
        self.passes += 1
        return got

    def stored(self, record: PoolRecord, *states: CloneState) -> list[CloneRecord]:
        got = super().stored(record, *states)
        wanted = [r for r in record.clones.values() if r.state in states]
        assert sorted(got, key=lambda r: r.name) == sorted(wanted, key=lambda r: r.name)
        return got

    def idlest(self, record: PoolRecord) -> Iterator[CloneRecord]:
        got = list(super().idlest(record))
        free = [r for r in record.clones.values() if r.state is CloneState.FREE]
        assert got == sorted(free, key=lambda r: (r.since, -r.slot))
        return iter(got)

    def next_timer(self, spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
        got = super().next_timer(spec, record, now)
        assert got == next_timer(spec, record, now)
        return got


CASES = {
    "plain storm": (PLAIN, "morning-storm", 50, "imagepipe", Start.BOOT),
    "plain storm, original": (PLAIN, "morning-storm", 50, "original", Start.BOOT),
    "scheduled suspend, storm": (SCHEDULED, "morning-storm", 60, "imagepipe", Start.BOOT),
    "learning, restore, steady": (
        replace(PLAIN, learn=LearnSpec()),
        "steady",
        50,
        "imagepipe",
        Start.RESTORE,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_replanner_answers_as_plan_on_every_pass(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, profile, users, policy, start = CASES[case]
    made: list[Beside] = []

    def beside(world: engine.World) -> Beside:
        made.append(Beside(world))
        return made[-1]

    monkeypatch.setattr(engine, "Replanner", beside)
    days = [make_profile(profile, users, 11 + day) for day in range(2)]
    run = simulate(spec, days, POLICIES[policy], SimSettings(start=start))
    assert made and made[0].passes == run.total.passes > 500
