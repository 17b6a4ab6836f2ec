"""A rollout's state after a pass (pool/rollout/progress.py), from its pools alone."""

from __future__ import annotations

from imagepipe.pool.model import (
    CloneInfo,
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.rollout.progress import PoolView, judge
from imagepipe.pool.rollout.records import Rollout, RolloutState
from imagepipe.record import replace

T = 1_700_000_000.0
SPEC = PoolSpec(name="lab", image="tiny", channel="stable", free=1, max=3)
ROLLOUT = Rollout(
    id=7,
    image="tiny",
    channel="stable",
    pools=("lab",),
    from_version=1,
    to_version=2,
    state=RolloutState.IN_PROGRESS,
    created_at=T,
)


def view(target: int | None, *clones: tuple[str, int, CloneState], **pool: object) -> PoolView:
    records = {n: CloneRecord(n, i, v, s, T) for i, (n, v, s) in enumerate(clones)}
    observed = tuple(
        ObservedClone(CloneInfo(n, "lab", i, "tiny", v, Power.RUNNING, ready=True))
        for i, (n, v, _) in enumerate(clones)
    )
    return PoolView(
        SPEC,
        Observed(observed, target_version=target, base_ready=True),
        PoolRecord("lab", records, **pool),  # type: ignore[arg-type]
    )


def test_a_pending_rollout_waits_for_its_channel_to_move() -> None:
    r = replace(ROLLOUT, state=RolloutState.PENDING)
    verdict = judge(r, [view(1, ("lab-0", 1, CloneState.FREE))], T + 1)
    assert verdict.rollout.state is RolloutState.PENDING
    assert verdict.rollout.reason == "waiting for channel stable of tiny to point at v2"


def test_a_channel_moved_elsewhere_fails_the_rollout() -> None:
    verdict = judge(ROLLOUT, [view(3, ("lab-0", 1, CloneState.FREE))], T + 1)
    assert verdict.rollout.state is RolloutState.FAILED
    assert "was moved to v3 outside this rollout" in (verdict.rollout.reason or "")
    assert not verdict.move_back


def test_no_old_desktop_left_is_done_and_counts_what_was_removed() -> None:
    first = judge(
        ROLLOUT, [view(2, ("lab-0", 1, CloneState.FREE), ("lab-1", 2, CloneState.BOOTING))], T
    )
    assert first.rollout.state is RolloutState.IN_PROGRESS
    done = judge(first.rollout, [view(2, ("lab-1", 2, CloneState.FREE))], T + 5)
    assert done.rollout.state is RolloutState.DONE
    assert done.rollout.finished_at == T + 5
    assert done.rollout.progress[0].old_removed == 1


def test_a_breaker_opened_during_the_rollout_starts_rolling_it_back() -> None:
    broken = view(2, ("lab-0", 1, CloneState.FREE), failures=5, breaker_open_until=T + 600 + 10)
    verdict = judge(ROLLOUT, [broken], T + 20)
    assert verdict.move_back
    assert verdict.rollout.state is RolloutState.ROLLING_BACK  # rolled back once it moved
    assert verdict.rollout.active and verdict.rollout.finished_at is None
    assert verdict.rollout.reason == (
        "v2's desktops failed in pool lab (5 failures in a row, its breaker opened): back to v1"
    )


def test_rolling_back_asks_for_the_move_again_even_when_the_channel_already_moved() -> None:
    back = replace(ROLLOUT, state=RolloutState.ROLLING_BACK, reason="v2 failed")
    for target in (1, 2):
        verdict = judge(back, [view(target, ("lab-0", 1, CloneState.FREE))], T + 30)
        assert verdict.move_back
        assert verdict.rollout.state is RolloutState.ROLLING_BACK
        assert verdict.rollout.reason == "v2 failed"


def test_warnings_fall_due_once_each_before_the_deadline() -> None:
    r = replace(ROLLOUT, deadline_at=T + 700, warn_before=(600.0, 60.0))
    pools = [view(2, ("lab-0", 1, CloneState.RETIRING))]
    assert judge(r, pools, T + 50).warnings == ()
    first = judge(r, pools, T + 100)
    assert first.warnings == (600.0,)
    assert judge(first.rollout, pools, T + 200).warnings == ()
    assert judge(first.rollout, pools, T + 650).warnings == (60.0,)
