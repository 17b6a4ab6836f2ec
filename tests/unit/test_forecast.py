"""Learned warm-up: what the planner expects from past logins, and what it keeps free."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from imagepipe.pool.actions import CreateClone, DeleteClone, RecordClone
from imagepipe.pool.model import (
    Arrivals,
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    LearnSpec,
    LoginHistory,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
    ScheduleRule,
)
from imagepipe.pool.planner import free_target, free_target_until, logins_in, next_timer, plan
from imagepipe.pool.planner.forecast import (
    BUCKET,
    DAY_BUCKETS,
    WEEK_BUCKETS,
    day_and_bucket,
    learn,
)
from imagepipe.record import replace

LEARN = LearnSpec(lead=600.0, shrink_after=300.0)
LAB = PoolSpec(name="lab", image="win10", initial=0, free=2, max=40, port_last=6100, learn=LEARN)
MONDAY = date(2024, 1, 8).toordinal()  # a Monday
UTC = ZoneInfo("UTC")


def at(day: int, hour: int, minute: int = 0) -> float:
    """Seconds since the epoch of `hour:minute` UTC on date ordinal `day`."""
    d = date.fromordinal(day)
    return datetime(d.year, d.month, d.day, hour, minute, tzinfo=UTC).timestamp()


def rush(day: int, logins: int, hour: int = 8, minute: int = 30) -> dict[int, dict[int, int]]:
    """`logins` logins in the 5-minute bucket at hour:minute of `day`."""
    return {day: {(hour * 60 + minute) // 5: logins}}


def test_nothing_is_learned_before_a_whole_day_was_recorded() -> None:
    assert learn(LoginHistory(BUCKET), MONDAY) is None
    today_only = LoginHistory(BUCKET, rush(MONDAY, 30))
    assert learn(today_only, MONDAY) is None
    assert free_target(LAB, at(MONDAY, 8, 25), None) == LAB.free


def test_a_rush_seen_yesterday_is_expected_today_and_prepared_for_ahead_of_time() -> None:
    tuesday = MONDAY + 1
    arrivals = learn(LoginHistory(BUCKET, rush(MONDAY, 30)), tuesday)
    assert arrivals is not None
    assert free_target(LAB, at(tuesday, 7, 0), arrivals) == LAB.free  # nothing expected
    assert free_target(LAB, at(tuesday, 8, 20), arrivals) >= 30  # the rush is 10 min ahead
    assert free_target(LAB, at(tuesday, 9, 0), arrivals) == LAB.free  # it is over


def test_the_same_weekday_wins_over_other_working_days() -> None:
    history = {**rush(MONDAY, 5), **rush(MONDAY + 7, 20, hour=10)}  # two Mondays
    history[MONDAY + 1] = {(8 * 60 + 30) // 5: 30}  # a Tuesday with an 08:30 rush
    arrivals = learn(LoginHistory(BUCKET, history), MONDAY + 14)
    assert arrivals is not None
    monday_0830 = (8 * 60 + 30) // 5
    assert arrivals.expected[monday_0830] == 5 / 2  # the Mondays' mean
    assert arrivals.expected[(10 * 60 + 30) // 5] == 20 / 2
    assert arrivals.expected[DAY_BUCKETS + monday_0830] == 30 / 2  # Tuesdays: 30 and a quiet one


def test_working_days_do_not_teach_the_weekend() -> None:
    history = {MONDAY + d: {100: 40} for d in range(5)}
    arrivals = learn(LoginHistory(BUCKET, history), MONDAY + 5)
    assert arrivals is not None
    saturday = 5 * DAY_BUCKETS
    assert arrivals.expected[saturday + 100] == 0
    assert arrivals.expected[4 * DAY_BUCKETS + 100] == 40  # Friday learned from the week


def test_a_day_nobody_logged_in_counts_as_a_quiet_day() -> None:
    history = {MONDAY: {100: 40}, MONDAY + 2: {100: 20}}  # Tuesday: nobody came
    arrivals = learn(LoginHistory(BUCKET, history), MONDAY + 3)
    assert arrivals is not None
    assert arrivals.expected[3 * DAY_BUCKETS + 100] == 20  # (40 + 0 + 20) / 3


def test_learning_never_keeps_fewer_than_free_unless_the_pool_allows_it() -> None:
    quiet = Arrivals(BUCKET, (0.0,) * WEEK_BUCKETS)
    assert free_target(LAB, at(MONDAY, 3), quiet) == 2
    allowed = replace(LAB, learn=replace(LEARN, min_free=0))
    assert free_target(allowed, at(MONDAY, 3), quiet) == 0


def test_a_schedule_rule_in_force_is_the_floor_of_what_learning_keeps() -> None:
    rule = ScheduleRule(frozenset(range(5)), 7 * 60, 12 * 60, 10)
    spec = replace(LAB, schedule=(rule,), learn=replace(LEARN, min_free=0))
    quiet = Arrivals(BUCKET, (0.0,) * WEEK_BUCKETS)
    assert free_target(spec, at(MONDAY, 8), quiet) == 10
    assert free_target(spec, at(MONDAY, 13), quiet) == 0


def test_a_pool_that_does_not_learn_ignores_what_was_learned() -> None:
    busy = Arrivals(BUCKET, (50.0,) * WEEK_BUCKETS)
    assert free_target(replace(LAB, learn=None), at(MONDAY, 8), busy) == 2


def test_the_keeper_wakes_when_the_learned_target_can_change() -> None:
    arrivals = Arrivals(BUCKET, (0.0,) * WEEK_BUCKETS)
    now = at(MONDAY, 8, 1)
    record = PoolRecord(pool="lab", arrivals=arrivals)
    assert next_timer(LAB, record, now) == at(MONDAY, 8, 5)
    assert next_timer(replace(LAB, learn=None), record, now) is None


def test_logins_are_counted_when_a_free_desktop_gets_a_user_not_on_reconnect() -> None:
    free = CloneRecord("lab-0", 0, 1, CloneState.FREE, 0.0)
    away = CloneRecord("lab-1", 1, 1, CloneState.DISCONNECTED, 0.0)
    record = PoolRecord(pool="lab", clones={"lab-0": free, "lab-1": away})
    actions = [
        RecordClone(pool="lab", clone="lab-0", record=replace(free, state=CloneState.IN_USE)),
        RecordClone(pool="lab", clone="lab-1", record=replace(away, state=CloneState.IN_USE)),
        RecordClone(
            pool="lab",
            clone="lab-2",  # adopted: the store did not know it
            record=CloneRecord("lab-2", 2, 1, CloneState.IN_USE, 0.0),
        ),
    ]
    assert logins_in(record, actions) == 1


def test_day_and_bucket_follow_the_pool_timezone() -> None:
    now = at(MONDAY, 7, 31)  # 08:31 in Paris in January
    assert day_and_bucket(now, "UTC") == (MONDAY, (7 * 60 + 30) // 5)
    assert day_and_bucket(now, "Europe/Paris") == (MONDAY, (8 * 60 + 30) // 5)


def _free_clone(slot: int, since: float) -> tuple[ObservedClone, CloneRecord]:
    name = f"lab-{slot}"
    display = Endpoint("127.0.0.1", 5900 + slot)
    info = CloneInfo(name, "lab", slot, "win10", 1, Power.RUNNING, display, ready=True)
    backend = Backend(name, display, BackendState.READY)
    return ObservedClone(info=info, backend=backend), CloneRecord(
        name, slot, 1, CloneState.FREE, since
    )


def test_in_quiet_hours_surplus_desktops_go_after_learn_shrink_after_not_idle_shrink_after() -> (
    None
):
    now = at(MONDAY, 12)
    clones = [_free_clone(slot, now - 400.0) for slot in range(6)]
    observed = Observed(clones=tuple(c for c, _ in clones), target_version=1, base_ready=True)
    quiet = Arrivals(BUCKET, (0.0,) * WEEK_BUCKETS)
    record = PoolRecord(
        pool="lab", clones={r.name: r for _, r in clones}, target_version=1, arrivals=quiet
    )
    learned = plan(LAB, observed, record, now)
    assert sum(isinstance(a, DeleteClone) for a in learned) == 1  # one per pass, as ever
    fixed = plan(replace(LAB, learn=None), observed, record, now)
    assert not any(isinstance(a, DeleteClone) for a in fixed)  # idle.shrink_after is 2 h


# ---- properties ----------------------------------------------------------------------

histories = st.dictionaries(
    st.integers(MONDAY - 40, MONDAY + 27),
    st.dictionaries(st.integers(0, DAY_BUCKETS - 1), st.integers(0, 200), max_size=6),
    max_size=12,
)
specs = st.builds(
    lambda free, extra, lead, min_free: replace(
        LAB,
        free=free,
        max=free + extra,
        learn=LearnSpec(lead=lead, min_free=min_free),
    ),
    st.integers(0, 10),
    st.integers(0, 60),
    st.floats(60.0, 4 * 3600.0),
    st.one_of(st.none(), st.integers(0, 10)),
)


@settings(max_examples=200, deadline=None)
@given(histories, specs, st.integers(MONDAY + 28, MONDAY + 35), st.floats(0, 86400.0))
def test_the_learned_target_stays_within_max_and_the_floor(
    history: dict[int, dict[int, int]], spec: PoolSpec, today: int, second: float
) -> None:
    arrivals = learn(LoginHistory(BUCKET, history), today)
    now = at(today, 0) + second
    target = free_target(spec, now, arrivals)
    assert target <= spec.max
    assert spec.learn is not None
    floor = spec.free if spec.learn.min_free is None else min(spec.learn.min_free, spec.free)
    assert target >= min(floor, spec.max)


week_days = st.lists(
    st.dictionaries(st.integers(0, DAY_BUCKETS - 1), st.integers(0, 50), max_size=5),
    min_size=7,
    max_size=7,
)


@settings(max_examples=60, deadline=None)
@given(week_days, st.integers(1, 6))
def test_a_repeating_week_is_learned_exactly_and_more_weeks_change_nothing(
    week: list[dict[int, int]], weeks: int
) -> None:
    def history(n: int) -> LoginHistory:
        return LoginHistory(BUCKET, {MONDAY + d: week[d % 7] for d in range(7 * n)})

    learned = learn(history(weeks), MONDAY + 7 * weeks)
    assert learned is not None
    for day, counts in enumerate(week):
        for bucket in range(DAY_BUCKETS):
            assert learned.expected[day * DAY_BUCKETS + bucket] == counts.get(bucket, 0)
    assert learn(history(weeks + 1), MONDAY + 7 * (weeks + 1)) == learned


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, WEEK_BUCKETS - 1), st.floats(0, 80.0), max_size=40))
def test_an_empty_learning_pool_never_plans_more_desktops_than_max(
    busy: dict[int, float],
) -> None:
    arrivals = Arrivals(BUCKET, tuple(busy.get(i, 0.0) for i in range(WEEK_BUCKETS)))
    record = PoolRecord(pool="lab", target_version=1, arrivals=arrivals)
    for bucket in [*busy][:3] or [0]:
        now = at(MONDAY, 0) + bucket * BUCKET - 300.0  # a rush (or a quiet time) ahead
        actions = plan(LAB, Observed(target_version=1, base_ready=True), record, now)
        assert sum(isinstance(a, CreateClone) for a in actions) <= LAB.max


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 12),
    st.dictionaries(st.integers(0, WEEK_BUCKETS - 1), st.floats(0, 30.0), max_size=20),
    st.integers(0, WEEK_BUCKETS - 1),
    st.one_of(st.none(), st.integers(0, 2)),
)
def test_a_learning_pool_never_shrinks_below_its_floor(
    free: int, busy: dict[int, float], bucket: int, min_free: int | None
) -> None:
    spec = replace(LAB, learn=replace(LEARN, min_free=min_free))
    now = at(MONDAY, 0) + bucket * BUCKET
    clones = [_free_clone(slot, now - 7200.0) for slot in range(free)]
    observed = Observed(clones=tuple(c for c, _ in clones), target_version=1, base_ready=True)
    arrivals = Arrivals(BUCKET, tuple(busy.get(i, 0.0) for i in range(WEEK_BUCKETS)))
    record = PoolRecord(
        pool="lab", clones={r.name: r for _, r in clones}, target_version=1, arrivals=arrivals
    )
    actions = plan(spec, observed, record, now)
    deleted = sum(isinstance(a, DeleteClone) for a in actions)
    floor = spec.free if min_free is None else min(min_free, spec.free)
    assert free - deleted >= min(free, floor)
    assert free - deleted >= min(free, free_target(spec, now, arrivals))


@settings(max_examples=80, deadline=None)
@given(
    st.dictionaries(st.integers(0, WEEK_BUCKETS - 1), st.floats(0, 30.0), max_size=60),
    st.floats(0, 7 * 86400.0),
    st.sampled_from([0.0, 60.0, 600.0, 1000.0, 3599.5]),
    st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kathmandu", "America/St_Johns"]),
    st.booleans(),
)
def test_the_free_target_holds_until_the_moment_it_says(
    busy: dict[int, float], offset: float, lead: float, timezone: str, scheduled: bool
) -> None:
    """The simulator reuses a pool's free target until free_target_until: a schedule rule
    (minutes) or the learned buckets of now and now + lead (any lead; the week holds
    Europe's spring DST change on 2024-03-31)."""
    rule = ScheduleRule(frozenset(range(5)), 7 * 60 + 1, 12 * 60 + 7, 9)
    spec = replace(
        LAB,
        timezone=timezone,
        learn=replace(LEARN, lead=lead),
        schedule=(rule,) if scheduled else (),
    )
    arrivals = Arrivals(BUCKET, tuple(busy.get(i, 0.0) for i in range(WEEK_BUCKETS)))
    now = at(date(2024, 3, 28).toordinal(), 0) + offset
    until = free_target_until(spec, now, arrivals)
    value = free_target(spec, now, arrivals)
    assert now - 1.0 < until <= now + BUCKET
    for probe in [now + (until - now) * k / 8 for k in range(8)] + [until - 1e-6]:
        if probe >= now:
            assert free_target(spec, probe, arrivals) == value, (probe - now, until - now)
