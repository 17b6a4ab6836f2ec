"""The issue 14 bugs, each as one scripted day: a named moment of a kill -9 (or a failed
read), and what the next keeper does. Each failed on the code it was found on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import BusyError
from imagepipe.pool.model import CloneState, Power
from imagepipe.record import replace
from tests.faults.campaign import Day, Profile
from tests.faults.injector import CrashAt, CrashPoint, FaultKind


@pytest.fixture
def day(tmp_path: Path) -> Iterator[Day]:
    d = Day(seed=0, profile=Profile(), workdir=tmp_path)
    d.start()
    yield d
    d.close()


def records(day: Day, state: CloneState) -> list[str]:
    """Clones the new keeper's store holds in this state (after its recovery)."""
    pool = day.runtime.store.load_pool(day.spec.name)
    return sorted(r.name for r in pool.clones.values() if r.state is state)


def found(day: Day, invariant: str) -> list[str]:
    return [str(v) for v in day.stats.violations if v.invariant == invariant]


def test_a_keeper_killed_right_after_the_balancer_removal_still_resets_the_desktop(
    day: Day,
) -> None:
    desktop = day.arrive("alice")
    assert desktop is not None
    day.run_pass()
    day.logout("alice")
    day.run_pass()
    day.clock.advance(day.spec.recycle_after + 1)
    day.kill_at(CrashAt("remove", occurrence=1, point=CrashPoint.AFTER))

    for _ in range(4):
        day.run_pass()  # the kill, the new keeper, and its next passes

    assert ("crash-after", desktop) in [(i.kind, i.name) for i in day.injector.injected]
    assert found(day, "used_desktop_reset_first") == []
    offered = desktop in day.lb_state.servers
    assert not (offered and day.hv.clones[desktop].dirty), (
        "alice's disk is offered to the next user"
    )


def test_a_keeper_killed_before_its_create_reached_the_hypervisor_refills_the_pool_at_once(
    day: Day,
) -> None:
    day.kill_at(CrashAt("create_clone", occurrence=1, point=CrashPoint.BEFORE))
    for user in ("alice", "bob"):  # the pool needs new desktops
        day.arrive(user)
        day.run_pass()

    assert day.stats.recovery_passes, "the keeper was never killed"
    never_made = [n for n in records(day, CloneState.CREATING) if n not in day.hv.clones]
    assert never_made == [], "a create nobody is doing blocks its slot"
    assert found(day, "converges_after_crash") == []


def test_a_keeper_killed_before_its_start_reached_the_hypervisor_boots_the_clone_at_once(
    day: Day,
) -> None:
    day.kill_at(CrashAt("start", occurrence=1, point=CrashPoint.BEFORE))
    for user in ("alice", "bob"):
        day.arrive(user)
        day.run_pass()

    assert day.stats.recovery_passes, "the keeper was never killed"
    shut_off = [
        name
        for name in records(day, CloneState.BOOTING)
        if day.hv.clones[name].power is Power.SHUTOFF
    ]
    assert shut_off == [], "a clone the keeper calls booting was never started"


def test_a_keeper_killed_right_after_a_delete_leaves_nothing_behind(day: Day) -> None:
    day.kill_at(CrashAt("delete", occurrence=1, point=CrashPoint.AFTER))
    desktop = day.arrive("alice")
    assert desktop is not None
    day.run_pass()
    day.logout("alice")
    day.clock.advance(day.spec.recycle_after + 1)
    for _ in range(3):
        day.run_pass()  # alice's desktop is reset: one free desktop too many
    day.clock.advance(day.spec.shrink_after + 1)
    for _ in range(6):
        day.run_pass()  # the idle surplus is deleted, and the keeper killed right after

    assert day.stats.recovery_passes, "the keeper was never killed"
    assert day.stats.violations == []


def test_a_session_the_keeper_could_not_read_still_gets_its_desktop_reset(day: Day) -> None:
    """The user's whole session falls between two passes the keeper could not plan (its
    session query failed): the client's connection event alone must get the desktop reset."""
    desktop = day.arrive("alice")
    assert desktop is not None
    day.hv.fail_next("sessions", BusyError("injected: sessions: locked by another client"))
    day.run_pass()  # the pool cannot be observed: not planned
    day.logout("alice")
    for _ in range(4):
        day.run_pass()
    day.clock.advance(day.spec.recycle_after + 1)
    for _ in range(4):
        day.run_pass()

    assert found(day, "used_desktop_reset_first") == []
    assert desktop in day.lb_state.servers and not day.hv.clones[desktop].dirty


def test_a_delete_that_answered_too_late_leaves_no_record_once_its_retry_falls_due(
    day: Day,
) -> None:
    """The hypervisor deleted the surplus desktop but answered after the action timeout: the
    failed record waits for its retry (README "Failures"), then, the desktop being gone and
    not needed, it is forgotten."""
    desktop = day.arrive("alice")
    assert desktop is not None
    day.run_pass()
    day.logout("alice")
    day.clock.advance(day.spec.recycle_after + 1)
    for _ in range(3):
        day.run_pass()  # alice's desktop is reset: one free desktop too many
    day.clock.advance(day.spec.shrink_after + 1)
    day.injector.kinds, day.injector.rate = {FaultKind.TIMEOUT}, 1.0
    day.injector.operations = ("delete",)
    for _ in range(3):
        day.run_pass()  # the idle surplus is deleted; the answer comes too late
    day.injector.quiet = True
    for _ in range(3):
        day.run_pass()

    assert [i.kind for i in day.injector.injected] == ["timeout"]
    gone = day.injector.injected[0].name
    assert gone not in day.hv.clones
    assert gone not in day.runtime.store.load_pool(day.spec.name).clones


def test_a_session_that_began_and_ended_while_the_keeper_was_stopped_gets_its_desktop_reset(
    day: Day,
) -> None:
    """The keeper is stopped (an upgrade); alice logs in through the balancer, writes her
    files, logs out. No keeper saw it: the balancer's session counter is the evidence."""
    day.stop_keeper()
    desktop = day.visit("alice")
    assert desktop is not None
    assert day.hv.clones[desktop].dirty
    day.start_keeper()
    day.run_pass()

    assert found(day, "used_desktop_reset_first") == []
    assert day.hv.count("reset") == 1
    for _ in range(3):
        day.run_pass()
    assert desktop in day.lb_state.servers and not day.hv.clones[desktop].dirty


def test_a_session_between_a_kill_and_the_restart_gets_its_desktop_reset(day: Day) -> None:
    """Killed right after it put a desktop in the balancer: the record it wrote before the
    add counts that desktop's sessions from 0, so a user in the gap is seen."""
    day.profile = replace(day.profile, down_visits=1.0)  # somebody comes while it is dead
    day.arrive("alice")
    day.kill_at(CrashAt("enable", occurrence=1, point=CrashPoint.AFTER))
    for _ in range(4):
        day.run_pass()

    assert day.stats.injected["visit-while-down"] >= 1
    assert day.stats.recovery_passes, "the keeper was never killed"
    assert found(day, "used_desktop_reset_first") == []
