"""FakeBalancer passes the balancer contract, and behaves like HAProxy where tests lean on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from imagepipe.errors import BalancerError
from imagepipe.pool.model import Backend, BackendState, Endpoint
from imagepipe.pool.ports import Balancer
from tests.contract.balancer_suite import BalancerContract
from tests.fakes.balancer import FakeBalancer


@dataclass
class FakeClient:
    fake: FakeBalancer
    backend: str | None
    desktop: Endpoint | None
    open: bool = True

    @property
    def landed_on(self) -> Endpoint | None:
        return self.desktop

    def alive(self) -> bool:
        names = {b.name for b in self.fake.list_backends()}
        return self.open and self.backend in names

    def close(self) -> None:
        if self.open and self.backend is not None:
            self.fake.disconnect(self.backend)
        self.open = False


@dataclass
class FakeHarness:
    fake: FakeBalancer

    def desktop(self, index: int) -> Endpoint:
        return Endpoint("192.0.2.10", 5900 + index)

    def connect(self) -> FakeClient:
        name = self.fake.route()
        addresses = {b.name: b.address for b in self.fake.list_backends()}
        return FakeClient(self.fake, name, addresses.get(name) if name else None)

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        self.fake.add_unmanaged(name, address)

    def reopen(self) -> Balancer:
        return self.fake.reopen()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        assert check(), what


class TestFakeBalancerContract(BalancerContract):
    @pytest.fixture
    def balancer(self) -> FakeBalancer:
        fake = FakeBalancer()
        fake.ensure_frontend()
        return fake

    @pytest.fixture
    def harness(self, balancer: FakeBalancer) -> FakeHarness:
        return FakeHarness(balancer)


def test_fake_refuses_a_user_on_a_drained_or_full_desktop() -> None:
    fake = FakeBalancer()
    fake.enable("lab-1", Endpoint("192.0.2.10", 5900))
    fake.connect("lab-1")
    with pytest.raises(BalancerError, match="already has"):
        fake.connect("lab-1")
    fake.disconnect("lab-1")
    fake.drain("lab-1")
    with pytest.raises(BalancerError, match="drain"):
        fake.connect("lab-1")


def test_fake_queues_a_client_when_every_desktop_is_busy() -> None:
    fake = FakeBalancer()
    fake.enable("lab-1", Endpoint("192.0.2.10", 5900))
    assert fake.route() == "lab-1"
    assert fake.route() is None


def test_after_a_crash_nothing_answers_until_the_frontend_is_ensured_then_enable_readds() -> None:
    fake = FakeBalancer()
    fake.enable("lab-1", Endpoint("192.0.2.10", 5900))
    fake.crash()
    with pytest.raises(BalancerError, match="not running"):
        fake.list_backends()
    fake.ensure_frontend()
    assert fake.list_backends() == []
    fake.enable("lab-1", Endpoint("192.0.2.10", 5900))
    assert fake.list_backends() == [
        Backend("lab-1", Endpoint("192.0.2.10", 5900), BackendState.READY, 0, sessions_total=0)
    ]


def test_a_closed_fake_refuses_work() -> None:
    fake = FakeBalancer()
    fake.close()
    with pytest.raises(BalancerError, match="closed"):
        fake.list_backends()


def test_fake_records_what_it_was_asked() -> None:
    fake = FakeBalancer()
    fake.enable("lab-1", Endpoint("192.0.2.10", 5900))
    fake.drain("lab-1")
    fake.remove("lab-1")
    assert fake.calls == [
        ("enable", "lab-1", "192.0.2.10:5900"),
        ("drain", "lab-1"),
        ("remove", "lab-1"),
    ]
