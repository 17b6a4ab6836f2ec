"""The free target: how many free ready clones a pool wants now, after its schedule and,
for a pool that learns, after the logins expected soon (forecast.py)."""

from __future__ import annotations

from datetime import datetime

from imagepipe.pool.model import Arrivals, PoolSpec
from imagepipe.pool.planner.forecast import (
    floor_free,
    lead_of,
    learned_free,
    learning,
    next_bucket,
    zone,
)

_EDGE_MARGIN = 1e-3  # seconds: clock readings round to microseconds, sums of floats drift


def free_target(spec: PoolSpec, now: float, arrivals: Arrivals | None = None) -> int:
    """How many free ready clones the pool wants at `now`.

    The first schedule rule whose weekday and time window (in spec.timezone) contain `now`
    wins; a window whose end is before its start runs past midnight. A pool with `learn`
    and `arrivals` learned keeps enough for the logins expected within `learn.lead`, never
    fewer than the rule's free (or size.free, or learn.min_free) and never more than max.
    """
    scheduled = scheduled_free(spec, now)
    if spec.learn is None or arrivals is None:
        return spec.free if scheduled is None else scheduled
    return learned_free(spec, arrivals, now, floor_free(spec, scheduled))


def free_target_until(spec: PoolSpec, now: float, arrivals: Arrivals | None = None) -> float:
    """Until when (just before) free_target keeps the value it has at `now`: it reads the
    local minute of `now` (schedule) and the buckets of `now` and `now + lead` (learning),
    whose edges are whole minutes in every time zone with a whole-minute offset."""
    until = float("inf")
    if spec.schedule:
        until = now - now % 60.0 + 60.0
    if arrivals is not None and learning(spec, arrivals):
        lead = lead_of(spec)
        until = min(until, next_bucket(arrivals, now), next_bucket(arrivals, now + lead) - lead)
    return until - _EDGE_MARGIN


def scheduled_free(spec: PoolSpec, now: float) -> int | None:
    """The free size of the schedule rule in force at `now`; None when none is."""
    if not spec.schedule:
        return None
    local = datetime.fromtimestamp(now, zone(spec.timezone))
    minute = local.hour * 60 + local.minute
    for rule in spec.schedule:
        if rule.start_minute <= rule.end_minute:
            inside = rule.start_minute <= minute < rule.end_minute
            day = local.weekday()
        else:
            inside = minute >= rule.start_minute or minute < rule.end_minute
            day = local.weekday() if minute >= rule.start_minute else (local.weekday() - 1) % 7
        if inside and day in rule.days:
            return rule.free
    return None
