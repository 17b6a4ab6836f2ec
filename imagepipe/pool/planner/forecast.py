"""Learned warm-up: how many logins to expect soon, from the logins of past days.

Pure. The keeper records each login in the store by local day and 5-minute bucket; once a
day it hands learn() that history and gets the expected logins per bucket of the week:

- for a weekday with history of the same weekday (up to HISTORY_WEEKS back): the mean of
  those days, bucket by bucket;
- until then, the mean of the past days of the same kind (Monday to Friday, or the weekend),
  so a pool learns a working day's rush from the day before;
- a kind of day never seen expects nobody (the floor holds).

A day without any recorded login counts as a quiet day (zero in every bucket) from the first
recorded day on: the keeper ran, nobody came.

The free target is then the logins expected from now to `learn.lead` ahead, plus one
standard deviation of a Poisson count (sqrt), rounded up, bounded by the floor (`size.free`,
or `learn.min_free` where the administrator allows fewer; a schedule rule's `free` when one
applies) and by `size.max`.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from imagepipe.pool.model import Arrivals, LoginHistory, PoolSpec

BUCKET = 300.0  # seconds: the history's and the forecast's resolution
DAY_BUCKETS = int(86400 // BUCKET)
WEEK_BUCKETS = 7 * DAY_BUCKETS
HISTORY_WEEKS = 4  # past weeks the forecast averages over (older days are pruned)
HISTORY_DAYS = 7 * HISTORY_WEEKS


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def day_and_bucket(now: float, timezone: str, bucket: float = BUCKET) -> tuple[int, int]:
    """The local day (date ordinal) and the bucket of that day `now` falls in."""
    local = datetime.fromtimestamp(now, zone(timezone))
    seconds = local.hour * 3600 + local.minute * 60 + local.second
    return local.toordinal(), int(seconds // bucket)


def weekday(day: int) -> int:
    """0 = Monday, for a date ordinal."""
    return date.fromordinal(day).weekday()


def learn(history: LoginHistory, today: int) -> Arrivals | None:
    """Expected logins per bucket of the week, from the days before `today` (None: no
    complete day recorded yet)."""
    if not history.days:
        return None
    first = max(min(history.days), today - HISTORY_DAYS)
    past = list(range(first, today))
    if not past:
        return None
    per_day = round(86400 / history.bucket)
    expected: list[float] = []
    for day_of_week in range(7):
        same = [d for d in past if weekday(d) == day_of_week]
        if not same:
            weekend = day_of_week >= 5
            same = [d for d in past if (weekday(d) >= 5) == weekend]
        expected += _mean_day(history, same, per_day)
    return Arrivals(bucket=history.bucket, expected=tuple(expected))


def _mean_day(history: LoginHistory, days: list[int], per_day: int) -> list[float]:
    totals = [0.0] * per_day
    for day in days:
        for index, count in history.days.get(day, {}).items():
            if 0 <= index < per_day:
                totals[index] += count
    return [t / len(days) for t in totals] if days else totals


def expected_logins(arrivals: Arrivals, timezone: str, start: float, end: float) -> float:
    """Logins expected in the buckets from the one holding `start` to the one holding `end`."""
    first = _week_index(arrivals, timezone, start)
    last = _week_index(arrivals, timezone, end)
    size = len(arrivals.expected)
    if last < first:  # the window crosses Sunday midnight
        last += size
    return sum(arrivals.expected[i % size] for i in range(first, last + 1))


def _week_index(arrivals: Arrivals, timezone: str, at: float) -> int:
    day, index = day_and_bucket(at, timezone, arrivals.bucket)
    return weekday(day) * round(86400 / arrivals.bucket) + index


def learned_free(spec: PoolSpec, arrivals: Arrivals, now: float, floor: int) -> int:
    """Free desktops for the logins expected within the lead, between floor and max."""
    lead = lead_of(spec)
    mean = expected_logins(arrivals, spec.timezone, now, now + lead)
    wanted = math.ceil(mean + math.sqrt(mean) - 1e-9) if mean > 0 else 0
    return max(0, min(max(wanted, floor), spec.max))


def lead_of(spec: PoolSpec) -> float:
    """How far ahead learning counts the logins expected (at most a day; 0: not learning)."""
    return min(spec.learn.lead, 86400.0) if spec.learn is not None else 0.0


def floor_free(spec: PoolSpec, scheduled: int | None) -> int:
    """The fewest free desktops learning may keep: a schedule rule's free where one applies,
    else size.free, or learn.min_free where the administrator allows fewer."""
    if scheduled is not None:
        return scheduled
    if spec.learn is not None and spec.learn.min_free is not None:
        return min(spec.learn.min_free, spec.free)
    return spec.free


def learning(spec: PoolSpec, arrivals: Arrivals | None) -> bool:
    """The pool learns and has learned something."""
    return spec.learn is not None and arrivals is not None


def shrink_after(spec: PoolSpec, arrivals: Arrivals | None) -> float:
    """How long a surplus free desktop idles before it goes: learning knows when the next
    rush comes, so it need not keep surplus for idle.shrink_after."""
    if spec.learn is not None and arrivals is not None:
        return min(spec.shrink_after, spec.learn.shrink_after)
    return spec.shrink_after


def next_bucket(arrivals: Arrivals, now: float) -> float:
    """When the learned target can next change (bucket edges are whole minutes in every
    time zone with a whole-minute offset)."""
    return now - now % arrivals.bucket + arrivals.bucket
