"""FakeHypervisor keeps the same contract as the real adapters, plus its own honesty checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from imagepipe.errors import BusyError, CloneNotFoundError, InvalidStateError
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import EventKind, Hypervisor, HypervisorEvent
from tests.contract.hypervisor_suite import HypervisorContract
from tests.fakes.hypervisor import FakeHypervisor, FakeImages

BASE = FakeImages().publish("tiny", 1)


def _conforms(fake: FakeHypervisor) -> Hypervisor:
    return fake  # mypy checks that FakeHypervisor has the port's shape


class TestFakeHypervisor(HypervisorContract):
    @pytest.fixture
    def hypervisor(self) -> Iterator[Hypervisor]:
        fake = FakeHypervisor()
        fake.add_base(BASE)
        yield _conforms(fake)
        fake.close()

    @pytest.fixture
    def base_image(self) -> BaseImage:
        return BASE


@pytest.fixture
def fake() -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.add_base(BASE)
    return hv


@pytest.fixture
def spec(fake: FakeHypervisor) -> CloneSpec:
    return CloneSpec(
        name="lab-0",
        pool="lab",
        slot=0,
        base=BASE,
        mode=CloneMode.LINKED,
        cpus=1,
        memory=256 * 1024**2,
        display=Endpoint("127.0.0.1", 5900),
    )


def test_a_clone_is_not_made_from_a_running_or_unknown_base(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    fake.add_base(BASE, powered_off=False)
    with pytest.raises(InvalidStateError, match="powered-off base"):
        fake.create_clone(spec)
    fake.bases.clear()
    with pytest.raises(CloneNotFoundError):
        fake.create_clone(spec)
    assert not fake.base_ready(BASE)


def test_a_name_taken_by_another_pool_is_refused(fake: FakeHypervisor, spec: CloneSpec) -> None:
    fake.create_clone(spec)
    with pytest.raises(InvalidStateError, match="other metadata"):
        fake.create_clone(replace(spec, pool="other"))


def test_sessions_and_events_follow_what_the_user_does(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    events: list[HypervisorEvent] = []
    fake.subscribe(events.append)
    fake.create_clone(spec)
    fake.start(spec.name)
    fake.connect(spec.name, "10.1.1.1")
    fake.login(spec.name, "bob")
    busy = fake.sessions(spec.name)
    fake.power_off_inside(spec.name)

    assert busy.client == "10.1.1.1" and busy.users == ("bob",)
    assert not fake.sessions(spec.name).active
    assert [e.kind for e in events] == [
        EventKind.STATE_CHANGED,
        EventKind.SESSION_CONNECTED,
        EventKind.AGENT_CHANGED,
        EventKind.STATE_CHANGED,
    ]


def test_reset_discards_the_users_changes_and_boots_again(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    fake.boot_ticks = 1
    fake.create_clone(spec)
    fake.start(spec.name)
    fake.tick()
    fake.connect(spec.name, "10.1.1.1")
    fake.reset(spec.name)

    (info,) = fake.list_clones()
    assert not fake.is_dirty(spec.name)
    assert info.power is Power.RUNNING and not info.ready
    fake.tick()
    assert fake.list_clones()[0].ready


def test_scripted_failures_are_raised_once_each(fake: FakeHypervisor, spec: CloneSpec) -> None:
    fake.fail_next("create_clone", BusyError("locked"), times=2)
    attempts: list[Callable[[], object]] = [lambda: fake.create_clone(spec)] * 3
    errors = 0
    for attempt in attempts:
        try:
            attempt()
        except BusyError:
            errors += 1
    assert errors == 2 and list(fake.clones) == ["lab-0"]
