"""The fast fault campaign (issue 14): simulated days over the fakes, with a fake clock, with
the keeper killed inside every kind of action and with every kind of fault, through the
composition root. Each profile runs once per test session; tests check one promise each.

The long profile, by hand: IMAGEPIPE_FAULT_ROUNDS=500 pytest tests/faults (or
python -m tests.faults.campaign, which prints the figures).
"""

from __future__ import annotations

from functools import cache

import pytest

from tests.faults.campaign import (
    CRASH_TARGETS,
    INVARIANTS,
    PROFILES,
    Stats,
    rounds_from_env,
    run_campaign,
)
from tests.faults.injector import FaultKind

ROUNDS = rounds_from_env(8)


@cache
def campaign(profile: str) -> Stats:
    return run_campaign(PROFILES[profile], range(ROUNDS))


def violations(stats: Stats, *invariants: str) -> list[str]:
    return [str(v) for v in stats.violations if v.invariant in invariants]


def checked(stats: Stats, *invariants: str) -> int:
    return sum(stats.checks[i] for i in invariants)


SAFETY = ("live_session_untouched", "max_respected", "unique_slots", "store_integrity")

# ---- kill -9 of the keeper inside every kind of action -----------------------------------


@pytest.mark.parametrize("operation", CRASH_TARGETS)
def test_a_keeper_killed_inside_any_action_never_cuts_a_session_exceeds_max_or_doubles_a_slot(
    operation: str,
) -> None:
    stats = campaign(f"crash-{operation}")

    assert stats.injected, f"no crash inside {operation} happened: the campaign proves nothing"
    assert checked(stats, *SAFETY) > 0
    assert violations(stats, *SAFETY) == []


@pytest.mark.parametrize("operation", CRASH_TARGETS)
def test_a_keeper_killed_inside_any_action_never_hands_a_used_desktop_to_the_next_user(
    operation: str,
) -> None:
    stats = campaign(f"crash-{operation}")

    assert checked(stats, "used_desktop_reset_first") > 0
    assert violations(stats, "used_desktop_reset_first") == []


@pytest.mark.parametrize("operation", CRASH_TARGETS)
def test_after_a_keeper_killed_inside_any_action_the_pool_is_whole_again_within_a_few_passes(
    operation: str,
) -> None:
    stats = campaign(f"crash-{operation}")

    assert checked(stats, "converges_after_crash", "nothing_orphaned") > 0
    assert violations(stats, "converges_after_crash", "nothing_orphaned") == []


# ---- a hypervisor or balancer that refuses, hangs or half-fails --------------------------


@pytest.mark.parametrize("kind", [k.value for k in FaultKind])
def test_under_any_kind_of_fault_no_session_is_cut_and_the_pool_settles_whole(kind: str) -> None:
    stats = campaign(f"fault-{kind}")

    assert stats.injected[kind] > 0, f"no {kind} fault was injected"
    invariants = (*SAFETY, "converges_after_crash", "nothing_orphaned")
    assert violations(stats, *invariants) == []


@pytest.mark.parametrize("kind", [k.value for k in FaultKind])
def test_under_any_kind_of_fault_a_used_desktop_is_reset_before_the_next_user(kind: str) -> None:
    stats = campaign(f"fault-{kind}")

    assert checked(stats, "used_desktop_reset_first") > 0
    assert violations(stats, "used_desktop_reset_first") == []


def test_an_unreadable_registry_never_cuts_a_session_and_the_pool_settles_whole() -> None:
    stats = campaign("fault-registry")

    assert stats.injected["fatal"] > 0
    invariants = (*SAFETY, "used_desktop_reset_first", "nothing_orphaned")
    assert violations(stats, *invariants) == []


# ---- a rollout to a new image version, with kills inside any of its steps ----------------


def test_a_rollout_with_kills_inside_its_steps_never_cuts_a_session_or_exceeds_max() -> None:
    stats = campaign("rollout")

    assert stats.injected, "no kill happened during the rollout days"
    assert violations(stats, *SAFETY) == []


def test_a_rollout_with_kills_inside_its_steps_never_hands_out_a_used_desktop() -> None:
    assert violations(campaign("rollout"), "used_desktop_reset_first") == []


def test_a_rollout_with_kills_inside_its_steps_is_whole_again_within_a_few_passes() -> None:
    assert violations(campaign("rollout"), "converges_after_crash", "nothing_orphaned") == []


# ---- every kind of fault and kills inside every kind of action, on the same days ---------


def test_faults_of_every_kind_and_kills_together_break_no_promise() -> None:
    stats = campaign("mixed")

    assert {k.value for k in FaultKind} <= set(stats.injected), "a fault kind never happened"
    assert any(k.startswith("crash") for k in stats.injected), "no kill happened"
    assert checked(stats, *INVARIANTS) > 0
    assert stats.violations == []


# ---- users who come and go while no keeper runs ------------------------------------------


def test_sessions_while_the_keeper_is_stopped_never_reach_the_next_user() -> None:
    """The keeper is stopped (an upgrade, a restart) and started again four times a day;
    meanwhile users log in through the balancer, work and log out. Only the balancer's
    session counter saw them: their desktops are reset before anyone else gets them."""
    stats = campaign("restart")

    assert stats.injected["restart"] > 0 and stats.injected["visit-while-down"] > 0
    assert checked(stats, "used_desktop_reset_first") > 0
    assert stats.violations == []


@pytest.mark.parametrize("operation", CRASH_TARGETS)
def test_sessions_between_a_kill_and_the_restart_are_reset_before_the_next_user(
    operation: str,
) -> None:
    stats = campaign(f"crash-{operation}")

    assert stats.injected["visit-while-down"] > 0, "nobody came while the keeper was dead"
    assert violations(stats, "used_desktop_reset_first") == []
