"""What a simulated day measured."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imagepipe.sim.timeline import Timeline


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 when empty)."""
    if not values:
        return 0.0
    rank = max(1, math.ceil(share * len(values)))
    return values[min(rank, len(values)) - 1]


@dataclass(frozen=True)
class SimResult:
    policy: str
    logins: int
    instant: int  # logins that found a ready desktop at once
    waits: tuple[float, ...]  # sorted, one per login (0 for instant)
    never_served: int  # still waiting when the simulation ended
    idle_desktop_hours: float
    peak_clones: int
    operations: Mapping[str, int]  # action kind -> how many were carried out
    simulated_seconds: float
    passes: int  # planner passes

    @property
    def instant_share(self) -> float:
        return self.instant / self.logins if self.logins else 1.0

    def wait(self, share: float) -> float:
        return percentile(self.waits, share)

    @property
    def max_wait(self) -> float:
        return self.waits[-1] if self.waits else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "logins": self.logins,
            "instant": self.instant,
            "instant_share": round(self.instant_share, 4),
            "wait_seconds": {
                "p50": self.wait(0.50),
                "p95": self.wait(0.95),
                "p99": self.wait(0.99),
                "max": self.max_wait,
            },
            "never_served": self.never_served,
            "idle_desktop_hours": round(self.idle_desktop_hours, 2),
            "peak_clones": self.peak_clones,
            "operations": dict(sorted(self.operations.items())),
            "planner_passes": self.passes,
        }


@dataclass(frozen=True)
class SimRun:
    """Several simulated days of one policy: each day (logins by the day they arrive, idle
    time by the day it falls in; the last day runs until its sessions end) and all of them."""

    policy: str
    days: tuple[SimResult, ...]
    total: SimResult
    timeline: Timeline | None = None  # when the settings asked for samples (charts)

    @property
    def last_day(self) -> SimResult:
        return self.days[-1]

    def to_json(self) -> dict[str, object]:
        """The whole run's figures (as one day's were), its day count, the last day apart
        (what a pool that learned from the days before does) and every day."""
        return {
            **self.total.to_json(),
            "days": len(self.days),
            "last_day": self.last_day.to_json(),
            "per_day": [day.to_json() for day in self.days],
        }
