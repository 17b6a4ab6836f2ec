"""Rollouts end to end on the keeper: a FakeHypervisor and FakeBalancer, the real store,
planner and rollout package (imagepipe/pool/rollout/) through the use cases (app/rollout.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.app import rollout as use_case
from imagepipe.app.bootstrap import Adapters, Runtime
from imagepipe.app.status import load_records
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, EnvironmentMissingError, OperationFailedError
from imagepipe.pool.actions import RecordClone
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import BackendState, CloneState, LearnSpec, PoolSpec, Power
from imagepipe.pool.planner import free_target
from imagepipe.pool.planner.forecast import BUCKET, day_and_bucket
from imagepipe.pool.rollout.control import PoolPlan, Request, RolloutControl, Started
from imagepipe.pool.rollout.records import Rollout, RolloutState
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages, FakeVersion

LAB = PoolSpec(
    name="lab",
    image="tiny",
    channel="stable",
    initial=2,
    free=2,
    max=4,
    port_first=5900,
    port_last=5909,
    recycle_after=60.0,
    boot_timeout=60.0,
    max_failures=3,
    retry_backoff=10.0,
)


@dataclass
class World:
    root: Path
    clock: FakeClock = field(default_factory=FakeClock)
    images: FakeImages = field(default_factory=FakeImages)
    lb: FakeBalancer = field(default_factory=FakeBalancer)
    spec: PoolSpec = LAB
    hv: FakeHypervisor = field(init=False)
    store: SQLiteStore = field(init=False)
    settings: Settings = field(init=False)
    rollouts: RolloutControl = field(init=False)

    def __post_init__(self) -> None:
        self.hv = FakeHypervisor(clock=self.clock.now)
        self.hv.add_base(self.images.publish("tiny", 1, channel="stable"))
        self.store = SQLiteStore(self.root / "state.db")
        self.settings = Settings(state_db=self.root / "state.db", run_dir=self.root / "run")
        self.rollouts = RolloutControl(self.store, self.images, self.images, self.clock)

    def start(self, specs: list[PoolSpec], request: Request, *, by: str) -> Started:
        return use_case.start(self.rollouts, specs, request, by=by)

    def dry_run(self, specs: list[PoolSpec], request: Request) -> list[PoolPlan]:
        adapters = Adapters(hypervisor=self.hv, balancer=self.lb, images=self.images)
        with Runtime(self.settings, adapters, manage_balancer=False) as runtime:
            return use_case.dry_run(self.rollouts, runtime, specs, request)

    def keeper(self) -> Keeper:
        return Keeper(
            hypervisor=self.hv,
            balancer=self.lb,
            store=self.store,
            images=self.images,
            specs=[self.spec],
            clock=self.clock,
            settings=KeeperOptions(tick=5.0),
            channels=self.images,
        )

    def build(self, version: int, *, broken: bool = False) -> None:
        """A new version is registered; the pools' channel does not move by itself."""
        self.images.versions["tiny"].add(version)
        self.hv.add_base(FakeVersion("tiny", version).base_image())
        if broken:
            self.hv.never_ready.add(("tiny", version))

    def serving(self) -> list[str]:
        """Desktops a new user can get now: ready in the balancer, running, nobody on them."""
        return [
            b.name
            for b in self.lb.list_backends()
            if b.state is BackendState.READY
            and self.hv.clones[b.name].power is Power.RUNNING
            and not self.hv.clones[b.name].session.active
        ]

    def versions(self) -> dict[str, int]:
        return {n: c.spec.base.version for n, c in self.hv.clones.items()}

    def rollout(self) -> Rollout:
        return self.store.rollouts("tiny", limit=1)[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(root=tmp_path)
    yield w
    w.store.close()


def run(world: World, keeper: Keeper, passes: int, *, floor: int | None = None) -> None:
    """Keeper passes with time passing; with `floor`, after each pass at least that many
    desktops serve."""
    for _ in range(passes):
        keeper.run_pass()
        world.hv.tick()
        world.clock.advance(1.0)
        if floor is not None:
            assert len(world.serving()) >= floor, world.serving()


def settle(world: World, keeper: Keeper) -> None:
    for _ in range(20):
        report = keeper.run_pass()
        world.hv.tick()
        if not [a for a in report.actions if not isinstance(a, RecordClone)]:
            return
    raise AssertionError("no convergence")


def use(world: World, user: str = "alice") -> str:
    name = world.lb.route()
    assert name is not None
    world.hv.connect(name, "10.0.0.7")
    world.hv.login(name, user)
    return name


def test_drain_rollout_replaces_free_desktops_first_and_waits_for_the_user(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    alice = use(world)
    settle(world, keeper)
    assert len(world.serving()) == 2
    world.build(2)

    started = world.start([LAB], Request(image="tiny"), by="admin@host")

    assert started.rollout is not None
    assert world.images.channels[("tiny", "stable")] == 2
    assert world.images.moves[-1][3].startswith(f"rollout #{started.rollout.id} by admin@host")
    run(world, keeper, 12, floor=2)
    versions = world.versions()
    assert versions[alice] == 1  # her session is intact
    assert sorted(v for n, v in versions.items() if n != alice) == [2, 2]
    assert {b.name: b.state for b in world.lb.list_backends()}[alice] is BackendState.DRAIN
    r = world.rollout()
    assert r.state is RolloutState.IN_PROGRESS
    assert "waiting for 1 user(s) on v1 to log off" in (r.reason or "")
    (lab,) = r.progress
    assert (lab.new_ready, lab.old_in_use, lab.old_free) == (2, 1, 0)

    world.hv.disconnect(alice)
    world.hv.logout(alice, "alice")
    run(world, keeper, 4, floor=2)

    assert alice not in world.hv.clones
    assert world.rollout().state is RolloutState.DONE
    assert world.rollout().progress[0].old_removed == 3


def test_a_version_that_never_becomes_ready_is_rolled_back_and_free_desktops_stay(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2, broken=True)
    world.start([LAB], Request(image="tiny"), by="admin")

    run(world, keeper, 300, floor=2)

    r = world.rollout()
    assert r.state is RolloutState.ROLLED_BACK
    assert "v2's desktops failed in pool lab" in (r.reason or "")
    assert world.images.channels[("tiny", "stable")] == 1
    assert "rolled back" in world.images.moves[-1][3]
    assert set(world.versions().values()) == {1}  # the broken clones are gone
    assert world.store.load_pool("lab").breaker_open_until is None


def test_canary_makes_only_n_new_desktops_then_waits_for_resume(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny", canary=1), by="admin")

    run(world, keeper, 10, floor=2)

    assert sorted(world.versions().values()) == [1, 2]
    r = world.rollout()
    assert r.state is RolloutState.CANARY
    assert "rollout resume tiny" in (r.reason or "")

    world.rollouts.resume("tiny")
    run(world, keeper, 10, floor=2)

    assert sorted(world.versions().values()) == [2, 2]
    assert world.rollout().state is RolloutState.DONE


def test_canary_goes_on_by_itself_after_the_bake_time(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny", canary=1, bake=30.0), by="admin")

    run(world, keeper, 10, floor=2)
    assert world.rollout().state is RolloutState.CANARY
    assert "baking until" in (world.rollout().reason or "")
    run(world, keeper, 40, floor=2)

    assert world.rollout().state is RolloutState.DONE
    assert sorted(world.versions().values()) == [2, 2]


def test_pause_stops_the_rollout_where_it_is_and_resume_goes_on(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny"), by="admin")
    world.rollouts.pause("tiny")

    run(world, keeper, 10, floor=2)

    assert sorted(world.versions().values()) == [1, 1]
    assert world.rollout().state is RolloutState.PAUSED
    world.rollouts.resume("tiny")
    run(world, keeper, 10, floor=2)
    assert world.rollout().state is RolloutState.DONE


def test_cancel_returns_the_pool_to_the_old_version_by_a_rollout(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny", canary=1), by="admin")
    run(world, keeper, 10, floor=2)

    back = world.rollouts.cancel([LAB], "tiny", by="admin")
    run(world, keeper, 10, floor=2)

    history = world.store.rollouts("tiny")
    assert [r.state for r in history] == [RolloutState.DONE, RolloutState.CANCELLED]
    assert (back.from_version, back.to_version, back.undo_of) == (2, 1, history[1].id)
    assert world.images.channels[("tiny", "stable")] == 1
    assert sorted(world.versions().values()) == [1, 1]


def test_undo_of_a_finished_rollout_goes_back_blue_green(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny"), by="admin")
    run(world, keeper, 10, floor=2)
    assert world.rollout().state is RolloutState.DONE

    world.rollouts.undo([LAB], "tiny", by="admin")
    run(world, keeper, 10, floor=2)

    assert world.rollout().state is RolloutState.DONE
    assert world.rollout().to_version == 1
    assert sorted(world.versions().values()) == [1, 1]


def test_deadline_warns_inside_the_desktop_then_ends_the_session(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    alice = use(world)
    settle(world, keeper)
    world.build(2)
    request = Request(
        image="tiny", deadline=120.0, message="Maintenance tonight", warn_before=(60.0,)
    )
    world.start([LAB], request, by="admin")

    run(world, keeper, 50, floor=2)
    assert world.hv.notices == []
    run(world, keeper, 20, floor=2)
    ((clone, text),) = world.hv.notices
    assert clone == alice
    assert text.startswith("Maintenance tonight Your session ends at")
    assert alice in world.hv.clones
    run(world, keeper, 60, floor=2)

    assert alice not in world.hv.clones
    assert world.rollout().state is RolloutState.DONE


def test_a_restarted_keeper_goes_on_with_the_rollout(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    alice = use(world)
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny"), by="admin")
    run(world, keeper, 3)

    again = world.keeper()  # a new process: nothing but the store and the host
    run(world, again, 12, floor=2)

    assert world.versions()[alice] == 1
    assert world.hv.clones[alice].session.active
    world.hv.disconnect(alice)
    world.hv.logout(alice, "alice")
    run(world, again, 4)
    assert world.rollout().state is RolloutState.DONE


def test_without_a_keeper_rollout_says_so_and_changes_nothing(world: World) -> None:
    world.build(2)

    with pytest.raises(EnvironmentMissingError, match="no keeper has run"):
        world.start([LAB], Request(image="tiny"), by="admin")

    assert world.images.channels[("tiny", "stable")] == 1
    assert world.store.rollouts() == []


def test_a_keeper_that_stopped_long_ago_counts_as_not_running(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.clock.advance(3600)
    beat = world.store.heartbeat()
    assert beat is not None
    world.store.beat(replace(beat, pid=2**22 + 12345, host="elsewhere"))

    with pytest.raises(EnvironmentMissingError, match="no keeper is running: its last pass"):
        world.start([LAB], Request(image="tiny"), by="admin")


def test_a_keeper_that_stopped_cleanly_counts_as_not_running_at_once(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    runner = threading.Thread(target=keeper.run)
    runner.start()
    keeper.stop()
    runner.join(timeout=10)

    with pytest.raises(EnvironmentMissingError, match="no keeper is running: it stopped 0 s ago"):
        world.start([LAB], Request(image="tiny"), by="admin")


def test_a_second_rollout_of_the_same_pools_is_refused_while_one_runs(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.start([LAB], Request(image="tiny", canary=1), by="admin")
    world.build(3)

    with pytest.raises(BadInputError, match=r"rollout #1 of tiny .* is pending"):
        world.start([LAB], Request(image="tiny"), by="admin")


def test_pinned_pools_are_left_alone_and_other_pools_on_the_channel_must_be_named(
    world: World,
) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    pinned = replace(LAB, name="kiosk", channel=None, version=1)
    other = replace(LAB, name="hall")

    with pytest.raises(BadInputError, match="pool kiosk is pinned to v1"):
        world.start([LAB, pinned], Request(image="tiny", pools=("kiosk",)), by="a")
    with pytest.raises(BadInputError, match=r"hall also follow tiny@stable"):
        world.start([LAB, other], Request(image="tiny", pools=("lab",)), by="a")
    started = world.start([LAB, pinned], Request(image="tiny"), by="a")
    assert started.left_alone == ("kiosk",)
    assert started.rollout is not None and started.rollout.pools == ("lab",)


def test_nothing_to_roll_out_when_the_pools_run_the_version_already(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)

    started = world.start([LAB], Request(image="tiny"), by="a")

    assert started.rollout is None
    assert "already run v1" in started.message


def test_dry_run_says_what_would_happen_and_changes_nothing(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    use(world)
    settle(world, keeper)
    world.build(2)
    (plan,) = world.dry_run([LAB], Request(image="tiny", deadline=3600.0))

    assert (plan.from_versions, plan.to_version) == ((1,), 2)
    assert (plan.new_desktops, plan.replaced_at_once, plan.wait_for_logoff) == (2, 2, 1)
    assert plan.forced_end_at == world.clock.now() + 3600.0
    assert world.images.channels[("tiny", "stable")] == 1
    assert world.store.rollouts() == []
    assert sorted(world.versions().values()) == [1, 1, 1]
    assert [state for state in CloneState if state is CloneState.RETIRING]  # enum exists


def test_a_breaker_that_was_open_before_the_rollout_does_not_roll_it_back(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    record = world.store.load_pool("lab")
    world.store.save_pool(
        "lab",
        target_version=record.target_version,
        failures=3,
        breaker_open_until=world.clock.now() + 100.0,
    )
    world.build(2)
    world.start([LAB], Request(image="tiny"), by="admin")

    run(world, keeper, 3)

    assert world.rollout().state is RolloutState.IN_PROGRESS
    assert world.images.channels[("tiny", "stable")] == 2


def test_a_rollout_waits_while_the_new_base_runs_and_says_why(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    base = FakeVersion("tiny", 2).base_image()
    world.hv.add_base(base, powered_off=False)  # an update is writing it
    world.start([LAB], Request(image="tiny"), by="admin")

    run(world, keeper, 5, floor=2)

    r = world.rollout()
    assert r.state is RolloutState.WAITING_FOR_BASE
    assert r.reason == "base of tiny v2 is not ready to clone"
    assert r.progress[0].waiting == r.reason
    assert sorted(world.versions().values()) == [1, 1]
    world.hv.add_base(base)  # powered off
    run(world, keeper, 10, floor=2)
    assert world.rollout().state is RolloutState.DONE


def test_an_old_free_desktop_whose_agent_misses_a_pass_is_not_deleted(world: World) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2)
    world.hv.boot_ticks = 5  # the new desktops take a while
    world.start([LAB], Request(image="tiny"), by="admin")
    keeper.run_pass()
    old = [n for n, v in world.versions().items() if v == 1]
    world.hv.clones[old[0]].boot_ticks_left = 1  # its guest agent does not answer this pass

    keeper.run_pass()

    assert all(name in world.hv.clones for name in old)


def refuse_moves_back(world: World, monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """The registry refuses to move the channel back to v1 `times` times (a locked or
    unreachable registry); returns the list the refused attempts are counted in."""
    refused: list[int] = []
    move = world.images.move_channel

    def refusing(image: str, channel: str, version: int, by: str) -> None:
        if version == 1 and len(refused) < times:
            refused.append(version)
            raise OperationFailedError("the registry is locked by another writer")
        move(image, channel, version, by)

    monkeypatch.setattr(world.images, "move_channel", refusing)
    return refused


def run_until_left(world: World, keeper: Keeper, states: set[str], passes: int = 300) -> None:
    for _ in range(passes):
        if world.rollout().state.value not in states:
            return
        run(world, keeper, 1, floor=2)
    raise AssertionError(f"the rollout stayed {world.rollout().state}")


def test_a_rollback_whose_channel_move_fails_is_rolling_back_until_the_channel_moved(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = world.keeper()
    settle(world, keeper)
    world.build(2, broken=True)
    refused = refuse_moves_back(world, monkeypatch, times=3)
    world.start([LAB], Request(image="tiny"), by="admin")

    run_until_left(world, keeper, {"pending", "in_progress"})

    r = world.rollout()
    assert r.state.value == "rolling_back"  # not "rolled back": the channel is still on v2
    assert world.images.channels[("tiny", "stable")] == 2
    assert r.finished_at is None and r.active
    assert "could not be moved back to v1" in (r.reason or "")
    assert "the registry is locked by another writer" in (r.reason or "")
    run(world, keeper, 2, floor=2)  # every pass tries again
    assert len(refused) == 3
    assert world.rollout().state.value == "rolling_back"
    for verb in (world.rollouts.pause, world.rollouts.resume):
        with pytest.raises(BadInputError, match="is rolling back to v1"):
            verb("tiny")
    with pytest.raises(BadInputError, match="is rolling back to v1"):
        world.rollouts.cancel([LAB], "tiny", by="admin")

    run_until_left(world, keeper, {"rolling_back"}, passes=5)

    r = world.rollout()
    assert r.state is RolloutState.ROLLED_BACK
    assert world.images.channels[("tiny", "stable")] == 1
    assert "rolled back" in world.images.moves[-1][3]
    assert r.finished_at is not None
    run(world, keeper, 60, floor=2)
    assert set(world.versions().values()) == {1}


def test_without_a_registry_to_move_the_channel_a_rollback_never_claims_it_rolled_back(
    world: World,
) -> None:
    keeper = world.keeper()
    keeper.rollouts.channels = None  # a keeper started without the registry's channels
    settle(world, keeper)
    world.build(2, broken=True)
    world.start([LAB], Request(image="tiny"), by="admin")

    run(world, keeper, 300, floor=2)

    r = world.rollout()
    assert r.state.value == "rolling_back"
    assert "no registry" in (r.reason or "")
    assert world.images.channels[("tiny", "stable")] == 2


def test_a_learning_pool_rolls_out_to_the_keepers_own_free_target(world: World) -> None:
    """The keeper keeps the learned free target (logins expected soon); a rollout's dry run
    says that many new desktops are made first, and the rollout never goes below it."""
    world.spec = replace(LAB, learn=LearnSpec(lead=600.0))
    day, bucket = day_and_bucket(world.clock.now(), world.spec.timezone)
    for past in range(1, 8):  # a login every 5 minutes at this time of day, all last week
        for b in range(bucket - 2, bucket + 8):
            world.store.record_logins("lab", day - past, b, 1, seconds=BUCKET, keep_days=14)
    keeper = world.keeper()
    settle(world, keeper)
    records, _ = load_records(world.store, [world.spec], world.clock.now())
    keepers_target = free_target(world.spec, world.clock.now(), records["lab"].arrivals)
    assert keepers_target == 4 > world.spec.free  # what the history taught
    assert len(world.serving()) == 4
    world.build(2)

    (plan,) = world.dry_run([world.spec], Request(image="tiny"))
    assert plan.new_desktops == keepers_target

    world.start([world.spec], Request(image="tiny"), by="admin")
    run(world, keeper, 30, floor=keepers_target)
    assert sorted(world.versions().values()) == [2, 2, 2, 2]
    assert world.rollout().state is RolloutState.DONE
