"""The free target: how many free ready clones a pool wants now, after its schedule."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from imagepipe.pool.model import PoolSpec


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def free_target(spec: PoolSpec, now: float) -> int:
    """How many free ready clones the pool wants at `now`, after its schedule.

    The first schedule rule whose weekday and time window (in spec.timezone) contain `now`
    wins; a window whose end is before its start runs past midnight.
    """
    if not spec.schedule:
        return spec.free
    local = datetime.fromtimestamp(now, _zone(spec.timezone))
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
    return spec.free
