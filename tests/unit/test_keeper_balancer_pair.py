"""The keeper over a balancer pair (fakes): a pass goes on when one instance does not answer,
says so, and puts it in step when it answers again; a session through either instance while
no keeper watched gets the desktop reset before anyone else has it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.balancers.group import BalancerGroup
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import BackendState, CloneState
from tests.fakes.balancer import FakeBalancer
from tests.unit.test_keeper import World, settle


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(store_path=tmp_path / "state.db")
    yield w
    w.store.close()


def keeper_over(world: World, lb1: FakeBalancer, lb2: FakeBalancer) -> Keeper:
    """A keeper (a fresh process: the group knows nothing yet) over both instances."""
    group = BalancerGroup([("lb1", lb1.reopen()), ("lb2", lb2.reopen())])
    return Keeper(
        hypervisor=world.hv,
        balancer=group,
        store=world.store,
        images=world.images,
        specs=[world.spec],
        clock=world.clock,
    )


def ready(fake: FakeBalancer) -> list[str]:
    return sorted(b.name for b in fake.list_backends() if b.state is BackendState.READY)


def test_a_pass_goes_on_without_an_instance_that_does_not_answer_and_reports_it(
    world: World,
) -> None:
    lb1, lb2 = FakeBalancer(), FakeBalancer()
    lb2.state.reachable = False
    keeper = keeper_over(world, lb1, lb2)

    reports = settle(keeper)

    assert len(ready(lb1)) == 2, "the pool is served through lb1"
    instances = {i.name: i.reachable for i in reports[-1].observation.balancer_instances}
    assert instances == {"lb1": True, "lb2": False}
    assert reports[-1].observation.balancer_error is None

    lb2.state.reachable = True
    report = keeper.run_pass()
    assert ready(lb2) == ready(lb1)
    assert all(i.reachable for i in report.observation.balancer_instances)


def test_a_session_through_the_second_instance_while_no_keeper_watched_gets_a_reset(
    world: World,
) -> None:
    lb1, lb2 = FakeBalancer(), FakeBalancer()
    settle(keeper_over(world, lb1, lb2))
    taken = ready(lb2)[0]
    lb2.connect(taken)  # the address was on lb2; nobody told the hypervisor's events
    lb2.disconnect(taken)

    keeper = keeper_over(world, lb1, lb2)  # the keeper comes back
    settle(keeper)

    assert ("reset", taken) in world.hv.calls, "the desktop somebody used was reset"
    assert world.states()[taken] is CloneState.FREE
    assert not world.hv.is_dirty(taken)


def test_a_session_through_one_instance_while_the_other_restarted_gets_a_reset(
    world: World,
) -> None:
    """The restart takes lb1's count down by one while lb2's goes up by one: a plain sum
    would stay where the keeper left it and hide the session."""
    lb1, lb2 = FakeBalancer(), FakeBalancer()
    keeper = keeper_over(world, lb1, lb2)
    settle(keeper)
    taken = ready(lb1)[0]
    lb1.connect(taken)  # an earlier user, seen and reset by the keeper
    lb1.disconnect(taken)
    settle(keeper)
    resets = world.hv.calls.count(("reset", taken))
    assert resets == 1
    lb1.crash()  # lb1 restarts (its count of 1 is gone) ...
    lb2.connect(taken)  # ... while a new user comes in through lb2
    lb2.disconnect(taken)

    settle(keeper)

    assert world.hv.calls.count(("reset", taken)) == resets + 1
