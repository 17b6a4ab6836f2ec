"""Rollout rules for the planner (pure): which version a pool runs, when its rollout
started, when the drain deadline has passed, and how an active `imagepipe rollout` paces
blue/green.

The per-clone consequences (old clones get no new users, are deleted when free or when
their session ends, or at the deadline) are in planner/clones.py. With an active rollout
(`PoolRecord.rollout` onto the target version) the pool also keeps its old free desktops
serving until new ones are ready to take their place (`holds`, then `pace` after resize):

- new desktops are made and ready before free old ones go, so the count of ready free
  desktops never drops below the free target (or what the pool had, when it had less, or
  what `max` leaves beside the new version's desktops in use);
- the pool may hold `surge` clones above `max` for this (old free ones still serving);
- a canary allows only N new-version clones until it passed; a paused rollout makes no
  new clones and lets no old free one go;
- the rollout's deadline (not the pool file's drain_deadline) ends old sessions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from imagepipe.pool.actions import CreateClone, DeleteClone
from imagepipe.pool.model import (
    BackendState,
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
    RolloutPolicy,
)
from imagepipe.record import replace

if TYPE_CHECKING:  # the planner calls these rules with its pass; they never call the planner
    from imagepipe.pool.planner.resize import Decisions
    from imagepipe.pool.planner.steps import Context

# new-version clones that cannot become free soon: somebody is on them, or they are leaving
BUSY = (
    CloneState.IN_USE,
    CloneState.DISCONNECTED,
    CloneState.RECYCLING,
    CloneState.RETIRING,
    CloneState.STOPPED,
)


def target_of(observed: Observed, record: PoolRecord) -> int | None:
    """What the channel resolves to now; the remembered target when the registry could not
    say this pass."""
    return observed.target_version if observed.target_version is not None else record.target_version


def policy_of(record: PoolRecord, target: int | None) -> RolloutPolicy | None:
    """The active rollout's policy, when it moves the pool onto the version it runs now (a
    rollout whose channel has not moved yet, or was moved elsewhere, paces nothing)."""
    policy = record.rollout
    if policy is None or target is None or policy.to_version != target:
        return None
    return policy


def old_exists(record: PoolRecord, target: int | None, observed: Observed) -> bool:
    """A clone or a record of a version other than the target."""
    return target is not None and (
        any(c.info.version != target for c in observed.clones)
        or any(r.version != target for r in record.clones.values())
    )


def rollout_started(record: PoolRecord, target: int | None, old: bool, now: float) -> float | None:
    """When clones of another version began retiring; None when none are left."""
    if target is None or not old:
        return None
    if record.target_version != target or record.rollout_started_at is None:
        return now
    return record.rollout_started_at


def drain_deadline_passed(
    spec: PoolSpec, started: float | None, now: float, policy: RolloutPolicy | None = None
) -> bool:
    """Retiring clones are deleted even with a session: the only case a live session is cut.
    An active rollout's own deadline replaces the pool file's (`--drain`: none at all)."""
    if policy is not None:
        return policy.deadline_at is not None and now >= policy.deadline_at
    deadline = spec.drain_deadline
    return deadline is not None and started is not None and now - started >= deadline


def holds(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> bool:
    """An old clone that keeps serving while the rollout makes its replacement: free, clean,
    healthy, running, shared, and nobody on it."""
    info = oc.info
    return (
        ctx.rollout is not None
        and rec is not None
        and rec.state is CloneState.FREE
        and (not rec.dirty or ctx.persistent(info.slot))  # persistent desktops serve as left
        and rec.failures == 0
        and rec.retry_at is None
        and info.power is Power.RUNNING  # ready or not: a guest agent slow to answer one
        and info.slot not in ctx.assigned  # pass (a loaded host) must not cost a desktop
        and not oc.session.active
        and info.name not in ctx.touched
    )


def pace(d: Decisions, record: PoolRecord) -> None:
    """Blue/green pacing of an active rollout, once the pool is resized: drop the creates
    the surge, the canary or a pause does not allow, then let old free clones go only as
    far as new ready ones cover the free target."""
    ctx = d.ctx
    policy = ctx.rollout
    if policy is None or ctx.target is None:
        return
    held = sorted(
        (
            rec
            for name, rec in d.records.items()
            if rec.version != ctx.target
            and rec.state is CloneState.FREE
            and name in d.observed
            and not d.actions.get(name)
        ),
        key=lambda r: (r.since, r.slot),
    )
    _limit_creates(d, record, policy, len(held))
    if policy.paused:
        return
    going = max(0, min(len(held), new_ready_free(d) + len(held) - floor(d)))
    for rec in held[:going]:
        delete = DeleteClone(pool=ctx.spec.name, clone=rec.name)
        d.set(rec.name, replace(rec, state=CloneState.DELETING, since=ctx.now), (delete,))


def floor(d: Decisions) -> int:
    """Free desktops an active rollout keeps: the pass's free target (the one resize keeps,
    learned warm-up included), or as many as the new version can still offer within `max`
    beside its desktops in use."""
    ctx = d.ctx
    busy = sum(
        1
        for rec in d.records.values()
        if rec.version == ctx.target and rec.state in BUSY and rec.slot not in ctx.assigned
    )
    shared = ctx.spec.max - len(ctx.assigned)  # assigned slots' desktops never serve
    return min(ctx.free_target, max(0, shared - busy))


def new_ready_free(d: Decisions) -> int:
    """Clones of the target version that already serve: free, clean, shared, and ready in
    the balancer (an old free clone goes only once its replacement takes users)."""
    ctx = d.ctx
    count = 0
    for name, rec in d.records.items():
        seen = d.observed.get(name)
        count += (
            rec.version == ctx.target
            and rec.state is CloneState.FREE
            and (not rec.dirty or ctx.persistent(rec.slot))
            and rec.slot not in ctx.assigned
            and seen is not None
            and seen.info.ready is not None  # its readiness unread: not relied on
            and seen.backend is not None
            and seen.backend.state is BackendState.READY
            and not d.actions.get(name)
        )
    return count


def _limit_creates(d: Decisions, record: PoolRecord, policy: RolloutPolicy, held: int) -> None:
    ctx = d.ctx
    created = sorted(
        (
            name
            for name, actions in d.actions.items()
            if any(isinstance(a, CreateClone) for a in actions)
        ),
        key=lambda n: d.records[n].slot if n in d.records else 0,
    )
    if not created:
        return
    made_now = set(created)
    existing = sum(
        1
        for name, rec in d.records.items()
        if rec.version == ctx.target
        and rec.state is not CloneState.DELETING
        and name not in made_now
    )
    cap = ctx.spec.max + policy.surge - held
    if policy.canary is not None:
        cap = min(cap, policy.canary)
    allowed = 0 if policy.paused else max(0, cap - existing)
    for name in created[allowed:]:
        _undo_create(d, name, record.clones)


def _undo_create(d: Decisions, name: str, stored: Mapping[str, CloneRecord]) -> None:
    """Take back a create resize decided: the clone keeps the record it had, if any."""
    previous = stored.get(name)
    d.quiet.discard(name)
    if previous is None:
        d.records.pop(name, None)
        d.actions.pop(name, None)
    else:
        d.records[name] = previous
        d.actions[name] = ()
