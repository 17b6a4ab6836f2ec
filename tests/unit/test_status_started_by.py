"""`imagepipe status` tells which desktops were restored from a warm parent and which booted."""

from __future__ import annotations

from imagepipe.app.status import clone_status
from imagepipe.pool.model import CloneInfo, ObservedClone, PoolSpec, Power, StartMode

SPEC = PoolSpec(name="lab", image="tiny")


def status_of(power: Power, started_by: StartMode | None) -> str | None:
    info = CloneInfo(
        name="lab-0",
        pool="lab",
        slot=0,
        image="tiny",
        version=1,
        power=power,
        ready=power is Power.RUNNING,
        started_by=started_by,
    )
    return clone_status(SPEC, ObservedClone(info), None, now=0.0).started_by


def test_a_restored_desktop_shows_it_was_restored_and_a_booted_one_that_it_booted() -> None:
    assert status_of(Power.RUNNING, StartMode.RESTORE) == "restore"
    assert status_of(Power.RUNNING, StartMode.BOOT) == "boot"


def test_a_desktop_that_is_not_running_shows_no_way_of_starting() -> None:
    assert status_of(Power.SHUTOFF, None) is None
