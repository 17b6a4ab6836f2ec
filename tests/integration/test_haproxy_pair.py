"""A balancer pair on two real HAProxy 2.6: the group passes the balancer contract, an
HAProxy killed and started again is put back in step (backends, drain states) on the next
pass while the other keeps serving, and with `persist: source` the two share their stick
table (HAProxy peers), so a user returning through the other one reaches the same desktop.

Each HAProxy has its own short temp directory and loopback port (HAProxyHarness of
tests/integration/balancers.py); clients reach the desktops through the first one, as they
would through the instance that holds the VRRP address.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.balancers.group import BalancerGroup
from imagepipe.balancers.haproxy.config import Peer
from imagepipe.pool.model import BackendState, Endpoint
from tests.conftest import require_program
from tests.contract.balancer_suite import BalancerContract
from tests.host import free_port
from tests.integration.balancers import Client, HAProxyHarness, gone

pytestmark = pytest.mark.real


@dataclass
class PairHarness:
    a: HAProxyHarness
    b: HAProxyHarness

    def group(self) -> BalancerGroup:
        return BalancerGroup([("lb1", self.a.new_adapter()), ("lb2", self.b.new_adapter())])

    def desktop(self, index: int) -> Endpoint:
        return self.a.desktop(index)

    def connect(self) -> Client:
        return self.a.connect()

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        self.a.add_unmanaged(name, address)

    def reopen(self) -> BalancerGroup:
        return self.group()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        self.a.eventually(check, what)


def _harness() -> HAProxyHarness:
    # unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer
    return HAProxyHarness(
        Path(tempfile.mkdtemp(prefix="ipx-pair-")), Endpoint("127.0.0.1", free_port())
    )


@pytest.fixture
def pair() -> Iterator[PairHarness]:
    require_program("haproxy")
    harness = PairHarness(_harness(), _harness())
    try:
        yield harness
    finally:
        for one in (harness.a, harness.b):
            one.cleanup()
            shutil.rmtree(one.workdir, ignore_errors=True)


class TestHAProxyPairContract(BalancerContract):
    @pytest.fixture
    def harness(self, pair: PairHarness) -> PairHarness:
        return pair

    @pytest.fixture
    def balancer(self, pair: PairHarness) -> BalancerGroup:
        group = pair.group()
        group.ensure_frontend()
        return group


def test_a_killed_haproxy_gets_every_desktop_back_with_its_drain_state(
    pair: PairHarness,
) -> None:
    group = pair.group()
    group.ensure_frontend()
    group.enable("lab-1", pair.desktop(0))
    group.enable("lab-2", pair.desktop(1))
    group.drain("lab-2")
    on_a = pair.a.connect()  # a session through the instance that keeps running
    killed = pair.b.frontend_pid()
    os.kill(killed, signal.SIGKILL)
    pair.b.eventually(lambda: gone(killed), "die")

    group.ensure_frontend()  # the keeper's next pass

    restarted = pair.b.new_adapter()
    assert {b.name: b.state for b in restarted.list_backends()} == {
        "lab-1": BackendState.READY,
        "lab-2": BackendState.DRAIN,
    }
    assert on_a.alive(), "the other instance's session is untouched"
    on_a.close()
    pair.a.eventually(lambda: group.list_backends()[0].connections == 0, "the session to end")
    through_b = pair.b.connect()
    assert through_b.landed_on == pair.desktop(0), "the drained desktop gets nobody"
    through_b.close()
    assert [b.sessions_total for b in group.list_backends()] == [2, 0]


def test_a_stopped_haproxy_is_reported_and_the_other_is_kept(pair: PairHarness) -> None:
    group = BalancerGroup(
        [("lb1", pair.a.new_adapter()), ("lb2", pair.b.new_adapter(manage=False))]
    )
    pair.b.new_adapter().ensure_frontend()
    group.ensure_frontend()
    pair.b.new_adapter().shutdown()

    group.ensure_frontend()
    group.enable("lab-1", pair.desktop(0))

    assert [b.name for b in group.list_backends()] == ["lab-1"]
    lb1, lb2 = group.health()
    assert lb1.reachable and lb1.backends == 1
    assert not lb2.reachable and "does not answer" in (lb2.error or "")
    client = pair.connect()
    assert client.landed_on == pair.desktop(0)
    client.close()


def test_a_user_returning_through_the_other_haproxy_after_a_failover_reaches_the_same_desktop(
    pair: PairHarness,
) -> None:
    peers = (
        Peer("lb1", Endpoint("127.0.0.1", free_port())),
        Peer("lb2", Endpoint("127.0.0.1", free_port())),
    )
    # `first`: a client nobody has seen goes to the first desktop with room, so one that
    # reaches the second desktop through lb2 was sent there by the entry lb1 shared
    lb1, lb2 = (
        harness.new_adapter(balance="first", persist="source", peers=peers, local_peer=name)
        for harness, name in ((pair.a, "lb1"), (pair.b, "lb2"))
    )
    group = BalancerGroup([("lb1", lb1), ("lb2", lb2)])
    group.ensure_frontend()
    # a server lb2 does not have (left in maintenance): the same desktop has another server
    # id on each instance, as after a restart put them back in another order; entries name
    # the desktop (HAProxy's `srvkey name`), so they still match
    lb1.admin.command(f"add server desktops/elsewhere {pair.desktop(2)} maxconn 1")
    group.enable("lab-1", pair.desktop(0))
    group.enable("lab-2", pair.desktop(1))
    alice = pair.a.connect(source="127.0.0.2")
    bob = pair.a.connect(source="127.0.0.3")
    assert (alice.landed_on, bob.landed_on) == (pair.desktop(0), pair.desktop(1))
    alice.close()
    bob.close()
    pair.b.eventually(
        lambda: "key=127.0.0.3 " in lb2.admin.command("show table desktops"),
        "learn bob's desktop from lb1",
    )

    killed = pair.a.frontend_pid()  # lb1 fails: users come through lb2 now
    os.kill(killed, signal.SIGKILL)
    pair.a.eventually(lambda: gone(killed), "die")

    bob_again = pair.b.connect(source="127.0.0.3")
    assert bob_again.landed_on == pair.desktop(1), "bob is back on his desktop"
    carol = pair.b.connect(source="127.0.0.4")
    assert carol.landed_on == pair.desktop(0), "a new user gets the first free desktop"
    bob_again.close()
    carol.close()
