"""A rollout's state after a keeper pass, judged from its pools (pure).

    judge(rollout, views, now) -> Verdict

Per pool: new desktops ready or on their way, old desktops still serving, in use, leaving.
Then, in order: rolling back (stays so until the keeper moved the channel back); the
channel moved elsewhere (failed); the new version's desktops failed (the pool's breaker
opened: rolling back, the keeper points the channel back, driver.py); paused;
every old desktop gone (done); the new base not ready (waiting for base); the canary
(waits for `rollout resume`, or goes on once `bake` passed with no failure); in progress.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from imagepipe.pool.model import CloneState, Observed, PoolRecord, PoolSpec
from imagepipe.pool.planner.schedule import free_target
from imagepipe.pool.rollout.records import PoolProgress, Rollout, RolloutState
from imagepipe.record import replace

_BOOTING = (CloneState.CREATING, CloneState.BOOTING, CloneState.FAILED)
_IN_USE = (CloneState.IN_USE, CloneState.DISCONNECTED, CloneState.RECYCLING)


@dataclass(frozen=True)
class PoolView:
    """One pool of the rollout after a pass."""

    spec: PoolSpec
    observed: Observed
    record: PoolRecord  # the record the keeper planned with (learned arrivals included)
    note: str | None = None  # why the pool cannot make desktops (observe's note)


@dataclass(frozen=True)
class Verdict:
    rollout: Rollout
    move_back: bool = False  # point the channel back at from_version (rolling back)
    warnings: tuple[float, ...] = ()  # deadline warnings due now (seconds before it)


def progress(rollout: Rollout, view: PoolView) -> PoolProgress:
    """Counts of one pool's desktops by version and state (from the store's records, and
    the host for clones the store does not know yet)."""
    to = rollout.to_version
    new_ready = new_booting = new_in_use = old_free = old_in_use = old_leaving = 0
    records = view.record.clones
    for rec in records.values():
        state = rec.state
        if rec.version == to:
            new_ready += state is CloneState.FREE
            new_booting += state in _BOOTING
            new_in_use += state in _IN_USE
        elif state is CloneState.FREE:
            old_free += 1
        elif state in (CloneState.RETIRING, *_IN_USE):
            old_in_use += 1
        else:
            old_leaving += 1
    old_leaving += sum(
        1 for oc in view.observed.clones if oc.name not in records and oc.info.version != to
    )
    before = rollout.pool_progress(view.spec.name)
    old_now = old_free + old_in_use + old_leaving
    return PoolProgress(
        pool=view.spec.name,
        new_ready=new_ready,
        new_booting=new_booting,
        new_in_use=new_in_use,
        old_free=old_free,
        old_in_use=old_in_use,
        old_leaving=old_leaving,
        old_at_start=before.old_at_start if before is not None else old_now,
        failures=view.record.failures,
        waiting=_waiting(view),
    )


def _waiting(view: PoolView) -> str | None:
    """Why the pool waits: its base is not ready, or its version is still being sent to
    hosts it may use (how far each upload got)."""
    if not view.observed.base_ready:
        return view.note or "the new base is not ready"
    uploads = [
        f"{room.upload.image} v{room.upload.version} to {room.name}: {room.upload.amount()}"
        for room in view.observed.hosts
        if room.upload is not None
    ]
    return "uploading " + "; ".join(uploads) if uploads else None


def judge(rollout: Rollout, views: Sequence[PoolView], now: float) -> Verdict:
    """The rollout after this pass; its active states only (a finished one is returned
    unchanged)."""
    if not rollout.active:
        return Verdict(rollout)
    pools = tuple(progress(rollout, v) for v in views)
    r = replace(rollout, progress=pools, updated_at=now)
    if r.state is RolloutState.ROLLING_BACK:
        return Verdict(r, move_back=True)
    moved = [v for v in views if v.observed.target_version not in (None, r.to_version)]
    if moved:
        if r.state is RolloutState.PENDING:
            why = f"waiting for channel {r.channel} of {r.image} to point at v{r.to_version}"
            return Verdict(replace(r, reason=why))
        other = moved[0].observed.target_version
        why = f"channel {r.channel} of {r.image} was moved to v{other} outside this rollout"
        return Verdict(_ended(r, RolloutState.FAILED, why, now))
    broken = [  # a breaker that opened during this rollout: the new version's desktops failed
        v
        for v in views
        if (until := v.record.breaker_open_until) is not None
        and now < until
        and until - v.spec.breaker_cooldown >= r.created_at
    ]
    if broken:
        v = broken[0]
        why = (
            f"v{r.to_version}'s desktops failed in pool {v.spec.name} ({v.record.failures} "
            f"failures in a row, its breaker opened): back to v{r.from_version}"
        )
        back = replace(r, state=RolloutState.ROLLING_BACK, reason=why, paused=False)
        return Verdict(back, move_back=True)
    warnings = _due_warnings(r, now)
    if warnings:
        r = replace(r, warned=(*r.warned, *warnings))
    if all(p.old_left == 0 and p.new_booting == 0 for p in pools):
        return Verdict(_ended(r, RolloutState.DONE, None, now), warnings=warnings)
    if r.paused:
        why = f"paused: `imagepipe rollout resume {r.image}` goes on"
        return Verdict(replace(r, state=RolloutState.PAUSED, reason=why), warnings=warnings)
    waiting_base = [
        v
        for v, p in zip(views, pools, strict=True)
        if not v.observed.base_ready and p.new_ready < free_target(v.spec, now, v.record.arrivals)
    ]
    if waiting_base and all(p.new_booting == 0 for p in pools):
        v = waiting_base[0]
        why = v.note or f"the base of {r.image} v{r.to_version} is not ready to clone"
        return Verdict(
            replace(r, state=RolloutState.WAITING_FOR_BASE, reason=why), warnings=warnings
        )
    if r.canary is not None and not r.canary_passed:
        return Verdict(_canary(r, pools, now), warnings=warnings)
    return Verdict(
        replace(r, state=RolloutState.IN_PROGRESS, reason=_why(r, pools)), warnings=warnings
    )


def _canary(r: Rollout, pools: tuple[PoolProgress, ...], now: float) -> Rollout:
    assert r.canary is not None
    failed = r.canary_failed or any(p.failures > 0 for p in pools)
    ready = all(p.new_ready + p.new_in_use >= r.canary for p in pools)
    ready_at = r.canary_ready_at if r.canary_ready_at is not None else (now if ready else None)
    r = replace(r, canary_failed=failed, canary_ready_at=ready_at)
    if failed:
        why = (
            f"a canary desktop of v{r.to_version} failed: `imagepipe rollout resume {r.image}` "
            f"goes on, `imagepipe rollout undo {r.image}` goes back"
        )
    elif ready_at is None:
        why = f"canary: making {r.canary} desktop(s) of v{r.to_version} per pool"
    elif r.bake is not None and now >= ready_at + r.bake:
        go_on = replace(r, canary_passed=True, state=RolloutState.IN_PROGRESS)
        return replace(go_on, reason=_why(go_on, pools))
    elif r.bake is not None:
        why = f"canary ready; baking until {_clock(ready_at + r.bake)}, then going on"
    else:
        why = f"canary ready: `imagepipe rollout resume {r.image}` goes on"
    return replace(r, state=RolloutState.CANARY, reason=why)


def _why(r: Rollout, pools: tuple[PoolProgress, ...]) -> str:
    booting = sum(p.new_booting for p in pools)
    in_use = sum(p.old_in_use for p in pools)
    serving = sum(p.old_free for p in pools)
    parts = []
    if booting:
        parts.append(f"{booting} new desktop(s) starting")
    if serving:
        parts.append(f"{serving} old free desktop(s) serving until new ones are ready")
    if in_use:
        end = f", ended at {_clock(r.deadline_at)}" if r.deadline_at is not None else ""
        parts.append(f"waiting for {in_use} user(s) on v{r.from_version} to log off{end}")
    return "; ".join(parts) or "removing old desktops"


def _due_warnings(r: Rollout, now: float) -> tuple[float, ...]:
    if r.deadline_at is None or now >= r.deadline_at:
        return ()
    return tuple(w for w in r.warn_before if w not in r.warned and now >= r.deadline_at - w)


def _ended(r: Rollout, state: RolloutState, reason: str | None, now: float) -> Rollout:
    return replace(r, state=state, reason=reason, finished_at=now, paused=False)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))
