"""Pool policies the simulator can run: imagepipe's planner, and the original tool's ways."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from imagepipe.pool.actions import Action, CreateClone, DeleteClone, RecordClone
from imagepipe.pool.model import CloneRecord, CloneState, Observed, PoolRecord, PoolSpec, Standby
from imagepipe.record import replace


class Planner(Protocol):
    """imagepipe's planner as a policy uses it (the simulator's Replanner)."""

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float
    ) -> list[Action]:
        """What planner.plan answers."""
        ...

    def stored(self, record: PoolRecord, *states: CloneState) -> list[CloneRecord]:
        """The records of `record` in one of `states`, in no particular order (right after a
        pass of plan() on `record`)."""
        ...

    def idlest(self, record: PoolRecord) -> Iterator[CloneRecord]:
        """The free records of `record`, the longest idle first (by `since`, then the
        higher slot), right after a pass of plan() on `record`."""
        ...


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
        return planner.plan(spec, observed, record, now)


@dataclass(frozen=True)
class OriginalPolicy:
    """Behaves like the original daemon: a fixed free size (no schedule, no standby, no
    learning), one
    clone at a time (the next clone starts after the previous one is up; one worker), and a
    shrink that cuts every idle surplus clone at once."""

    name: str = "original"
    parallel: int | None = 1
    _last: dict[int, tuple[PoolSpec, PoolSpec]] = field(
        default_factory=dict, compare=False, repr=False
    )  # the last spec and its fixed copy

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, planner: Planner
    ) -> list[Action]:
        fixed = self._fixed(spec)
        actions = planner.plan(fixed, observed, record, now)
        created = [a.clone for a in actions if isinstance(a, CreateClone)]
        if created:  # one at a time: none while one is being built
            building = bool(planner.stored(record, _CREATING, _BOOTING))
            dropped = set(created if building else created[1:])
            actions = [a for a in actions if a.clone not in dropped or not _is_create(a)]
        return actions + _shrink_all(fixed, planner, record, actions, now)

    def _fixed(self, spec: PoolSpec) -> PoolSpec:
        """`spec` without schedule, standby or learning (the same object pass after pass, so
        the planner sees the same spec)."""
        last = self._last.get(id(spec))
        if last is not None and last[0] is spec:
            return last[1]
        fixed = replace(spec, schedule=(), standby=Standby.NONE, learn=None)
        self._last.clear()
        self._last[id(spec)] = (spec, fixed)
        return fixed


# read on every pass, named once: Python 3.11 reads a member through its Enum class slowly
_CREATING, _BOOTING, _FREE = CloneState.CREATING, CloneState.BOOTING, CloneState.FREE


def _shared_free(rec: CloneRecord | None, assigned: set[int]) -> bool:
    return rec is not None and rec.state is _FREE and rec.slot not in assigned


def _is_create(action: Action) -> bool:
    if isinstance(action, CreateClone):
        return True
    return isinstance(action, RecordClone) and action.record.state is _CREATING


def _shrink_all(
    spec: PoolSpec, planner: Planner, record: PoolRecord, planned: list[Action], now: float
) -> list[Action]:
    """Every free clone idle past shrink_after beyond the free size goes in one pass."""
    assigned = set(spec.assignments.values())
    free = planner.stored(record, _FREE)
    if assigned:
        free = [r for r in free if r.slot not in assigned]
    if len(free) <= spec.free:  # no surplus (the usual pass: nothing to count)
        return []
    touched = {a.clone for a in planned}
    records = record.clones
    planned_free = sum(1 for name in touched if _shared_free(records.get(name), assigned))
    surplus = len(free) - spec.free - planned_free
    if surplus <= 0:
        return []
    idle: list[CloneRecord] = []  # the `surplus` idlest past shrink_after, not planned for
    for rec in planner.idlest(record):
        if len(idle) == surplus or now - rec.since < spec.shrink_after:
            break  # the rest idled less
        if rec.name not in touched and rec.slot not in assigned:
            idle.append(rec)
    extra: list[Action] = []
    for rec in idle:
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
