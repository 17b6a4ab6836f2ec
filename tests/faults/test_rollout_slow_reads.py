"""A rollout on a loaded host (a pool of free 2, max 4, one session held on v1, then
`rollout tiny --drain`): the balancer's and the hypervisor's reads fail now and then, for
the keeper and for `status`. The pool must never run dry, and `status` must say "unknown"
for what it could not read, never a wrong state ("missing", "not in the balancer")."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters, Runtime
from imagepipe.app.status import HostStatus, PoolStatus, collect
from imagepipe.config import Settings
from imagepipe.errors import ImagepipeError
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import BackendState, Power
from imagepipe.pool.rollout.control import Request, RolloutControl
from imagepipe.pool.rollout.records import RolloutState
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages, FakeVersion
from tests.faults.injector import FaultInjector, FaultKind
from tests.faults.ports import FaultyBalancer, FaultyHypervisor
from tests.unit.test_rollout_keeper import LAB

READS = ("list_backends", "sessions")


class LoadedHost:
    def __init__(self, root: Path) -> None:
        self.clock = FakeClock()
        self.images = FakeImages()
        self.hv = FakeHypervisor(clock=self.clock.now)
        self.hv.add_base(self.images.publish("tiny", 1, channel="stable"))
        self.lb = FakeBalancer()
        self.settings = Settings(state_db=root / "state.db", run_dir=root / "run")
        self.store = SQLiteStore(self.settings.state_db)
        self.control = RolloutControl(self.store, self.images, self.images, self.clock)

    def keeper(self, injector: FaultInjector | None = None) -> Keeper:
        hv, lb = self.hv, self.lb
        return Keeper(
            hypervisor=hv if injector is None else FaultyHypervisor(hv, injector),
            balancer=lb if injector is None else FaultyBalancer(lb, injector),
            store=self.store,
            images=self.images,
            specs=[LAB],
            clock=self.clock,
            settings=KeeperOptions(tick=5.0),
            channels=self.images,
        )

    def status(self, injector: FaultInjector | None = None) -> PoolStatus:
        hv, lb = self.hv, self.lb
        adapters = Adapters(
            hypervisor=hv if injector is None else FaultyHypervisor(hv, injector),
            balancer=lb if injector is None else FaultyBalancer(lb, injector),
            images=self.images,
            clock=self.clock,
        )
        with Runtime(self.settings, adapters, manage_balancer=False) as runtime:
            snapshot: HostStatus = collect(runtime, [LAB])
        (pool,) = snapshot.pools
        return pool

    def serving(self) -> set[str]:
        """The truth: desktops a new user gets now (ready in the balancer, nobody on them)."""
        return {
            b.name
            for b in self.lb.list_backends()
            if b.state is BackendState.READY
            and self.hv.clones[b.name].power is Power.RUNNING
            and not self.hv.clones[b.name].session.active
        }

    def settle(self, keeper: Keeper) -> None:
        for _ in range(8):
            keeper.run_pass()
            self.hv.tick()

    def hold_a_session(self) -> str:
        name = sorted(self.serving())[0]
        self.hv.connect(name, "10.0.0.7")
        self.hv.login(name, "alice")
        return name


@pytest.fixture
def host(tmp_path: Path) -> Iterator[LoadedHost]:
    h = LoadedHost(tmp_path)
    yield h
    h.store.close()


def failing(operations: tuple[str, ...], *, rate: float = 1.0, seed: int = 0) -> FaultInjector:
    return FaultInjector(
        rng=random.Random(seed), kinds={FaultKind.BUSY}, rate=rate, operations=operations
    )


def test_status_says_unknown_for_sessions_it_could_not_read_not_missing(
    host: LoadedHost,
) -> None:
    host.settle(host.keeper())
    assert host.status().free == 2

    pool = host.status(failing(("sessions",)))

    assert "cannot read sessions" in (pool.note or "")
    assert pool.total == 2  # every desktop the host has is shown
    assert {c.state for c in pool.clones} == {"unknown"}
    assert all(c.power == "running" and c.balancer == "ready" for c in pool.clones)
    assert (pool.free, pool.unknown) == (0, 2)


def test_status_says_unknown_for_the_balancer_it_could_not_read(host: LoadedHost) -> None:
    host.settle(host.keeper())

    pool = host.status(failing(("list_backends",)))

    assert {c.balancer for c in pool.clones} == {"unknown"}
    assert pool.free == 2  # the desktops' own states were read
    assert pool.unknown == 0


def test_a_drain_rollout_never_runs_dry_and_status_never_misreports_when_reads_fail(
    host: LoadedHost,
) -> None:
    """Item 15's scenario with a third of the keeper's and status' reads failing."""
    keeper = host.keeper(failing(READS, rate=0.3, seed=1))
    host.settle(host.keeper())
    alice = host.hold_a_session()
    host.settle(host.keeper())
    host.images.versions["tiny"].add(2)
    host.hv.add_base(FakeVersion("tiny", 2).base_image())
    host.control.start([LAB], [], Request(image="tiny"), by="admin")
    reads = failing(READS, rate=0.3, seed=2)
    for _ in range(40):
        with contextlib.suppress(ImagepipeError):  # the keeper's loop logs it, goes on
            keeper.run_pass()
        host.hv.tick()
        host.clock.advance(1.0)
        serving = host.serving()
        assert len(serving) >= 2, serving
        pool = host.status(reads)
        for c in pool.clones:
            if c.name in serving:  # really serving: never shown as anything else
                assert c.state in ("free", "unknown"), c
                assert c.balancer in ("ready", "unknown"), c
    assert host.hv.clones[alice].session.active
    assert host.store.rollouts("tiny")[0].state is RolloutState.IN_PROGRESS
    assert sorted(c.spec.base.version for n, c in host.hv.clones.items() if n != alice) == [2, 2]


