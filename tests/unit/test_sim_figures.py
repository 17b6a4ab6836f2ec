"""The simulator's figures for a fixed set of pools and seeded traces, as recorded.

Speed work on the simulator (caching, incremental observation) must not change a single
figure: the same seed gives the same waits, idle desktop-hours, operations and planner
passes for every policy, start mode and learning setting. The recorded figures in
data/sim_figures.json come from the simulator before such work; regenerate them only for a
change that is meant to change what the simulator answers:

    .venv/bin/python -m tests.unit.test_sim_figures
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepipe.pool.model import LearnSpec, PoolSpec, ScheduleRule, Standby
from imagepipe.record import replace
from imagepipe.sim.compare import COMPARISONS, compare_runs
from imagepipe.sim.engine import SimSettings
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.trace import Login
from imagepipe.sim.world import Start

FIGURES = Path(__file__).parent / "data" / "sim_figures.json"

PLAIN = PoolSpec(name="lab", image="win10", initial=2, free=2, max=50, port_last=6100, learn=None)
LEARNING = replace(PLAIN, learn=LearnSpec())
SCHEDULED = replace(
    PLAIN,
    initial=5,
    free=3,
    max=60,
    schedule=(ScheduleRule(frozenset(range(5)), 7 * 60, 12 * 60, 12),),
    standby=Standby.SUSPEND,
)


def _days(profile: str, users: int, days: int, seed: int) -> list[list[Login]]:
    return [make_profile(profile, users, seed + day) for day in range(days)]


# pool, days of logins, how it starts desktops, the columns it is compared with
SCENARIOS: dict[str, tuple[PoolSpec, list[list[Login]], Start, tuple[str, ...]]] = {
    "plain storm, 2 days": (PLAIN, _days("morning-storm", 30, 2, 1), Start.BOOT, COMPARISONS),
    "learning storm, 2 days": (
        LEARNING,
        _days("morning-storm", 30, 2, 7),
        Start.RESTORE,
        ("original", "boot"),
    ),
    "scheduled suspend, steady, 2 days": (
        SCHEDULED,
        _days("steady", 40, 2, 3),
        Start.BOOT,
        ("original", "restore"),
    ),
}


def figures(name: str) -> dict[str, object]:
    """Every column of `simulate --compare` for one scenario: each run's figures (total,
    last day, per day) and every login's wait."""
    spec, days, start, compare = SCENARIOS[name]
    runs = compare_runs(spec, days, SimSettings(start=start), list(compare))
    return {run.policy: {**run.to_json(), "waits": list(run.total.waits)} for run in runs}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_seed_gives_the_recorded_figures(name: str) -> None:
    recorded = json.loads(FIGURES.read_text(encoding="utf-8"))
    assert figures(name) == recorded[name]


if __name__ == "__main__":
    FIGURES.write_text(
        json.dumps({name: figures(name) for name in sorted(SCENARIOS)}, indent=1) + "\n",
        encoding="utf-8",
    )
