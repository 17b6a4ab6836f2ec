"""The keeper with a FakeHypervisor, a FakeBalancer, a real Store and the real planner."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.errors import BusyError, FatalHypervisorError
from imagepipe.pool.actions import (
    Action,
    BalancerRemove,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    ResetClone,
    StartClone,
)
from imagepipe.pool.executor import ExecutorSettings
from imagepipe.pool.keeper import Keeper, KeeperOptions, PassReport
from imagepipe.pool.model import (
    BackendState,
    CloneMode,
    CloneSpec,
    CloneState,
    Endpoint,
    PoolSpec,
    Power,
)
from imagepipe.pool.observe import observe
from imagepipe.pool.planner import plan
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

LAB = PoolSpec(
    name="lab",
    image="tiny",
    initial=2,
    free=2,
    max=4,
    port_first=5900,
    port_last=5903,
    recycle_after=60.0,
    max_failures=3,
    retry_backoff=10.0,
    breaker_cooldown=600.0,
)


@dataclass
class World:
    store_path: Path
    clock: FakeClock = field(default_factory=FakeClock)
    images: FakeImages = field(default_factory=FakeImages)
    lb: FakeBalancer = field(default_factory=FakeBalancer)
    spec: PoolSpec = LAB
    hv: FakeHypervisor = field(init=False)
    store: SQLiteStore = field(init=False)

    def __post_init__(self) -> None:
        self.hv = FakeHypervisor(clock=self.clock.now)
        self.hv.add_base(self.images.publish("tiny", 1))
        self.store = SQLiteStore(self.store_path)

    def keeper(self, other_pools: tuple[str, ...] = (), **executor: float) -> Keeper:
        return Keeper(
            hypervisor=self.hv,
            balancer=self.lb,
            store=self.store,
            images=self.images,
            specs=[self.spec],
            clock=self.clock,
            settings=KeeperOptions(tick=5.0, executor=ExecutorSettings(**executor)),  # type: ignore[arg-type]
            other_pools=other_pools,
        )

    def states(self) -> dict[str, CloneState]:
        return {n: r.state for n, r in self.store.load_pool("lab").clones.items()}

    def free_in_balancer(self) -> list[str]:
        return [
            b.name
            for b in self.lb.list_backends()
            if b.state is BackendState.READY and self.hv.clones[b.name].power is Power.RUNNING
        ]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(store_path=tmp_path / "state.db")
    yield w
    w.store.close()


def settle(keeper: Keeper, passes: int = 8) -> list[PassReport]:
    """Run passes until one has nothing to do (the pool has converged)."""
    reports = []
    for _ in range(passes):
        report = keeper.run_pass()
        reports.append(report)
        hypervisor_or_balancer = [a for a in report.actions if not isinstance(a, RecordClone)]
        if not hypervisor_or_balancer:
            return reports
    raise AssertionError(f"no convergence after {passes} passes: {reports[-1].actions}")


def use(world: World, user: str = "alice", client: str = "10.0.0.7") -> str:
    """A user arrives through the balancer and logs in on the desktop it picked."""
    name = world.lb.route()
    assert name is not None, "no free desktop in the balancer"
    world.hv.connect(name, client)
    world.hv.login(name, user)
    return name


def leave(world: World, name: str, user: str = "alice") -> None:
    world.hv.logout(name, user)
    world.hv.disconnect(name)
    world.lb.disconnect(name)


def test_an_empty_pool_fills_to_its_free_size_with_ready_clones_in_the_balancer(
    world: World,
) -> None:
    settle(world.keeper())

    assert sorted(world.hv.clones) == ["lab-0", "lab-1"]
    assert all(c.power is Power.RUNNING for c in world.hv.clones.values())
    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]
    assert world.states() == {"lab-0": CloneState.FREE, "lab-1": CloneState.FREE}
    assert [b.address for b in world.lb.list_backends()] == [
        Endpoint("127.0.0.1", 5900),
        Endpoint("127.0.0.1", 5901),
    ]


def test_a_clone_that_boots_slowly_joins_the_balancer_only_when_ready(world: World) -> None:
    world.hv.boot_ticks = 2
    keeper = world.keeper()
    for _ in range(4):
        keeper.run_pass()
    assert world.lb.list_backends() == []
    assert set(world.states().values()) == {CloneState.BOOTING}

    world.hv.tick()
    world.hv.tick()
    settle(keeper)
    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]


def test_a_connected_user_takes_a_desktop_out_of_the_balancer_and_the_pool_refills(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)

    taken = use(world)
    settle(keeper)

    backend = {b.name: b for b in world.lb.list_backends()}[taken]
    assert backend.state is BackendState.DRAIN
    assert world.states()[taken] is CloneState.IN_USE
    assert len(world.free_in_balancer()) == 2
    assert taken not in world.free_in_balancer()
    assert len(world.hv.clones) == 3


def test_after_logoff_the_desktop_is_reset_after_recycle_after_and_serves_again(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    taken = use(world)
    settle(keeper)
    assert world.hv.is_dirty(taken)

    leave(world, taken)
    settle(keeper)
    assert world.states()[taken] is CloneState.RECYCLING
    assert world.hv.count("reset") == 0
    assert taken not in world.free_in_balancer()

    world.clock.advance(LAB.recycle_after + 1)
    settle(keeper)

    assert world.hv.count("reset") == 1
    assert not world.hv.is_dirty(taken), "the next user must not see the previous session"
    assert world.states()[taken] is CloneState.FREE
    assert taken in world.free_in_balancer()


def test_a_desktop_powered_off_from_inside_is_recycled_like_a_logoff(world: World) -> None:
    keeper = world.keeper()
    settle(keeper)
    taken = use(world)
    settle(keeper)

    world.hv.power_off_inside(taken)
    world.lb.disconnect(taken)
    settle(keeper)
    assert world.states()[taken] is CloneState.RECYCLING
    assert world.hv.clones[taken].power is Power.SHUTOFF

    world.clock.advance(LAB.recycle_after + 1)
    settle(keeper)
    assert world.hv.clones[taken].power is Power.RUNNING
    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()


def test_a_keeper_crash_mid_pass_leaves_no_duplicates_and_keeps_the_desktop_in_use(
    world: World,
) -> None:
    first = world.keeper()
    settle(first)
    in_use = use(world)
    settle(first)
    # The first keeper dies while creating lab-3 (made, journal still open) and while
    # deleting lab-1 (journal open, clone still there): what kill -9 leaves behind.
    half = CreateClone(
        pool="lab", clone="lab-3", slot=3, version=1, display=Endpoint("127.0.0.1", 5903)
    )
    world.store.journal_begin(half, world.clock.now())
    world.hv.create_clone(
        CloneSpec(
            name="lab-3",
            pool="lab",
            slot=3,
            base=world.images.resolve("tiny", 1).base_image(),
            mode=CloneMode.LINKED,
            cpus=1,
            memory=LAB.memory,
            display=Endpoint("127.0.0.1", 5903),
        )
    )
    world.store.journal_begin(DeleteClone(pool="lab", clone="lab-1"), world.clock.now())
    del first

    second = world.keeper()
    settle(second)

    assert world.store.journal_open() == []
    assert ("delete", "lab-3") in world.hv.calls, "the half-made clone is removed"
    assert ("delete", "lab-1") in world.hv.calls, "the interrupted delete is repeated"
    assert world.hv.clones[in_use].session.client == "10.0.0.7"
    assert ("reset", in_use) not in world.hv.calls
    assert world.states()[in_use] is CloneState.IN_USE
    names = [b.name for b in world.lb.list_backends()]
    assert len(names) == len(set(names))
    assert set(names) <= set(world.hv.clones), "no balancer entry without a clone"
    assert set(world.states()) == set(world.hv.clones), "every clone known, none invented"
    assert len(world.free_in_balancer()) == 2


def test_a_lost_store_is_rebuilt_from_clone_metadata_without_touching_the_user(
    world: World, tmp_path: Path
) -> None:
    settle(world.keeper())
    in_use = use(world)
    settle(world.keeper())
    calls_before = len(world.hv.calls)
    world.store.close()
    world.store = SQLiteStore(tmp_path / "new-state.db")

    reports = settle(world.keeper())

    assert sorted(reports[0].adopted) == sorted(world.hv.clones)
    assert world.states()[in_use] is CloneState.IN_USE
    mutations = [
        c
        for c in world.hv.calls[calls_before:]
        if c[0] not in ("list_clones", "sessions", "base_ready")
    ]
    free = sorted(n for n in world.hv.clones if n != in_use)
    assert sorted(mutations) == [("reset", n) for n in free], (
        "adopting clones creates and deletes none and never touches the one in use; the "
        "others' history is unknown, so each is reset once before it serves"
    )
    assert len(world.free_in_balancer()) == 2


def test_a_busy_hypervisor_is_retried_with_backoff(world: World) -> None:
    world.hv.fail_next("create_clone", BusyError("storage pool locked"), times=2)

    report = world.keeper(busy_backoff=2.0).run_pass()

    assert report.execution.ok
    assert world.hv.count("create_clone") == 4
    assert sorted(world.hv.clones) == ["lab-0", "lab-1"]
    assert sorted(world.clock.slept) == [2.0, 2.0] or world.clock.slept == [2.0, 4.0]


def test_repeated_fatal_errors_open_the_circuit_breaker(world: World) -> None:
    world.hv.fail_next("create_clone", FatalHypervisorError("no space left on device"), 50)
    keeper = world.keeper()

    for _ in range(6):
        keeper.run_pass()
        world.clock.advance(LAB.retry_backoff * 8)
    record = world.store.load_pool("lab")
    assert record.failures >= LAB.max_failures
    assert record.breaker_open_until is not None
    assert record.breaker_open_until > world.clock.now()

    creates = world.hv.count("create_clone")
    keeper.run_pass()
    assert world.hv.count("create_clone") == creates, "an open breaker makes no new clones"

    world.hv._failures.clear()
    world.clock.advance(LAB.breaker_cooldown + 1)
    settle(keeper, passes=12)
    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]


def test_stop_ends_the_loop_cleanly_and_leaves_desktops_running(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = world.keeper()
    first_pass = threading.Event()
    real_pass = keeper.run_pass

    def run_pass() -> PassReport:
        report = real_pass()
        first_pass.set()
        return report

    monkeypatch.setattr(keeper, "run_pass", run_pass)
    runner = threading.Thread(target=keeper.run)
    runner.start()
    assert first_pass.wait(10), "the keeper never acted"

    keeper.stop()
    runner.join(10)

    assert not runner.is_alive()
    assert world.hv.count("stop") == 0 and world.hv.count("delete") == 0
    assert world.store.journal_open() == []
    assert world.lb.state.frontend_ensured >= 1


def test_a_hypervisor_event_wakes_the_keeper_before_the_tick(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = Keeper(
        hypervisor=world.hv,
        balancer=world.lb,
        store=world.store,
        images=world.images,
        specs=[LAB],
        clock=world.clock,
        settings=KeeperOptions(tick=3600.0),
    )
    settle(keeper)
    drained = threading.Event()
    real_drain = world.lb.drain

    def drain(name: str) -> None:
        real_drain(name)
        drained.set()

    monkeypatch.setattr(world.lb, "drain", drain)
    runner = threading.Thread(target=keeper.run)
    runner.start()
    try:
        taken = use(world)
        assert drained.wait(10), "the connect event did not trigger a pass"
        assert ("drain", taken) in world.lb.calls
    finally:
        keeper.stop()
        runner.join(10)


def test_clones_of_a_pool_no_longer_configured_are_reported_not_deleted(world: World) -> None:
    settle(world.keeper())
    world.spec = PoolSpec(name="other", image="tiny", port_first=6000, port_last=6003)

    report = world.keeper().run_pass()

    assert sorted(c.name for c in report.observation.stray_clones) == ["lab-0", "lab-1"]
    assert world.hv.count("delete") == 0


def test_a_restarted_balancer_gets_every_free_desktop_back(world: World) -> None:
    keeper = world.keeper()
    settle(keeper)

    world.lb.crash()
    settle(keeper)

    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]


def test_a_keeper_for_one_pool_leaves_the_other_configured_pools_alone(world: World) -> None:
    settle(world.keeper())
    world.spec = PoolSpec(name="other", image="tiny", port_first=6000, port_last=6003)
    keeper = world.keeper(other_pools=("lab",))

    report = keeper.run_pass()

    assert report.observation.stray_clones == ()
    assert world.hv.count("delete") == 0


def test_a_pass_that_changed_something_is_followed_at_once_not_after_a_tick(
    world: World,
) -> None:
    keeper = world.keeper()
    first = keeper.run_pass()  # creates the clones; starting them is the next pass's work
    assert any(isinstance(a, CreateClone) for a in first.actions)
    assert keeper.next_wait(first) < 1.0 < keeper.settings.tick


def test_the_keeper_sleeps_only_until_the_next_recycle_is_due(world: World) -> None:
    keeper = world.keeper()
    settle(keeper)
    name = use(world)
    settle(keeper)
    leave(world, name)
    settle(keeper)  # the session's end is recorded; the reset waits for recycle_after
    assert world.states()[name] is CloneState.RECYCLING
    world.clock.advance(LAB.recycle_after - 2.0)
    quiet = keeper.run_pass()
    assert quiet.execution.outcomes == ()
    wait = keeper.next_wait(quiet)
    assert 2.0 <= wait < 3.0 < keeper.settings.tick
    world.clock.advance(wait)
    assert any(isinstance(a, ResetClone) for a in keeper.run_pass().actions)


def test_a_converged_pool_waits_a_whole_tick(world: World) -> None:
    keeper = world.keeper()
    settle(keeper)
    assert keeper.next_wait(keeper.run_pass()) == keeper.settings.tick


def test_quick_passes_are_bounded_so_a_plan_that_never_settles_waits_a_tick(
    world: World,
) -> None:
    keeper = world.keeper()
    busy = keeper.run_pass()  # it changed the host
    waits = [keeper.next_wait(busy) for _ in range(12)]
    assert waits[:10] == [0.5] * 10
    assert waits[10] == keeper.settings.tick


def test_a_pool_that_cannot_make_desktops_is_reported_once_and_again_when_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(store_path=tmp_path / "state.db", spec=replace(LAB, image="win10"))
    keeper = world.keeper()
    caplog.set_level(logging.INFO, logger="imagepipe.pool.keeper")

    first, second = keeper.run_pass(), keeper.run_pass()

    assert "win10" in first.notes["lab"] and second.notes == first.notes
    warnings = [r for r in caplog.records if "cannot make desktops" in r.getMessage()]
    assert len(warnings) == 1, "the same reason is logged once, not every pass"
    world.hv.add_base(world.images.publish("win10", 1))
    assert keeper.run_pass().notes == {}
    assert any("can make desktops again" in r.getMessage() for r in caplog.records)
    world.store.close()


# ---- crashes: kill -9 at a chosen moment, then a new keeper on the same store and host ----


def crash_after(world: World, kind: type[Action]) -> list[Action]:
    """One pass of a keeper that is killed right after its first `kind` action: the records
    it wrote first and the host calls up to that one happened; nothing after. Returns the
    actions the killed keeper had planned."""
    specs = {world.spec.name: world.spec}
    host = observe(world.hv, world.lb, world.images, [world.spec])
    planned = plan(world.spec, host.pools["lab"], world.store.load_pool("lab"), world.clock.now())
    calls = [a for a in planned if not isinstance(a, RecordClone | ForgetClone | RecordPool)]
    cut = next(i for i, a in enumerate(calls) if isinstance(a, kind))
    done = [a for a in planned if isinstance(a, RecordClone | ForgetClone | RecordPool)]
    world.keeper().executor.run(specs, done + calls[: cut + 1])
    return planned


def crash_inside(world: World, kind: type[Action]) -> None:
    """One pass of a keeper killed inside its first `kind` call, before the hypervisor got
    the request: records written, earlier calls done, that call journaled, nothing more."""
    specs = {world.spec.name: world.spec}
    host = observe(world.hv, world.lb, world.images, [world.spec])
    planned = plan(world.spec, host.pools["lab"], world.store.load_pool("lab"), world.clock.now())
    calls = [a for a in planned if not isinstance(a, RecordClone | ForgetClone | RecordPool)]
    cut = next(i for i, a in enumerate(calls) if isinstance(a, kind))
    done = [a for a in planned if isinstance(a, RecordClone | ForgetClone | RecordPool)]
    world.keeper().executor.run(specs, done + calls[:cut])
    world.store.journal_begin(calls[cut], world.clock.now())


def restart(world: World) -> Keeper:
    """The store reopened from its file; the host (hypervisor, balancer) as the crash left it."""
    world.store.close()
    world.store = SQLiteStore(world.store_path)
    return world.keeper()


def no_dirty_desktop_serves(world: World) -> None:
    for name in world.free_in_balancer():
        assert not world.hv.is_dirty(name), f"{name} serves with a previous user's traces"


def test_a_keeper_killed_after_taking_a_logged_off_desktop_out_of_the_balancer_resets_it_before_anyone_gets_it(  # noqa: E501
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    taken = use(world)
    settle(keeper)
    leave(world, taken)
    settle(keeper)
    world.clock.advance(LAB.recycle_after + 1)

    planned = crash_after(world, BalancerRemove)

    assert ResetClone(pool="lab", clone=taken) in planned
    assert taken not in [b.name for b in world.lb.list_backends()]
    assert world.hv.count("reset") == 0 and world.hv.is_dirty(taken)

    second = restart(world)
    for _ in range(8):
        second.run_pass()
        no_dirty_desktop_serves(world)
    assert world.hv.count("reset") == 1
    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()
    assert world.states()[taken] is CloneState.FREE


def test_a_desktop_stays_marked_for_reset_across_any_number_of_crashes_until_a_reset_completes(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    taken = use(world)
    settle(keeper)
    leave(world, taken)
    settle(keeper)
    world.clock.advance(LAB.recycle_after + 1)
    crash_after(world, BalancerRemove)
    world.hv.fail_next("reset", FatalHypervisorError("disk full"))

    restart(world).run_pass()  # the reset fails
    restart(world).run_pass()  # a crash again, before the retry
    world.clock.advance(LAB.retry_backoff * 4)
    for _ in range(8):
        restart(world).run_pass()
        no_dirty_desktop_serves(world)

    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()


def test_a_desktop_of_unknown_history_is_reset_before_it_serves_and_one_in_use_is_left_alone(
    world: World, tmp_path: Path
) -> None:
    settle(world.keeper())
    in_use = use(world)
    settle(world.keeper())
    free = [n for n in world.hv.clones if n != in_use]
    for name in free:
        world.hv.clones[name].dirty = True  # nobody can tell what happened on them
    world.store.close()
    world.store = SQLiteStore(tmp_path / "lost-state.db")

    for _ in range(8):
        world.keeper().run_pass()
        no_dirty_desktop_serves(world)

    assert ("reset", in_use) not in world.hv.calls
    assert world.hv.clones[in_use].session.client == "10.0.0.7"
    assert all(("reset", name) in world.hv.calls for name in free)
    assert len(world.free_in_balancer()) == 2


def test_a_keeper_killed_inside_a_create_makes_the_desktop_again_without_waiting_boot_timeout(
    world: World,
) -> None:
    crash_inside(world, CreateClone)
    assert world.states() == {"lab-0": CloneState.CREATING, "lab-1": CloneState.CREATING}
    assert "lab-0" not in world.hv.clones

    settle(restart(world))  # the clock stands still: no timeout can help

    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]
    assert world.store.journal_open() == []


def test_a_keeper_killed_inside_a_start_starts_the_desktop_without_waiting_boot_timeout(
    world: World,
) -> None:
    world.keeper().run_pass()  # makes the clones
    crash_inside(world, StartClone)
    assert world.hv.clones["lab-0"].power is Power.SHUTOFF
    assert world.states()["lab-0"] is CloneState.BOOTING

    settle(restart(world))

    assert sorted(world.free_in_balancer()) == ["lab-0", "lab-1"]
    assert world.hv.count("reset") == 0, "a fresh clone needs a start, not a reset"


def test_a_keeper_killed_inside_a_reset_resets_the_desktop_before_it_serves(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    taken = use(world)
    settle(keeper)
    leave(world, taken)
    settle(keeper)
    world.clock.advance(LAB.recycle_after + 1)
    crash_inside(world, ResetClone)

    second = restart(world)
    for _ in range(8):
        second.run_pass()
        no_dirty_desktop_serves(world)

    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()


def test_a_user_who_came_and_went_between_two_passes_still_gets_the_desktop_reset(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(keeper)
    subscription = world.hv.subscribe(keeper.on_event)  # what run() subscribes
    taken = use(world)
    leave(world, taken)  # all before the next pass looks: only the connect event tells

    for _ in range(8):
        keeper.run_pass()
        no_dirty_desktop_serves(world)
        world.clock.advance(LAB.recycle_after)
    subscription.close()

    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()


def test_a_connect_event_outlives_a_pass_that_could_not_read_the_sessions(world: World) -> None:
    keeper = world.keeper()
    settle(keeper)
    subscription = world.hv.subscribe(keeper.on_event)  # what run() subscribes
    taken = use(world)
    world.hv.fail_next("sessions", BusyError("domain is locked"))
    report = keeper.run_pass()  # the pool cannot be observed: not planned
    leave(world, taken)

    for _ in range(8):
        keeper.run_pass()
        no_dirty_desktop_serves(world)
        world.clock.advance(LAB.recycle_after)
    subscription.close()

    assert "lab" in report.not_planned
    assert not world.hv.is_dirty(taken)
    assert taken in world.free_in_balancer()
