"""Scenarios beyond the contract suite that a real HAProxy and a real IPVS kernel both go
through, written once and run on each (tests/integration/balancers.py has the two
harnesses): a keeper restart reads everything back, a frontend lost behind imagepipe's back
is put back, a returning user reaches their draining desktop with persistence, desktops
enabled at the same moment all keep their names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import pytest

from imagepipe.pool.model import Backend, BackendState, Endpoint
from imagepipe.pool.ports import Balancer
from tests.contract.balancer_suite import by_name, listed
from tests.integration.balancers import Client

pytestmark = pytest.mark.real


class RealBalancer(Protocol):
    """What both harnesses give these scenarios."""

    def new_adapter(self) -> Balancer: ...

    def persistent_adapter(self) -> Balancer: ...

    def desktop(self, index: int) -> Endpoint: ...

    def connect(self) -> Client: ...

    def eventually(self, check: Callable[[], bool], what: str) -> None: ...

    def frontend_pid(self) -> int | None: ...

    def lose_frontend(self) -> None: ...


@pytest.fixture(params=["haproxy", "ipvs"])
def real(request: pytest.FixtureRequest) -> RealBalancer:
    harness: RealBalancer = request.getfixturevalue(f"{request.param}_harness")
    return harness


def test_a_keeper_restart_reads_names_states_and_sessions_back_and_keeps_the_frontend(
    real: RealBalancer,
) -> None:
    balancer = real.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real.desktop(0))
    balancer.enable("lab-2", real.desktop(1))
    client = real.connect()
    busy = next(b.name for b in balancer.list_backends() if b.address == client.landed_on)
    idle = ({"lab-1", "lab-2"} - {busy}).pop()
    balancer.drain(busy)
    before = listed(balancer)
    serving = real.frontend_pid()
    balancer.close()

    again = real.new_adapter()
    again.ensure_frontend()

    assert real.frontend_pid() == serving, "the restart replaced the running frontend"
    assert listed(again) == before
    assert {b.name: (b.state, b.connections) for b in before} == {
        busy: (BackendState.DRAIN, 1),
        idle: (BackendState.READY, 0),
    }
    assert client.alive()
    client.close()


def test_a_frontend_lost_behind_our_back_is_put_back_and_desktops_can_be_added_again(
    real: RealBalancer,
) -> None:
    """HAProxy killed with SIGKILL (the keeper starts a new one); the IPVS table flushed
    (the service is made again). The lost backends are the keeper's to add again."""
    balancer = real.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real.desktop(0))
    lost = real.frontend_pid()
    real.lose_frontend()

    balancer.ensure_frontend()

    assert lost is None or real.frontend_pid() != lost
    assert balancer.list_backends() == []
    balancer.enable("lab-1", real.desktop(0))
    assert [(b.name, b.state) for b in balancer.list_backends()] == [("lab-1", BackendState.READY)]
    client = real.connect()
    assert client.landed_on == real.desktop(0)
    client.close()


def test_a_drained_desktop_takes_its_returning_user_with_persistence(real: RealBalancer) -> None:
    """With persistence (HAProxy `persist: source`, IPVS -p), a user whose connection
    dropped comes back to their own desktop even while it drains for a rollout."""
    balancer = real.persistent_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real.desktop(0))
    balancer.enable("lab-2", real.desktop(1))
    first = real.connect()
    assert first.landed_on is not None
    mine = next(b.name for b in balancer.list_backends() if b.address == first.landed_on)
    balancer.drain(mine)
    first.close()
    real.eventually(lambda: by_name(balancer)[mine].connections == 0, "the session to end")

    again = real.connect()

    assert again.landed_on == first.landed_on
    assert again.alive()
    assert {b.name: b for b in listed(balancer)}[mine] == Backend(
        mine, first.landed_on, BackendState.DRAIN, 1
    )
    again.close()


def test_desktops_enabled_at_the_same_time_all_keep_their_names(real: RealBalancer) -> None:
    """The keeper's executor runs actions on different clones at once; no name is lost."""
    balancer = real.new_adapter()
    balancer.ensure_frontend()
    threads = [
        threading.Thread(target=balancer.enable, args=(f"lab-{i}", real.desktop(i)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert {b.name: b.address for b in balancer.list_backends()} == {
        f"lab-{i}": real.desktop(i) for i in range(4)
    }