def test_status_says_unknown_not_booting_for_a_ready_desktop_whose_agent_answers_late(
    host: LoadedHost,
) -> None:
    """A `status` process has seen no agent events, so it asks each guest agent; on a loaded
    host the reply can come after the driver stopped waiting. That desktop is running and
    ready: status must not show it as booting."""
    host.settle(host.keeper())
    late = sorted(host.serving())[0]
    host.hv.late_agents.add(late)

    pool = host.status()

    shown = {c.name: c for c in pool.clones}
    assert shown[late].state == "unknown"
    assert shown[late].power == "running" and shown[late].balancer == "ready"
    assert {c.state for n, c in shown.items() if n != late} == {"free"}
    assert (pool.free, pool.unknown, pool.total) == (1, 1, 2)


def test_the_keeper_never_resets_drains_or_counts_free_a_desktop_whose_agent_answers_late(
    host: LoadedHost,
) -> None:
    """A keeper that restarted has no agent events either. A desktop whose readiness read
    times out for longer than the boot timeout is not failed, reset, deleted or taken out of
    the balancer; it is not counted free, so the pool makes another within `max`."""
    keeper = host.keeper()
    host.settle(keeper)
    late = sorted(host.serving())[0]
    host.hv.late_agents.add(late)
    before = len(host.hv.calls)

    for _ in range(30):  # 150 s, the boot timeout is 60 s
        keeper.run_pass()
        host.hv.tick()
        host.clock.advance(5.0)

    touched = {op for op, name in host.hv.calls[before:] if name == late}
    assert touched <= {"sessions", "display"}, touched
    assert late in host.serving()  # still in the balancer, nobody's
    assert len(host.serving() - {late}) >= LAB.free  # the pool never relied on it
    assert len(host.hv.clones) == 3  # one more than before, within max (4)
    assert host.store.load_pool("lab").failures == 0

    host.hv.late_agents.clear()  # the agent answers again: free like the others
    keeper.run_pass()
    assert {c.name: c.state for c in host.status().clones}[late] == "free"


def test_a_drain_rollout_never_runs_dry_when_guest_agents_answer_late(host: LoadedHost) -> None:
    """Item 15's scenario with a third of the guest agents answering late in every pass, for
    the keeper and for `status`: a serving desktop shows free or unknown, never booting."""
    rng = random.Random(3)
    keeper = host.keeper()
    host.settle(keeper)
    alice = host.hold_a_session()
    host.settle(keeper)
    host.images.versions["tiny"].add(2)
    host.hv.add_base(FakeVersion("tiny", 2).base_image())
    host.control.start([LAB], [], Request(image="tiny"), by="admin")
    for _ in range(40):
        host.hv.late_agents = {n for n in host.hv.clones if rng.random() < 0.3}
        keeper.run_pass()
        host.hv.tick()
        host.clock.advance(1.0)
        serving = host.serving()
        assert len(serving) >= 2, serving
        host.hv.late_agents = {n for n in host.hv.clones if rng.random() < 0.3}
        for c in host.status().clones:
            if c.name in serving:
                assert c.state in ("free", "unknown"), c
    host.hv.late_agents = set()
    for _ in range(10):  # the surplus made while agents were late goes once idle (shrink_after)
        keeper.run_pass()
        host.hv.tick()
        host.clock.advance(LAB.shrink_after / 4)
    assert host.hv.clones[alice].session.active
    assert sorted(c.spec.base.version for n, c in host.hv.clones.items() if n != alice) == [2, 2]


def disconnected_user(host: LoadedHost, keeper: Keeper) -> str:
    """A desktop whose user is logged in and whose remote-desktop client went away."""
    host.settle(keeper)
    name = host.hold_a_session()
    host.settle(keeper)
    host.hv.disconnect(name)
    host.settle(keeper)
    assert {c.name: c.state for c in host.status().clones}[name] == "disconnected"
    return name


def test_status_says_unknown_not_recycling_for_a_logged_in_user_whose_agent_answers_late(
    host: LoadedHost,
) -> None:
    """Who is logged in also comes from the guest agent: a late reply is not "nobody"."""
    name = disconnected_user(host, host.keeper())
    host.hv.late_agents.add(name)

    pool = host.status()

    assert {c.name: c.state for c in pool.clones}[name] == "unknown"
    assert pool.unknown == 1


def test_the_keeper_never_resets_under_a_logged_in_user_whose_agent_answers_late(
    host: LoadedHost,
) -> None:
    keeper = host.keeper()
    name = disconnected_user(host, keeper)
    host.hv.late_agents.add(name)
    before = len(host.hv.calls)

    for _ in range(30):  # 150 s, recycle_after is 60 s
        keeper.run_pass()
        host.hv.tick()
        host.clock.advance(5.0)

    touched = {op for op, n in host.hv.calls[before:] if n == name}
    assert touched <= {"sessions", "display"}, touched
    assert len(host.serving()) >= LAB.free  # the rest of the pool is planned meanwhile
    host.hv.late_agents.clear()
    keeper.run_pass()
    assert {c.name: c.state for c in host.status().clones}[name] == "disconnected"
    assert host.hv.clones[name].session.users == ("alice",)
