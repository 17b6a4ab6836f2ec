"""The keeper over several hosts (FakeHosts: stateful, honest, with a cut switch), a real
Store and the real planner: fill, a cut host with a user on it, its return, a drained host,
a host without the version (docs/hosts.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.hosts import rows
from imagepipe.app.status import SCHEMA, HostStatus
from imagepipe.cli.status import host_summary
from imagepipe.errors import HypervisorError
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import (
    BackendState,
    CloneInfo,
    CloneSpec,
    CloneState,
    HostSpec,
    PoolSpec,
)
from imagepipe.pool.planner.failures import breaker_open
from imagepipe.pool.rollout.driver import open_host_breakers
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore as Store
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHosts, FakeImages
from tests.unit.test_keeper import settle

SIX = PoolSpec(
    name="lab",
    image="tiny",
    initial=6,
    free=6,
    max=6,
    port_first=5900,
    port_last=5919,
    recycle_after=60.0,
)
HOSTS = tuple(
    HostSpec(f"h{i}", f"qemu+tcp://10.9.0.{i}/system", f"10.9.0.{i}", 4, None, ())
    for i in (1, 2, 3)
)


class Hosts:
    def __init__(self, tmp_path: Path, spec: PoolSpec = SIX) -> None:
        self.clock = FakeClock()
        self.images = FakeImages()
        self.lb = FakeBalancer()
        self.hv = FakeHosts(clock=self.clock.now)
        self.hv.add_base(self.images.publish("tiny", 1))
        self.store = Store(tmp_path / "state.db")
        self.spec = spec

    def keeper(self) -> Keeper:
        return Keeper(
            hypervisor=self.hv,
            balancer=self.lb,
            store=self.store,
            images=self.images,
            specs=[self.spec],
            clock=self.clock,
            settings=KeeperOptions(tick=5.0),
            hosts=HOSTS,
        )

    def spread(self) -> Counter[str]:
        return Counter(c.spec.host for c in self.hv.clones.values())

    def serving(self) -> set[str]:
        return {b.name for b in self.lb.list_backends() if b.state is BackendState.READY}

    def records(self) -> dict[str, CloneState]:
        return {n: r.state for n, r in self.store.load_pool("lab").clones.items()}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Hosts]:
    w = Hosts(tmp_path)
    yield w
    w.store.close()


def test_a_pool_of_six_spreads_two_two_two_over_three_hosts(world: Hosts) -> None:
    settle(world.keeper())
    assert world.spread() == {"h1": 2, "h2": 2, "h3": 2}
    assert len(world.serving()) == 6
    for clone in world.hv.clones.values():  # the balancer reaches each on its host
        assert clone.spec.display.host == "10.9.0." + clone.spec.host[-1]


def test_a_cut_host_keeps_its_desktops_and_the_pool_refills_elsewhere_then_reconciles(
    world: Hosts,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    on_h2 = world.hv.on_host("h2")
    busy, idle = on_h2
    world.lb.connect(busy)
    world.hv.connect(busy, "192.0.2.7")
    world.hv.login(busy, "alice")
    settle(keeper)
    world.clock.advance(5)

    world.hv.cut("h2")
    world.lb.connect(idle)  # reached through the balancer before the keeper noticed
    world.lb.disconnect(idle)
    report = settle(keeper)[-1]
    assert [h.name for h in report.hosts if not h.connected] == ["h2"]
    assert world.hv.on_host("h2") == on_h2  # nothing deleted on the host it cannot see
    assert world.hv.clones[busy].session.client == "192.0.2.7"  # the user is untouched
    backends = {b.name: b for b in world.lb.list_backends()}
    assert backends[busy].state is BackendState.DRAIN  # drained, not removed
    assert backends[idle].state is BackendState.DRAIN
    spread = world.spread()
    assert spread["h1"] + spread["h3"] == 6 and spread["h2"] == 2  # refilled up to max
    taken = {c.spec.slot for c in world.hv.clones.values()}
    assert len(taken) == 8  # no name, slot or port reused
    lost = world.store.load_pool("lab").clones
    assert lost[busy].lost_since is not None and lost[busy].state is CloneState.IN_USE

    world.hv.reconnect("h2")
    world.clock.advance(5)
    settle(keeper)
    records = world.records()
    assert records[busy] is CloneState.IN_USE  # tracked again, left alone
    assert world.hv.clones[busy].session.client == "192.0.2.7"
    assert world.store.load_pool("lab").clones[busy].lost_since is None
    # the free one was used while unseen (the counter rose) and was replaced meanwhile: it
    # is deleted, never handed to anyone as it is
    assert idle not in world.hv.clones and idle not in records
    assert idle not in {b.name for b in world.lb.list_backends()}
    assert len(world.serving()) == 6  # the free target; alice keeps hers besides


def test_a_free_desktop_back_from_a_cut_host_that_was_replaced_is_deleted(
    world: Hosts,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    world.hv.cut("h2")
    world.clock.advance(5)
    settle(keeper)
    assert len(world.hv.clones) == 8
    world.hv.reconnect("h2")
    world.clock.advance(5)
    settle(keeper)
    assert world.hv.on_host("h2") == []  # both were free and replaced on h1 and h3
    assert sorted(world.spread().values()) == [3, 3]
    assert len(world.serving()) == 6


def test_a_drained_host_gets_no_desktops_its_free_ones_move_and_the_user_stays(
    world: Hosts,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    busy = world.hv.on_host("h1")[0]
    world.lb.connect(busy)
    world.hv.connect(busy, "192.0.2.7")
    settle(keeper)
    world.store.set_host_draining("h1", world.clock.now())
    world.clock.advance(5)
    settle(keeper)
    assert world.hv.on_host("h1") == [busy]
    spread = world.spread()
    assert spread["h1"] == 1 and spread["h2"] + spread["h3"] == 5  # max 6 counts the user's
    world.hv.disconnect(busy)
    world.lb.disconnect(busy)
    settle(keeper)
    world.clock.advance(SIX.recycle_after)
    settle(keeper)
    assert world.hv.on_host("h1") == []  # logged off: deleted, not reset for the next user
    assert world.store.set_host_draining("h1", None)
    world.clock.advance(5)
    settle(keeper)
    assert world.spread() == {"h2": 3, "h3": 3}  # nothing moves back by itself


def test_a_host_without_the_version_gets_no_desktops_until_its_upload_is_done(
    world: Hosts,
) -> None:
    world.hv.no_upload.add("h3")
    settle(world.keeper())
    assert world.spread() == {"h1": 3, "h2": 3}
    assert world.hv.count("create_clone") == 6


def test_a_steady_pass_reads_only_the_sessions_of_desktops_with_a_client(world: Hosts) -> None:
    keeper = world.keeper()
    settle(keeper)
    busy = world.hv.on_host("h1")[0]
    world.lb.connect(busy)
    world.hv.connect(busy, "192.0.2.7")
    settle(keeper)
    world.hv.calls.clear()
    keeper.run_pass()
    asked = [name for op, name in world.hv.calls if op == "sessions"]
    assert asked == [busy]
    # a free desktop a client reached through the balancer since: its counter rose
    idle = world.hv.on_host("h2")[0]
    world.lb.connect(idle)
    world.hv.connect(idle, "192.0.2.8")
    world.hv.calls.clear()
    keeper.run_pass()
    assert sorted(name for op, name in world.hv.calls if op == "sessions") == sorted([busy, idle])
    assert world.store.load_pool("lab").clones[idle].state is CloneState.IN_USE


def test_a_host_where_every_create_fails_does_not_keep_the_pool_below_its_target(
    tmp_path: Path,
) -> None:
    world = Hosts(tmp_path, replace(SIX, max=8))
    create = world.hv.create_clone
    broken = {"h3"}
    tried: list[str] = []

    def create_unless_broken(spec: CloneSpec) -> CloneInfo:
        if spec.host in broken:  # its storage is broken: every create there fails
            tried.append(spec.name)
            raise HypervisorError(f"host {spec.host}: storage pool is broken")
        return create(spec)

    world.hv.create_clone = create_unless_broken  # type: ignore[method-assign]
    keeper = world.keeper()
    for _ in range(20):  # a few minutes of passes, the retries' backoff included
        keeper.run_pass()
        world.hv.tick()
        world.clock.advance(15.0)
    assert len(world.serving()) == 6  # the two healthy hosts took the whole pool
    assert set(world.spread()) == {"h1", "h2"}
    assert not breaker_open(world.store.load_pool("lab"), world.clock.now())
    assert tried  # h3 was tried, then left alone
    assert set(keeper.host_breakers(world.clock.now())) == {"h3"}
    # h3 is repaired; once its cool-down is over it takes the next new desktop again
    broken.clear()
    world.clock.advance(SIX.breaker_cooldown)
    name = world.lb.route()
    assert name is not None
    world.hv.connect(name, "10.0.0.7")
    world.hv.login(name, "alice")
    for _ in range(6):
        keeper.run_pass()
        world.hv.tick()
        world.clock.advance(5.0)
    assert world.spread()["h3"] == 1
    assert len(world.serving()) == 6
    world.store.close()


def test_hosts_and_status_show_a_hosts_open_breaker_until_when_from_the_keepers_heartbeat(
    tmp_path: Path,
) -> None:
    """The host breaker lives in the keeper's memory; `imagepipe hosts` and `status` (other
    processes) read it from the heartbeat the keeper's next pass writes, and stop showing it
    once its cool-down is over."""
    world = Hosts(tmp_path, replace(SIX, max=8))
    create = world.hv.create_clone

    def create_unless_h3(spec: CloneSpec) -> CloneInfo:
        if spec.host == "h3":
            raise HypervisorError("host h3: storage pool is broken")
        return create(spec)

    world.hv.create_clone = create_unless_h3  # type: ignore[method-assign]
    keeper = world.keeper()
    for _ in range(20):
        keeper.run_pass()
        world.hv.tick()
        world.clock.advance(15.0)
    until = keeper.host_breakers(world.clock.now())["h3"]
    reader = Store(tmp_path / "state.db")  # another process's reading of the same store
    now = world.clock.now()

    assert open_host_breakers(reader, now) == {"h3": until}
    by_name = {r.name: r for r in rows(HOSTS, {}, reader, [SIX], now)}
    assert by_name["h3"].state == "breaker" and by_name["h3"].breaker_open_until == until
    assert by_name["h1"].breaker_open_until is None
    summary = host_summary(HostStatus(SCHEMA, now, (), (), None, host_breakers={"h3": until}))
    assert summary is not None and "h3: 0 desktops" in summary
    assert "circuit breaker open (its creates failed): no new desktops there until" in summary

    world.clock.advance(SIX.breaker_cooldown)
    keeper.run_pass()
    assert open_host_breakers(reader, world.clock.now()) == {}
    world.store.beat(replace(world.store.heartbeat(), pid=0))  # type: ignore[type-var]
    assert open_host_breakers(reader, now) == {}  # a stopped keeper holds no breaker open
    reader.close()
    world.store.close()


def test_a_broken_image_still_opens_the_pools_breaker_across_hosts(world: Hosts) -> None:
    world.hv.fail_next("create_clone", HypervisorError("the image's disk is corrupt"), times=99)
    keeper = world.keeper()
    for _ in range(4):
        keeper.run_pass()
        world.clock.advance(15.0)
    assert breaker_open(world.store.load_pool("lab"), world.clock.now())
    assert not world.hv.clones
