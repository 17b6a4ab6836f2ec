"""One example per pool rule of the planner (docs/pools.md, "Rules")."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from imagepipe.pool.actions import (
    Action,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    ResetClone,
    ResumeClone,
    StartClone,
    SuspendClone,
)
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    OnLogoff,
    PoolRecord,
    PoolSpec,
    Power,
    ScheduleRule,
    Standby,
)
from imagepipe.pool.planner import (
    CLONE_RETRIES,
    classify,
    failures_after,
    free_target,
    next_timer,
    plan,
)
from imagepipe.record import replace

T0 = 1_700_000_000.0
SPEC = PoolSpec(name="lab", image="win10", initial=2, free=2, max=4)


def clone(
    slot: int,
    *,
    version: int = 1,
    power: Power = Power.RUNNING,
    ready: bool = True,
    session: GuestSession = GuestSession(),
    backend: BackendState | None = BackendState.READY,
    connections: int = 0,
) -> ObservedClone:
    name = f"lab-{slot}"
    display = Endpoint("127.0.0.1", 5900 + slot)
    info = CloneInfo(name, "lab", slot, "win10", version, power, display, ready)
    be = None if backend is None else Backend(name, display, backend, connections)
    return ObservedClone(info=info, session=session, backend=be)


def rec(
    slot: int, state: CloneState, since: float = T0, *, version: int = 1, **kw: object
) -> CloneRecord:
    return replace(CloneRecord(f"lab-{slot}", slot, version, state, since), **kw)  # type: ignore[arg-type]


def pool(*records: CloneRecord, target: int | None = 1, **kw: object) -> PoolRecord:
    return replace(  # type: ignore[arg-type]
        PoolRecord("lab", {r.name: r for r in records}, target_version=target), **kw
    )


def observed(
    *clones: ObservedClone,
    target: int = 1,
    base_ready: bool = True,
    orphans: Sequence[Backend] = (),
    in_flight: Sequence[str] = (),
) -> Observed:
    return Observed(tuple(clones), tuple(orphans), target, base_ready, frozenset(in_flight))


def of(kind: type[Action], actions: list[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def records_of(actions: list[Action]) -> dict[str, CloneRecord]:
    return {a.clone: a.record for a in actions if isinstance(a, RecordClone)}


USER = GuestSession(client="10.0.0.9", connected_since=T0, users=("ann",))
GONE_CLIENT = GuestSession(client=None, users=("ann",))


def converged() -> tuple[Observed, PoolRecord]:
    return (
        observed(clone(0), clone(1)),
        pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE)),
    )


def test_converged_pool_needs_nothing() -> None:
    obs, record = converged()
    assert plan(SPEC, obs, record, T0 + 60) == []


def test_empty_pool_creates_initial_clones_on_lowest_slots_with_their_ports() -> None:
    actions = plan(SPEC, observed(), pool(), T0)
    creates = of(CreateClone, actions)
    assert [(c.clone, c.slot, c.display.port) for c in creates] == [  # type: ignore[attr-defined]
        ("lab-0", 0, 5900),
        ("lab-1", 1, 5901),
    ]
    assert {r.state for r in records_of(actions).values()} == {CloneState.CREATING}


def test_replanning_while_create_in_flight_does_not_create_twice() -> None:
    first = plan(SPEC, observed(), pool(), T0)
    record = pool(*records_of(first).values(), failures=0)
    in_flight = observed(in_flight=["lab-0", "lab-1"])
    again = plan(SPEC, in_flight, replace(record, target_version=1), T0 + 5)
    assert of(CreateClone, again) == []


def test_create_that_never_shows_up_is_failed_and_retried_with_backoff() -> None:
    record = pool(rec(0, CloneState.CREATING), rec(1, CloneState.CREATING))
    hung = observed(in_flight=["lab-0", "lab-1"])
    actions = plan(SPEC, hung, record, T0 + SPEC.boot_timeout)
    failed = records_of(actions)
    assert failed["lab-0"].state is CloneState.FAILED
    assert failed["lab-0"].retry_at == T0 + SPEC.boot_timeout + SPEC.retry_backoff
    assert of(CreateClone, actions) == []
    later = plan(SPEC, observed(), pool(*failed.values()), T0 + SPEC.boot_timeout + 10)
    assert {a.clone for a in of(CreateClone, later)} == {"lab-0", "lab-1"}


def test_made_clone_is_started_then_enabled_when_ready() -> None:
    record = pool(rec(0, CloneState.CREATING), rec(1, CloneState.FREE))
    made = clone(0, power=Power.SHUTOFF, ready=False, backend=None)
    actions = plan(SPEC, observed(made, clone(1)), record, T0 + 5)
    assert of(StartClone, actions) == [StartClone(pool="lab", clone="lab-0")]
    booted = pool(rec(0, CloneState.BOOTING, T0 + 5), rec(1, CloneState.FREE))
    actions = plan(SPEC, observed(clone(0, backend=None), clone(1)), booted, T0 + 40)
    assert of(BalancerEnable, actions)[0].clone == "lab-0"
    assert records_of(actions)["lab-0"].state is CloneState.FREE


def test_keeps_free_target_by_creating_when_free_clones_get_users() -> None:
    obs = observed(clone(0, session=USER), clone(1))
    actions = plan(SPEC, obs, pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE)), T0)
    assert [a.clone for a in of(CreateClone, actions)] == ["lab-2"]
    assert of(BalancerDrain, actions) == [BalancerDrain(pool="lab", clone="lab-0")]
    assert records_of(actions)["lab-0"].state is CloneState.IN_USE


def test_never_exceeds_max_counting_clones_being_created() -> None:
    spec = replace(SPEC, max=3)
    obs = observed(clone(0, session=USER), clone(1, session=USER))
    record = pool(rec(0, CloneState.IN_USE), rec(1, CloneState.IN_USE), rec(2, CloneState.CREATING))
    obs = replace(obs, in_flight=frozenset({"lab-2"}))
    assert of(CreateClone, plan(spec, obs, record, T0 + 1)) == []


def test_never_clones_from_a_base_that_is_not_ready() -> None:
    assert of(CreateClone, plan(SPEC, observed(base_ready=False), pool(), T0)) == []


def test_schedule_raises_free_target_in_local_time() -> None:
    rule = ScheduleRule(days=frozenset({0}), start_minute=7 * 60, end_minute=12 * 60, free=10)
    spec = replace(SPEC, schedule=(rule,), timezone="Europe/Berlin")
    monday_8 = datetime(2024, 1, 8, 8, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert free_target(spec, monday_8) == 10
    assert free_target(spec, monday_8 - 2 * 3600) == 2  # 06:00 local
    assert free_target(spec, monday_8 + 86400) == 2  # Tuesday


def test_logoff_recycles_after_delay_with_reset() -> None:
    obs, _ = converged()
    record = pool(rec(0, CloneState.IN_USE), rec(1, CloneState.FREE))
    actions = plan(SPEC, obs, record, T0 + 100)
    recycling = records_of(actions)["lab-0"]
    assert recycling.state is CloneState.RECYCLING and recycling.session_ended_at == T0 + 100
    assert of(ResetClone, actions) == []
    due = plan(SPEC, obs, pool(recycling, rec(1, CloneState.FREE)), T0 + 100 + SPEC.recycle_after)
    assert of(ResetClone, due) == [ResetClone(pool="lab", clone="lab-0")]


def test_logoff_with_on_logoff_delete_deletes_the_clone() -> None:
    spec = replace(SPEC, on_logoff=OnLogoff.DELETE)
    record = pool(rec(0, CloneState.RECYCLING, session_ended_at=T0), rec(1, CloneState.FREE))
    actions = plan(spec, observed(clone(0, backend=BackendState.DRAIN), clone(1)), record, T0 + 60)
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-0")]
    assert of(BalancerRemove, actions) == [BalancerRemove(pool="lab", clone="lab-0")]


def test_persistent_desktop_is_kept_and_restarted_after_power_off() -> None:
    spec = replace(SPEC, on_logoff=OnLogoff.KEEP)
    off = clone(0, power=Power.SHUTOFF, ready=False, backend=None)
    record = pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE))
    first = plan(spec, observed(off, clone(1)), record, T0 + 10)
    stopped = records_of(first)["lab-0"]
    assert stopped.state is CloneState.STOPPED and of(StartClone, first) == []
    later = plan(spec, observed(off, clone(1)), pool(stopped, rec(1, CloneState.FREE)), T0 + 70)
    assert of(StartClone, later) == [StartClone(pool="lab", clone="lab-0")]
    assert of(ResetClone, later) == [] and of(DeleteClone, later) == []


def test_disconnected_user_keeps_desktop_until_timeout_then_it_is_recycled() -> None:
    obs = observed(clone(0, session=GONE_CLIENT, backend=BackendState.DRAIN), clone(1))
    record = pool(rec(0, CloneState.IN_USE), rec(1, CloneState.FREE))
    first = plan(SPEC, obs, record, T0 + 10)
    assert records_of(first)["lab-0"].state is CloneState.DISCONNECTED
    disc = records_of(first)["lab-0"]
    before = plan(SPEC, obs, pool(disc, rec(1, CloneState.FREE)), T0 + 10 + 3600)
    assert of(ResetClone, before) == [] and "lab-0" not in records_of(before)
    after = plan(
        SPEC,
        obs,
        pool(disc, rec(1, CloneState.FREE)),
        T0 + 10 + SPEC.disconnect_timeout + SPEC.recycle_after,
    )
    assert of(ResetClone, after) == [ResetClone(pool="lab", clone="lab-0")]


def test_logoff_while_disconnected_recycles_after_recycle_after_not_disconnect_timeout() -> None:
    disc = rec(0, CloneState.DISCONNECTED, T0 + 10, last_user="ann")
    logged_off = observed(clone(0, backend=BackendState.DRAIN), clone(1))
    actions = plan(SPEC, logged_off, pool(disc, rec(1, CloneState.FREE)), T0 + 100)
    recycling = records_of(actions)["lab-0"]
    assert recycling.state is CloneState.RECYCLING and recycling.session_ended_at == T0 + 100
    due = plan(
        SPEC, logged_off, pool(recycling, rec(1, CloneState.FREE)), T0 + 100 + SPEC.recycle_after
    )
    assert of(ResetClone, due) == [ResetClone(pool="lab", clone="lab-0")]


def test_user_returning_during_recycle_delay_keeps_the_desktop() -> None:
    record = pool(rec(0, CloneState.RECYCLING, session_ended_at=T0), rec(1, CloneState.FREE))
    actions = plan(SPEC, observed(clone(0, session=USER), clone(1)), record, T0 + 120)
    assert of(ResetClone, actions) == []
    assert records_of(actions)["lab-0"].state is CloneState.IN_USE


def test_shrink_removes_one_idle_surplus_clone_per_pass_never_below_free_target() -> None:
    clones = [clone(i) for i in range(4)]
    record = pool(*(rec(i, CloneState.FREE, T0 + i) for i in range(4)))
    now = T0 + SPEC.shrink_after + 10
    actions = plan(SPEC, observed(*clones), record, now)
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-0")]
    left = pool(*(rec(i, CloneState.FREE, T0 + i) for i in (1, 2)))
    assert of(DeleteClone, plan(SPEC, observed(clones[1], clones[2]), left, now)) == []


def test_shrink_waits_until_clones_were_idle_for_shrink_after() -> None:
    record = pool(*(rec(i, CloneState.FREE, T0) for i in range(4)))
    actions = plan(SPEC, observed(*(clone(i) for i in range(4))), record, T0 + 60)
    assert actions == []


def test_standby_suspend_suspends_instead_of_delete_and_resumes_before_creating() -> None:
    spec = replace(SPEC, standby=Standby.SUSPEND)
    record = pool(*(rec(i, CloneState.FREE, T0) for i in range(3)))
    now = T0 + SPEC.shrink_after
    actions = plan(spec, observed(*(clone(i) for i in range(3))), record, now)
    assert of(SuspendClone, actions) == [SuspendClone(pool="lab", clone="lab-2")]
    assert of(DeleteClone, actions) == []
    sleeping = clone(2, power=Power.SUSPENDED, ready=False, backend=BackendState.DRAIN)
    record = pool(rec(0, CloneState.IN_USE), rec(1, CloneState.FREE), rec(2, CloneState.SUSPENDED))
    actions = plan(spec, observed(clone(0, session=USER), clone(1), sleeping), record, now)
    assert of(ResumeClone, actions) == [ResumeClone(pool="lab", clone="lab-2")]
    assert of(CreateClone, actions) == []


def test_assigned_slot_is_reserved_created_and_kept_out_of_the_balancer() -> None:
    spec = replace(SPEC, assignments={"teacher": 0}, initial=1, free=1)
    actions = plan(spec, observed(), pool(), T0)
    assert [a.clone for a in of(CreateClone, actions)] == ["lab-0", "lab-1"]
    record = pool(rec(0, CloneState.FREE, T0), rec(1, CloneState.FREE, T0), rec(2, CloneState.FREE))
    obs = observed(clone(0, backend=None), clone(1), clone(2))
    later = plan(spec, obs, record, T0 + 10 * SPEC.shrink_after)
    assert [a.clone for a in of(DeleteClone, later)] == ["lab-2"]
    assert all(a.clone != "lab-0" for a in of(BalancerEnable, later))


def test_failed_boot_is_retried_with_backoff_then_replaced() -> None:
    record = pool(rec(0, CloneState.BOOTING), rec(1, CloneState.FREE))
    stuck = clone(0, ready=False, backend=None)
    actions = plan(SPEC, observed(stuck, clone(1)), record, T0 + SPEC.boot_timeout)
    failed = records_of(actions)["lab-0"]
    assert failed.state is CloneState.FAILED and failed.failures == 1
    waiting = plan(
        SPEC, observed(stuck, clone(1)), pool(failed, rec(1, CloneState.FREE)), failed.retry_at - 1
    )  # type: ignore[operator]
    assert [a for a in waiting if a.clone == "lab-0"] == []
    retry = plan(
        SPEC, observed(stuck, clone(1)), pool(failed, rec(1, CloneState.FREE)), failed.retry_at
    )  # type: ignore[arg-type]
    assert of(ResetClone, retry) == [ResetClone(pool="lab", clone="lab-0")]
    worn = replace(failed, failures=3)
    gone = plan(
        SPEC, observed(stuck, clone(1)), pool(worn, rec(1, CloneState.FREE)), failed.retry_at
    )  # type: ignore[arg-type]
    assert of(DeleteClone, gone) == [DeleteClone(pool="lab", clone="lab-0")]


def test_circuit_breaker_stops_creating_after_max_failures_until_cooldown() -> None:
    record = pool(failures=SPEC.max_failures, breaker_open_until=T0 + 600)
    assert of(CreateClone, plan(SPEC, observed(), record, T0 + 10)) == []
    reopened = plan(SPEC, observed(), record, T0 + 600)
    assert len(of(CreateClone, reopened)) == 2
    pool_memory = of(RecordPool, reopened)[0]
    assert pool_memory.breaker_open_until is None  # type: ignore[attr-defined]


def test_breaker_opens_when_failures_reach_max() -> None:
    record = pool(rec(0, CloneState.CREATING), failures=SPEC.max_failures - 1)
    actions = plan(SPEC, observed(in_flight=["lab-0"]), record, T0 + SPEC.boot_timeout)
    memory = of(RecordPool, actions)[0]
    assert memory.breaker_open_until == T0 + SPEC.boot_timeout + SPEC.breaker_cooldown  # type: ignore[attr-defined]
    assert of(CreateClone, actions) == []


def test_rollout_deletes_free_old_clones_and_retires_busy_ones() -> None:
    obs = observed(clone(0, session=USER), clone(1), target=2)
    record = pool(rec(0, CloneState.IN_USE), rec(1, CloneState.FREE))
    actions = plan(SPEC, obs, record, T0)
    new = records_of(actions)
    assert new["lab-0"].state is CloneState.RETIRING
    assert new["lab-1"].state is CloneState.DELETING
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-1")]
    assert {c.version for c in of(CreateClone, actions)} == {2}  # type: ignore[attr-defined]
    assert all(a.clone not in ("lab-0", "lab-1") for a in of(BalancerEnable, actions))
    memory = of(RecordPool, actions)[0]
    assert memory.target_version == 2 and memory.rollout_started_at == T0  # type: ignore[attr-defined]


def test_retiring_clone_is_deleted_when_its_session_ends_never_reset() -> None:
    obs = observed(clone(0, backend=BackendState.DRAIN), target=2)
    record = pool(rec(0, CloneState.RETIRING), target=2, rollout_started_at=T0)
    actions = plan(SPEC, obs, record, T0 + 100)
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-0")]
    assert of(ResetClone, actions) == []


def test_retiring_clone_keeps_its_user_until_drain_deadline() -> None:
    spec = replace(SPEC, drain_deadline=3600.0)
    obs = observed(clone(0, session=USER, backend=BackendState.DRAIN, connections=1), target=2)
    record = pool(rec(0, CloneState.RETIRING), target=2, rollout_started_at=T0)
    assert of(DeleteClone, plan(spec, obs, record, T0 + 3599)) == []
    forced = plan(spec, obs, record, T0 + 3600)
    assert of(DeleteClone, forced) == [DeleteClone(pool="lab", clone="lab-0")]
    assert of(BalancerRemove, forced) == []  # it still has a connection


def test_rollout_waits_for_a_ready_base() -> None:
    obs = observed(clone(0), clone(1), target=2, base_ready=False)
    actions = plan(SPEC, obs, pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE)), T0)
    assert of(CreateClone, actions) == []


def test_orphan_backends_are_removed_when_idle_and_drained_when_busy() -> None:
    idle = Backend("lab-7", Endpoint("127.0.0.1", 5907), BackendState.READY, 0)
    busy = Backend("lab-8", Endpoint("127.0.0.1", 5908), BackendState.READY, 2)
    obs, record = converged()
    actions = plan(SPEC, replace(obs, orphan_backends=(idle, busy)), record, T0)
    assert actions == [
        BalancerRemove(pool="lab", clone="lab-7"),
        BalancerDrain(pool="lab", clone="lab-8"),
    ]


def test_vanished_clone_is_forgotten() -> None:
    record = pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE), rec(2, CloneState.IN_USE))
    obs, _ = converged()
    assert ForgetClone(pool="lab", clone="lab-2") in plan(SPEC, obs, record, T0)


def test_crashed_clone_is_marked_failed() -> None:
    obs = observed(clone(0, power=Power.CRASHED, ready=False), clone(1))
    actions = plan(SPEC, obs, pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE)), T0)
    assert records_of(actions)["lab-0"].state is CloneState.FAILED
    assert of(BalancerDrain, actions) == [BalancerDrain(pool="lab", clone="lab-0")]


def test_classify_reports_states_for_status() -> None:
    assert classify(SPEC, clone(0, session=USER), None, T0) is CloneState.IN_USE
    assert classify(SPEC, clone(0), rec(0, CloneState.FREE), T0) is CloneState.FREE
    # no record: nobody can tell who was on it, so the keeper resets it before it serves
    assert classify(SPEC, clone(0), None, T0) is CloneState.BOOTING
    assert classify(SPEC, clone(0), None, T0, target_version=2) is CloneState.DELETING
    assert classify(SPEC, None, rec(0, CloneState.CREATING), T0) is CloneState.CREATING


def test_next_timer_names_the_next_recycle() -> None:
    record = pool(rec(0, CloneState.RECYCLING, session_ended_at=T0), rec(1, CloneState.FREE))
    assert next_timer(SPEC, record, T0 + 1) == T0 + SPEC.recycle_after


# ---- dirty until reset (issue 14): the next user never sees the previous user's session ----


def test_a_session_marks_the_desktop_dirty_in_the_pass_that_first_sees_it() -> None:
    obs = observed(clone(0, session=USER), clone(1))
    actions = plan(SPEC, obs, pool(rec(0, CloneState.FREE), rec(1, CloneState.FREE)), T0)
    assert records_of(actions)["lab-0"].dirty
    assert not records_of(actions).get("lab-1", rec(1, CloneState.FREE)).dirty


def test_a_dirty_desktop_that_looks_free_is_reset_and_never_enters_the_balancer() -> None:
    # what a keeper killed between "out of the balancer" and "reset" leaves behind
    record = pool(rec(0, CloneState.BOOTING, dirty=True, last_user="ann"), rec(1, CloneState.FREE))
    actions = plan(SPEC, observed(clone(0, backend=None), clone(1)), record, T0 + 90)
    assert of(ResetClone, actions) == [ResetClone(pool="lab", clone="lab-0")]
    assert of(BalancerEnable, actions) == []
    assert records_of(actions).get("lab-0", record.clones["lab-0"]).dirty


def test_a_dirty_desktop_whose_reset_is_still_running_is_left_to_it() -> None:
    record = pool(rec(0, CloneState.BOOTING, dirty=True), rec(1, CloneState.FREE))
    obs = replace(observed(clone(0, backend=None), clone(1)), in_flight=frozenset({"lab-0"}))
    assert plan(SPEC, obs, record, T0 + 90) == []


def test_a_desktop_of_unknown_history_is_reset_unless_somebody_is_on_it() -> None:
    actions = plan(SPEC, observed(clone(0), clone(1, session=USER)), pool(), T0)
    assert of(ResetClone, actions) == [ResetClone(pool="lab", clone="lab-0")]
    assert of(BalancerRemove, actions) == [BalancerRemove(pool="lab", clone="lab-0")]
    assert records_of(actions)["lab-1"].state is CloneState.IN_USE
    assert records_of(actions)["lab-1"].dirty


def test_a_persistent_desktop_goes_back_to_its_user_without_a_reset() -> None:
    spec = replace(SPEC, on_logoff=OnLogoff.KEEP)
    record = pool(rec(0, CloneState.BOOTING, dirty=True), rec(1, CloneState.FREE))
    actions = plan(spec, observed(clone(0, backend=None), clone(1)), record, T0 + 90)
    assert of(ResetClone, actions) == []
    assert records_of(actions)["lab-0"].state is CloneState.FREE


# ---- crash recovery from what the host shows (issue 14) ----------------------------------


def test_a_create_that_never_ran_is_made_again_at_once_not_after_boot_timeout() -> None:
    record = pool(rec(0, CloneState.CREATING), rec(1, CloneState.FREE))
    actions = plan(SPEC, observed(clone(1)), record, T0 + 5)
    assert [a.clone for a in of(CreateClone, actions)] == ["lab-0"]
    assert records_of(actions)["lab-0"].state is CloneState.CREATING


def test_a_start_that_never_ran_is_issued_again_at_once() -> None:
    record = pool(rec(0, CloneState.BOOTING), rec(1, CloneState.FREE))
    stopped = clone(0, power=Power.SHUTOFF, ready=False, backend=None)
    actions = plan(SPEC, observed(stopped, clone(1)), record, T0 + 5)
    assert of(StartClone, actions) == [StartClone(pool="lab", clone="lab-0")]


def test_a_reset_that_never_ran_is_issued_again_not_a_bare_start() -> None:
    record = pool(rec(0, CloneState.BOOTING, dirty=True), rec(1, CloneState.FREE))
    stopped = clone(0, power=Power.SHUTOFF, ready=False, backend=None)
    actions = plan(SPEC, observed(stopped, clone(1)), record, T0 + 5)
    assert of(ResetClone, actions) == [ResetClone(pool="lab", clone="lab-0")]
    assert of(StartClone, actions) == []


def test_a_guest_that_keeps_powering_itself_off_is_failed_after_a_few_starts() -> None:
    stopped = clone(0, power=Power.SHUTOFF, ready=False, backend=None)
    record = pool(rec(0, CloneState.BOOTING), rec(1, CloneState.FREE))
    starts = 0
    for step in range(6):
        actions = plan(SPEC, observed(stopped, clone(1)), record, T0 + step)
        starts += len(of(StartClone, actions))
        record = replace(record, clones={**record.clones, **records_of(actions)})
        if record.clones["lab-0"].state is CloneState.FAILED:
            break
    assert record.clones["lab-0"].state is CloneState.FAILED
    assert 1 <= starts < 3


def test_a_delete_that_never_ran_is_issued_again_at_once() -> None:
    record = pool(rec(0, CloneState.DELETING), rec(1, CloneState.FREE), rec(2, CloneState.FREE))
    actions = plan(SPEC, observed(clone(0, backend=None), clone(1), clone(2)), record, T0 + 5)
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-0")]


# ---- failure policy: one place, the planner's (issue 7) -----------------------------------


def test_the_failure_that_spends_the_retry_budget_replaces_the_clone_without_another_backoff() -> (
    None
):
    worn = rec(0, CloneState.BOOTING, failures=CLONE_RETRIES - 1)
    stuck = clone(0, ready=False, backend=None)
    failed = records_of(
        plan(SPEC, observed(stuck, clone(1)), pool(worn, rec(1, CloneState.FREE)), T0 + 300)
    )["lab-0"]
    assert failed.state is CloneState.FAILED and failed.retry_at is None
    actions = plan(SPEC, observed(stuck, clone(1)), pool(failed, rec(1, CloneState.FREE)), T0 + 301)
    assert of(DeleteClone, actions) == [DeleteClone(pool="lab", clone="lab-0")]


def test_failed_actions_are_recorded_by_the_same_rules_plan_uses() -> None:
    record = pool(rec(0, CloneState.CREATING), rec(1, CloneState.BOOTING), failures=3)
    failed: list[Action] = [
        CreateClone(pool="lab", clone="lab-0", slot=0, version=1, display=Endpoint("h", 1)),
        StartClone(pool="lab", clone="lab-1"),
        BalancerEnable(pool="lab", clone="lab-1", address=Endpoint("h", 2)),
    ]
    actions = failures_after(SPEC, record, failed, T0)
    marked = records_of(actions)
    assert {n: r.state for n, r in marked.items()} == {
        "lab-0": CloneState.FAILED,
        "lab-1": CloneState.FAILED,
    }
    assert marked["lab-0"].retry_at == T0 + SPEC.retry_backoff
    (memory,) = of(RecordPool, actions)
    assert memory.failures == 5  # type: ignore[attr-defined]
    assert memory.breaker_open_until == T0 + SPEC.breaker_cooldown  # type: ignore[attr-defined]


def test_a_failed_balancer_action_is_not_the_clones_fault() -> None:
    record = pool(rec(0, CloneState.FREE))
    drain = BalancerDrain(pool="lab", clone="lab-0")
    assert failures_after(SPEC, record, [drain], T0) == []


def test_a_free_desktop_a_client_connected_to_since_the_last_pass_is_reset_before_it_serves() -> (
    None
):
    obs, record = converged()
    actions = plan(SPEC, replace(obs, touched=frozenset({"lab-1"})), record, T0 + 60)
    assert of(ResetClone, actions) == [ResetClone(pool="lab", clone="lab-1")]
    assert of(BalancerRemove, actions) == [BalancerRemove(pool="lab", clone="lab-1")]
    assert records_of(actions)["lab-1"].dirty
