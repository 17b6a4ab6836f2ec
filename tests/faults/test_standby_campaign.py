"""The standby campaign (tests/faults/standby.py): two keepers on one shared store, with the
leader paused past its lease, killed inside its host calls, and the store cut off, over the
fakes with a fake clock. One run per session; each test checks one promise.

The long profile, by hand: IMAGEPIPE_FAULT_ROUNDS=1000 pytest tests/faults/test_standby_campaign.py
(or python -m tests.faults.standby --rounds 1000, which prints the figures).
"""

from __future__ import annotations

from functools import cache

from tests.faults.campaign import Stats, rounds_from_env
from tests.faults.standby import StandbyProfile, run_standby_campaign

ROUNDS = rounds_from_env(200)


@cache
def campaign() -> Stats:
    return run_standby_campaign(StandbyProfile(), range(ROUNDS))


def violations(*invariants: str) -> list[str]:
    return [str(v) for v in campaign().violations if v.invariant in invariants]


def test_the_campaign_paused_killed_and_cut_off_the_leader_many_times() -> None:
    injected = campaign().injected

    assert injected["pause"] >= ROUNDS // 2
    assert injected["fenced"] > 0, "no woken leader ever wrote under a stale epoch"
    assert sum(n for kind, n in injected.items() if kind.startswith("kill@")) >= ROUNDS // 10
    assert injected["outage"] >= ROUNDS // 2


def test_only_the_keeper_holding_the_current_lease_ever_changes_the_host() -> None:
    assert campaign().checks["one_leader_acting"] > 0
    assert violations("one_leader_acting") == []


def test_no_desktop_is_made_twice_across_a_failover() -> None:
    assert campaign().checks["no_double_action"] > 0
    assert violations("no_double_action", "unique_slots") == []


def test_nothing_changes_on_the_host_while_the_store_does_not_answer() -> None:
    assert campaign().checks["nothing_changed_while_store_down"] > 0
    assert violations("nothing_changed_while_store_down") == []


def test_a_woken_leader_whose_writes_are_refused_steps_down() -> None:
    assert campaign().checks["fenced_steps_down"] > 0
    assert violations("fenced_steps_down") == []


def test_failovers_keep_sessions_reset_used_desktops_and_orphan_nothing() -> None:
    assert (
        violations(
            "live_session_untouched",
            "used_desktop_reset_first",
            "max_respected",
            "nothing_orphaned",
            "store_integrity",
        )
        == []
    )
    assert campaign().checks["nothing_orphaned"] == ROUNDS  # every day settled and was checked
