"""FakeHypervisor keeps the same contract as the real adapters, plus its own honesty checks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from imagepipe.errors import (
    BaseMissingError,
    BusyError,
    DisplayInUseError,
    InvalidStateError,
    NotOurCloneError,
)
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import EventKind, Hypervisor, HypervisorEvent
from imagepipe.record import replace
from tests.contract.hypervisor_suite import (
    BaseInUse,
    ForeignVM,
    HypervisorContract,
    OccupyDisplay,
)
from tests.fakes.hypervisor import FakeHypervisor, FakeImages

BASE = FakeImages().publish("tiny", 1)


def _conforms(fake: FakeHypervisor) -> Hypervisor:
    return fake  # mypy checks that FakeHypervisor has the port's shape


@dataclass(frozen=True)
class FakeForeignVM:
    fake: FakeHypervisor
    name: str

    def power(self) -> Power | None:
        return self.fake.foreign.get(self.name)


class TestFakeHypervisor(HypervisorContract):
    @pytest.fixture
    def fake_hv(self) -> Iterator[FakeHypervisor]:
        fake = FakeHypervisor()
        fake.add_base(BASE)
        yield fake
        fake.close()

    @pytest.fixture
    def hypervisor(self, fake_hv: FakeHypervisor) -> Hypervisor:
        return _conforms(fake_hv)

    @pytest.fixture
    def base_image(self) -> BaseImage:
        return BASE

    @pytest.fixture
    def foreign_vm(self, fake_hv: FakeHypervisor, contract_pool: str) -> ForeignVM:
        fake_hv.add_foreign(f"{contract_pool}-7")
        return FakeForeignVM(fake_hv, f"{contract_pool}-7")

    @pytest.fixture
    def base_in_use(self, fake_hv: FakeHypervisor) -> BaseInUse:
        @contextlib.contextmanager
        def running() -> Iterator[None]:
            fake_hv.add_base(BASE, powered_off=False)
            try:
                yield
            finally:
                fake_hv.add_base(BASE)

        return running

    @pytest.fixture
    def occupy_display(self, fake_hv: FakeHypervisor) -> OccupyDisplay:
        @contextlib.contextmanager
        def occupy(display: Endpoint) -> Iterator[None]:
            fake_hv.occupy(display)
            try:
                yield
            finally:
                fake_hv.release(display)

        return occupy


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
    with pytest.raises(BaseMissingError, match="tiny v1"):
        fake.create_clone(spec)
    assert not fake.base_ready(BASE)


def test_a_name_taken_by_another_pool_is_refused(fake: FakeHypervisor, spec: CloneSpec) -> None:
    fake.create_clone(spec)
    with pytest.raises(NotOurCloneError, match="belongs to pool lab"):
        fake.create_clone(replace(spec, pool="other"))


def test_a_linked_clone_whose_base_is_gone_neither_starts_nor_resets(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    fake.create_clone(spec)
    fake.remove_base(BASE)
    with pytest.raises(BaseMissingError, match="gone"):
        fake.start(spec.name)
    with pytest.raises(BaseMissingError, match="gone"):
        fake.reset(spec.name)
    assert fake.list_clones()[0].power is Power.SHUTOFF


def test_a_full_clone_starts_without_its_base(fake: FakeHypervisor, spec: CloneSpec) -> None:
    fake.create_clone(replace(spec, mode=CloneMode.FULL))
    fake.remove_base(BASE)
    fake.start(spec.name)
    assert fake.list_clones()[0].power is Power.RUNNING


def test_a_second_clone_may_share_a_display_port_only_while_the_first_is_off(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    second = replace(spec, name="lab-1", slot=1)
    fake.create_clone(spec)
    fake.create_clone(second)
    fake.start(spec.name)
    with pytest.raises(DisplayInUseError, match="lab-1"):
        fake.start(second.name)
    with pytest.raises(DisplayInUseError):
        fake.create_clone(replace(spec, name="lab-2", slot=2))
    fake.stop(spec.name, timeout=1.0)
    fake.start(second.name)
    assert [c.power for c in fake.list_clones()] == [Power.SHUTOFF, Power.RUNNING]


def test_a_suspended_clone_keeps_its_display_client_but_lists_no_users(
    fake: FakeHypervisor, spec: CloneSpec
) -> None:
    fake.create_clone(spec)
    fake.start(spec.name)
    fake.connect(spec.name, "10.1.1.1")
    fake.login(spec.name, "bob")
    fake.suspend(spec.name)
    session = fake.sessions(spec.name)
    assert session.client == "10.1.1.1" and session.users == ()


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
