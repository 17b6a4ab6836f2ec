"""The balancer contract and HAProxy-specific behaviour against a real HAProxy 2.6.

Each test starts its own HAProxy on a free loopback port (manage=True) with its files in a
short temp directory, and tiny TCP servers on 127.0.0.1 standing in for desktops
(tests/integration/balancers.py). Every HAProxy is stopped even when a test fails. What
HAProxy and IPVS both do is in test_balancer_pairs.py.
"""

from __future__ import annotations

import threading

import pytest

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.errors import EnvironmentMissingError
from imagepipe.pool.model import BackendState
from tests.contract.balancer_suite import BalancerContract
from tests.integration.balancers import HAPROXY_WAIT, Client, HAProxyHarness, gone

pytestmark = pytest.mark.real


class TestHAProxyContract(BalancerContract):
    @pytest.fixture
    def harness(self, haproxy_harness: HAProxyHarness) -> HAProxyHarness:
        return haproxy_harness

    @pytest.fixture
    def balancer(self, haproxy_harness: HAProxyHarness) -> HAProxyBalancer:
        adapter = haproxy_harness.new_adapter()
        adapter.ensure_frontend()
        return adapter


def test_changing_the_balance_reloads_haproxy_and_keeps_backends_and_sessions(
    haproxy_harness: HAProxyHarness,
) -> None:
    balancer = haproxy_harness.new_adapter(balance="leastconn")
    balancer.ensure_frontend()
    balancer.enable("lab-1", haproxy_harness.desktop(0))
    balancer.enable("lab-2", haproxy_harness.desktop(1))
    balancer.drain("lab-2")
    client = haproxy_harness.connect()
    old_pid = haproxy_harness.frontend_pid()

    changed = haproxy_harness.new_adapter(balance="first")
    changed.ensure_frontend()
    assert haproxy_harness.frontend_pid() != old_pid
    assert "balance first" in (haproxy_harness.workdir / "haproxy.cfg").read_text()
    assert {b.name: b.state for b in changed.list_backends()} == {
        "lab-1": BackendState.READY,
        "lab-2": BackendState.DRAIN,
    }
    assert client.alive()  # the old process keeps serving the open session
    client.close()
    haproxy_harness.eventually(lambda: gone(old_pid), "retire the old")


def test_balance_first_fills_the_first_desktop_before_the_next(
    haproxy_harness: HAProxyHarness,
) -> None:
    balancer = haproxy_harness.new_adapter(balance="first")
    balancer.ensure_frontend()
    balancer.enable("lab-1", haproxy_harness.desktop(0))
    balancer.enable("lab-2", haproxy_harness.desktop(1))
    first = haproxy_harness.connect()
    second = haproxy_harness.connect()
    assert (first.landed_on, second.landed_on) == (
        haproxy_harness.desktop(0),
        haproxy_harness.desktop(1),
    )
    first.close()
    second.close()


def test_unmanaged_haproxy_without_a_socket_says_how_to_fix_it(
    haproxy_harness: HAProxyHarness,
) -> None:
    balancer = haproxy_harness.new_adapter(manage=False)
    with pytest.raises(EnvironmentMissingError, match=r"stats socket .* level admin") as error:
        balancer.ensure_frontend()
    assert "set balancer.manage: true" in str(error.value)  # a settings key that exists
    assert not (haproxy_harness.workdir / "haproxy.pid").exists()  # nothing was started


def test_unmanaged_adapter_drives_a_running_haproxy(haproxy_harness: HAProxyHarness) -> None:
    haproxy_harness.new_adapter().ensure_frontend()  # somebody else's HAProxy, already running
    balancer = haproxy_harness.new_adapter(manage=False)
    balancer.ensure_frontend()
    balancer.enable("lab-1", haproxy_harness.desktop(0))
    balancer.drain("lab-1")
    assert [(b.name, b.state) for b in balancer.list_backends()] == [("lab-1", BackendState.DRAIN)]


def test_a_waiting_client_gets_the_desktop_when_its_user_leaves(
    haproxy_harness: HAProxyHarness,
) -> None:
    balancer = haproxy_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", haproxy_harness.desktop(0))
    user = haproxy_harness.connect()
    waiting = haproxy_harness.connect()
    assert waiting.landed_on is None
    user.close()
    waiting.sock.settimeout(HAPROXY_WAIT)
    assert waiting.sock.recv(16) == f"{haproxy_harness.desktop(0).port}\n".encode()
    waiting.close()


def test_users_arriving_at_the_same_instant_never_share_a_desktop(
    haproxy_harness: HAProxyHarness,
) -> None:
    """A morning rush: clients that connect at the same moment must each get a desktop of
    their own. (With HAProxy's default of one thread per CPU, two threads could both hand
    the same maxconn-1 server a connection: up to 1 round in 30 shared a desktop here.)"""
    ROUNDS = 200
    balancer = haproxy_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-0", haproxy_harness.desktop(0))
    balancer.enable("lab-1", haproxy_harness.desktop(1))
    shared = 0
    for _ in range(ROUNDS):
        start = threading.Barrier(2)
        clients: list[Client] = []

        def arrive(start: threading.Barrier, clients: list[Client]) -> None:
            start.wait()
            clients.append(haproxy_harness.connect())

        arrivals = [threading.Thread(target=arrive, args=(start, clients)) for _ in range(2)]
        for t in arrivals:
            t.start()
        for t in arrivals:
            t.join()
        first, second = clients
        if first.landed_on is not None and first.landed_on == second.landed_on:
            shared += 1
        first.close()
        second.close()
        haproxy_harness.eventually(
            lambda: all(b.connections == 0 for b in balancer.list_backends()),
            "both desktops free again",
        )
    assert shared == 0, f"two users got the same desktop in {shared} of {ROUNDS} rounds"
