"""Pool policies the simulator can run: imagepipe's planner, and the original tool's ways."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from imagepipe.pool.model import (
    Action,
    CloneState,
    CreateClone,
    DeleteClone,
    Observed,
    PoolRecord,
    PoolSpec,
    RecordClone,
    Standby,
)

# plan() itself, or what answers as it does (the simulator's Replanner)
Planner = Callable[[PoolSpec, Observed, PoolRecord, float], list[Action]]


class Policy(Protocol):
    @property
    def name(self) -> str:
        """Shown in the report."""
        ...

    @property
    def parallel(self) -> int | None:
        """Hypervisor operations at a time; None: the simulation's --parallel."""
        ...

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, planner: Planner
    ) -> list[Action]:
        """The actions for one keeper pass (`planner`: imagepipe's planner, as plan())."""
        ...


@dataclass(frozen=True)
class ImagepipePolicy:
    """The real planner, unchanged (`planner`: plan(), or what answers as it does)."""

    name: str = "imagepipe"
    parallel: int | None = None

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, planner: Planner
    ) -> list[Action]:
        return planner(spec, observed, record, now)


@dataclass(frozen=True)
class OriginalPolicy:
    """Behaves like the original daemon: a fixed free size (no schedule, no standby, no
    learning), one
    clone at a time (the next clone starts after the previous one is up; one worker), and a
    shrink that cuts every idle surplus clone at once."""

    name: str = "original"
    parallel: int | None = 1

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, planner: Planner
    ) -> list[Action]:
        fixed = replace(spec, schedule=(), standby=Standby.NONE, learn=None)
        actions = planner(fixed, observed, record, now)
        coming = _COMING
        building = any(r.state in coming for r in record.clones.values())
        created = [a.clone for a in actions if isinstance(a, CreateClone)]
        dropped = set(created if building else created[1:])
        kept = [a for a in actions if a.clone not in dropped or not _is_create(a)]
        return kept + _shrink_all(fixed, record, kept, now)


_COMING = frozenset((CloneState.CREATING, CloneState.BOOTING))


def _is_create(action: Action) -> bool:
    if isinstance(action, CreateClone):
        return True
    return isinstance(action, RecordClone) and action.record.state is CloneState.CREATING


def _shrink_all(
    spec: PoolSpec, record: PoolRecord, planned: list[Action], now: float
) -> list[Action]:
    """Every free clone idle past shrink_after beyond the free size goes in one pass."""
    assigned, state_free = set(spec.assignments.values()), CloneState.FREE
    free = [r for r in record.clones.values() if r.state is state_free and r.slot not in assigned]
    touched = {a.clone for a in planned}
    surplus = len(free) - spec.free - sum(1 for r in free if r.name in touched)
    if surplus <= 0:
        return []
    idle = sorted(
        (r for r in free if now - r.since >= spec.shrink_after and r.name not in touched),
        key=lambda r: (r.since, -r.slot),
    )
    extra: list[Action] = []
    for rec in idle[: max(surplus, 0)]:
        extra.append(DeleteClone(pool=spec.name, clone=rec.name))
        extra.append(
            RecordClone(
                pool=spec.name,
                clone=rec.name,
                record=replace(rec, state=CloneState.DELETING, since=now),
            )
        )
    return extra


POLICIES: dict[str, Policy] = {"imagepipe": ImagepipePolicy(), "original": OriginalPolicy()}
