"""The fencing token on a real PostgreSQL, with two keepers in this process over the fake host:
a leader paused in the middle of a pass (after it checked that it leads, before it writes)
past its lease, while the other keeper took over, changes nothing when it goes on: its first
write is refused inside the database's transaction, and it steps down saying why. A leader
whose loop is wedged in a host call hands its lease over, though its lease thread is fine.

The lease runs on the database server's clock, so the pause is real time (about 1.5 s)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from imagepipe.app.bootstrap import SystemClock
from imagepipe.app.leadership import Election, ElectionLoop, LeaseSettings, Role
from imagepipe.errors import FencedError
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import PoolSpec
from imagepipe.stores.postgres import PostgresStore
from tests.fakes.balancer import FakeBalancer, FakeBalancerState
from tests.fakes.hypervisor import FakeHypervisor, FakeImages
from tests.postgres import PostgresServer

pytestmark = pytest.mark.real

LEASE = LeaseSettings(lease=1.0, loop_wait=0.3, retry_timeout=0.3)
SPEC = PoolSpec(name="fz", image="tiny", initial=2, free=2, max=4, port_first=7300, port_last=7309)


class Side:
    """One keeper process: its own store connection, election and keeper."""

    def __init__(
        self, name: str, dsn: str, password: str, hv: FakeHypervisor, lb: FakeBalancerState
    ) -> None:
        self.store = PostgresStore(dsn, password=password)
        clock = SystemClock()
        self.election = Election(self.store, name, LEASE, clock)
        images = FakeImages()
        images.publish("tiny", 1)
        self.keeper = Keeper(
            hypervisor=hv,
            balancer=FakeBalancer(lb),
            store=self.store,
            images=images,
            specs=[SPEC],
            clock=clock,
            settings=KeeperOptions(tick=0.1),
        )
        self.keeper.lead = self.election
        self._threads: list[threading.Thread] = []
        self._loop: ElectionLoop | None = None

    def start(self) -> None:
        """Run as `imagepipe keep` does: the lease loop and the keeper loop, each a thread."""
        self._loop = ElectionLoop(self.election, on_change=self.keeper.wake)
        self._loop.start()
        thread = threading.Thread(target=self.keeper.run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.keeper.stop()
        if self._loop is not None:
            self._loop.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    def passes(self, hv: FakeHypervisor, count: int) -> None:
        for _ in range(count):
            self.election.step()
            self.keeper.pass_if_leading()
            hv.tick()


@pytest.fixture
def sides(
    postgres_server: PostgresServer, postgres_dsn: str
) -> Iterator[tuple[Side, Side, FakeHypervisor, FakeBalancerState]]:
    hv = FakeHypervisor(boot_ticks=1)
    hv.add_base(FakeImages().publish("tiny", 1))
    lb = FakeBalancerState()
    a = Side("host-a/1", postgres_dsn, postgres_server.password, hv, lb)
    b = Side("host-b/2", postgres_dsn, postgres_server.password, hv, lb)
    yield a, b, hv, lb
    a.stop()
    b.stop()
    a.store.close()
    b.store.close()


def test_a_leader_paused_mid_pass_past_its_lease_changes_nothing_and_steps_down(
    sides: tuple[Side, Side, FakeHypervisor, FakeBalancerState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, hv, lb = sides
    a.passes(hv, 6)
    assert a.election.role is Role.LEADING
    assert len(hv.clones) == 2

    time.sleep(LEASE.lease + 0.5)  # host-a paused (SIGSTOP) after deciding to pass
    b.passes(hv, 1)
    assert b.election.term() is not None  # host-b took over under a new epoch
    hv.clones.pop(sorted(hv.clones)[0])  # a desktop gone: host-a's pass would remake it
    clones, servers = set(hv.clones), dict(lb.servers)
    caplog.set_level(logging.INFO)

    with pytest.raises(FencedError) as refused:  # host-a goes on with its pass
        a.keeper.run_pass()
    a.election.fenced(refused.value)

    assert set(hv.clones) == clones and dict(lb.servers) == servers
    assert a.election.term() is None and not a.keeper.may_act()
    down = [r for r in caplog.records if r.getMessage().startswith("stepped down")]
    assert len(down) == 1
    reason = getattr(down[0], "imagepipe_fields", {})["reason"]
    assert "another keeper was elected" in reason and "held by host-b/2" in reason
    b.passes(hv, 6)  # the leader remakes the desktop
    assert len(hv.clones) == 2


def until(condition: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until `condition` held, or None if it did not within `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def test_a_leader_wedged_in_a_host_call_loses_the_lease_and_the_standby_takes_over(
    sides: tuple[Side, Side, FakeHypervisor, FakeBalancerState],
) -> None:
    a, b, hv, _ = sides
    a.start()
    assert until(lambda: a.election.term() is not None and len(hv.clones) == 2, 10) is not None
    b.start()
    time.sleep(LEASE.loop_wait * 2)
    assert b.election.term() is None

    gate = hv.block("list_clones")  # the leader's next pass hangs in its first host call
    try:
        # wedged for stall (lease - retry) seconds, then handed over: well within 3 leases
        took = until(lambda: b.election.term() is not None, 3 * LEASE.lease)
        assert took is not None, "the wedged leader kept its lease: the standby never led"
        assert a.election.term() is None and not a.keeper.may_act()
    finally:
        gate.set()  # the call returns: the old leader's pass goes on, fenced
    time.sleep(LEASE.lease)
    assert b.election.term() is not None and a.election.term() is None
    assert len(hv.clones) == 2  # nothing made twice
