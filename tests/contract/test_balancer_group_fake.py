"""A balancer group over two FakeBalancers passes the balancer contract, and keeps its
instances in step: restarts, unreachable instances, and the session evidence across both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from imagepipe.balancers.group import BalancerGroup, InstanceHealth
from imagepipe.errors import BackendInUseError, BalancerError
from imagepipe.pool.model import Backend, BackendState, Endpoint
from imagepipe.pool.planner.steps import connected_since
from tests.contract.balancer_suite import BalancerContract
from tests.contract.test_balancer_fake import FakeClient
from tests.fakes.balancer import FakeBalancer

DESKTOP = Endpoint("192.0.2.10", 5900)


@dataclass
class Pair:
    """Two balancer instances (their processes' state) and a group keeping them."""

    a: FakeBalancer
    b: FakeBalancer
    group: BalancerGroup

    def reopen(self) -> BalancerGroup:
        return BalancerGroup([("lb1", self.a.reopen()), ("lb2", self.b.reopen())])


def make_pair() -> Pair:
    a, b = FakeBalancer(), FakeBalancer()
    group = BalancerGroup([("lb1", a.reopen()), ("lb2", b.reopen())])
    group.ensure_frontend()
    return Pair(a, b, group)


@dataclass
class GroupHarness:
    """Clients arrive through the first instance (the one holding the shared address)."""

    pair: Pair

    def desktop(self, index: int) -> Endpoint:
        return Endpoint("192.0.2.10", 5900 + index)

    def connect(self) -> FakeClient:
        name = self.pair.a.route()
        addresses = {b.name: b.address for b in self.pair.a.list_backends()}
        return FakeClient(self.pair.a, name, addresses.get(name) if name else None)

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        self.pair.a.add_unmanaged(name, address)

    def reopen(self) -> BalancerGroup:
        return self.pair.reopen()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        assert check(), what


class TestBalancerGroupContract(BalancerContract):
    @pytest.fixture
    def pair(self) -> Pair:
        return make_pair()

    @pytest.fixture
    def balancer(self, pair: Pair) -> BalancerGroup:
        return pair.group

    @pytest.fixture
    def harness(self, pair: Pair) -> GroupHarness:
        return GroupHarness(pair)


def states(fake: FakeBalancer) -> dict[str, BackendState]:
    return {b.name: b.state for b in fake.list_backends()}


def total(group: BalancerGroup, name: str) -> int | None:
    return next(b for b in group.list_backends() if b.name == name).sessions_total


def test_every_change_reaches_both_instances() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.group.enable("lab-2", Endpoint("192.0.2.11", 5900))
    pair.group.drain("lab-1")
    assert (
        states(pair.a)
        == states(pair.b)
        == {
            "lab-1": BackendState.DRAIN,
            "lab-2": BackendState.READY,
        }
    )
    pair.group.remove("lab-1")
    assert states(pair.a) == states(pair.b) == {"lab-2": BackendState.READY}


def test_an_instance_that_restarted_gets_every_backend_back_with_its_drain_state() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.group.enable("lab-2", Endpoint("192.0.2.11", 5900))
    pair.group.drain("lab-2")
    pair.b.crash()
    pair.group.ensure_frontend()  # the next pass
    assert states(pair.b) == {"lab-1": BackendState.READY, "lab-2": BackendState.DRAIN}
    assert pair.b.list_backends()[0].address == DESKTOP


def test_a_new_keeper_puts_a_restarted_instance_back_in_step_too() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.group.drain("lab-1")
    pair.b.crash()
    fresh = pair.reopen()  # the keeper restarted as well: the group knows only the instances
    fresh.ensure_frontend()
    assert states(pair.b) == {"lab-1": BackendState.DRAIN}


def test_an_unreachable_instance_does_not_stop_the_others_and_is_reported() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.b.state.reachable = False
    pair.group.ensure_frontend()
    pair.group.enable("lab-2", Endpoint("192.0.2.11", 5900))
    pair.group.drain("lab-1")
    assert [b.name for b in pair.group.list_backends()] == ["lab-1", "lab-2"]
    assert states(pair.a) == {"lab-1": BackendState.DRAIN, "lab-2": BackendState.READY}
    health = pair.group.health()
    assert health[0] == InstanceHealth("lb1", reachable=True, backends=2)
    assert health[1].name == "lb2" and not health[1].reachable
    assert "does not answer" in (health[1].error or "")


def test_an_instance_that_answers_again_is_put_in_step_on_the_next_pass() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.group.enable("lab-3", Endpoint("192.0.2.13", 5900))
    pair.b.state.reachable = False
    pair.group.enable("lab-2", Endpoint("192.0.2.11", 5900))
    pair.group.drain("lab-1")
    pair.group.remove("lab-3")
    pair.b.state.reachable = True
    pair.group.ensure_frontend()
    assert (
        states(pair.b)
        == states(pair.a)
        == {
            "lab-1": BackendState.DRAIN,
            "lab-2": BackendState.READY,
        }
    )
    assert all(h.reachable for h in pair.group.health())


def test_a_backend_removed_while_an_instance_was_away_is_not_spread_back() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.b.state.reachable = False
    pair.group.remove("lab-1")
    pair.b.state.reachable = True
    pair.group.ensure_frontend()
    assert pair.a.list_backends() == pair.b.list_backends() == []


def test_when_no_instance_answers_every_call_fails_naming_them() -> None:
    pair = make_pair()
    pair.a.state.reachable = False
    pair.b.state.reachable = False
    with pytest.raises(BalancerError, match=r"no balancer instance answers: lb1: .*; lb2: "):
        pair.group.list_backends()
    with pytest.raises(BalancerError, match="no balancer instance answers"):
        pair.group.enable("lab-1", DESKTOP)


def test_connections_add_up_and_removal_waits_for_a_client_on_either_instance() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.b.connect("lab-1")  # a client that came in while lb2 held the address
    assert pair.group.list_backends() == [
        Backend("lab-1", DESKTOP, BackendState.READY, connections=1, sessions_total=1)
    ]
    pair.group.drain("lab-1")
    with pytest.raises(BackendInUseError, match="lab-1"):
        pair.group.remove("lab-1")
    assert states(pair.a) == states(pair.b) == {"lab-1": BackendState.DRAIN}


def test_a_session_on_any_instance_is_evidence_for_the_keeper() -> None:
    """The keeper's rule compares the counter with what it accounted for: a session on
    either instance, before or after one of them restarted, must raise it; a restart alone
    must not look like a session (or every free desktop would be reset)."""
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    seen = total(pair.group, "lab-1")
    assert seen == 0

    def session_on(fake: FakeBalancer) -> None:
        fake.connect("lab-1")
        fake.disconnect("lab-1")

    for step in ("a", "b", "restart b", "b", "restart a", "a", "restart both", "b"):
        if step.startswith("restart"):
            for fake in (pair.a, pair.b) if step == "restart both" else (getattr(pair, step[-1]),):
                fake.crash()
            pair.group.ensure_frontend()
            now = total(pair.group, "lab-1")
            assert not connected_since(seen, now), f"{step}: {seen} -> {now}"
        else:
            session_on(getattr(pair, step))
            now = total(pair.group, "lab-1")
            assert connected_since(seen, now), f"session on {step}: {seen} -> {now}"
        seen = now
    assert seen == 5


def test_a_restarted_instance_counts_again_from_the_pass_that_put_it_back() -> None:
    """Sessions on a restarted instance that bring its counter back to where it was before
    the restart still show (the loss is accounted when the group puts the backend back)."""
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    for _ in range(2):
        pair.b.connect("lab-1")
        pair.b.disconnect("lab-1")
    seen = total(pair.group, "lab-1")
    pair.b.crash()
    pair.group.ensure_frontend()
    for _ in range(2):
        pair.b.connect("lab-1")
        pair.b.disconnect("lab-1")
    assert connected_since(seen, total(pair.group, "lab-1"))


def test_a_session_through_an_unreachable_instance_shows_once_it_answers() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.b.connect("lab-1")
    pair.b.disconnect("lab-1")
    seen = total(pair.group, "lab-1")
    pair.b.state.reachable = False
    assert total(pair.group, "lab-1") == seen, "its last count stands in while it is away"
    pair.b.state.reachable = True
    pair.b.connect("lab-1")
    pair.b.disconnect("lab-1")
    assert connected_since(seen, total(pair.group, "lab-1"))


def test_a_removed_backend_counts_from_zero_on_every_instance() -> None:
    pair = make_pair()
    pair.group.enable("lab-1", DESKTOP)
    pair.b.crash()
    pair.group.ensure_frontend()
    pair.a.connect("lab-1")
    pair.a.disconnect("lab-1")
    pair.group.drain("lab-1")
    pair.group.remove("lab-1")
    pair.group.enable("lab-1", DESKTOP)
    assert total(pair.group, "lab-1") == 0
