"""Where learning gets its history: the keeper records logins in the store, and a learning
pool's keeper plans with what the days before taught."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.app import main
from imagepipe.config import load_pool_file
from imagepipe.errors import ConfigError
from imagepipe.pool.model import CloneState, LearnSpec
from imagepipe.pool.planner.forecast import BUCKET, HISTORY_DAYS, day_and_bucket
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages
from tests.unit.test_keeper import LAB, World, settle, use


def test_a_login_is_written_to_the_pools_login_history(tmp_path: Path) -> None:
    world = World(store_path=tmp_path / "state.db")
    keeper = world.keeper()
    settle(keeper)
    use(world, "alice")
    use(world, "bob")
    settle(keeper)

    day, bucket = day_and_bucket(world.clock.now(), "UTC")
    history = world.store.login_history("lab", seconds=BUCKET, since_day=day - 1)
    assert history.days == {day: {bucket: 2}}
    settle(keeper)  # a user who stays is not counted again
    assert world.store.login_history("lab", seconds=BUCKET, since_day=0).days[day][bucket] == 2
    world.store.close()


def test_a_learning_pool_has_desktops_ready_for_the_rush_it_saw_yesterday(
    tmp_path: Path,
) -> None:
    world = World(store_path=tmp_path / "state.db")
    world.spec = replace(LAB, max=10, port_last=5909, learn=LearnSpec(lead=600.0))
    day, bucket = day_and_bucket(world.clock.now(), "UTC")
    world.store.record_logins("lab", day - 1, bucket + 1, 6, seconds=BUCKET, keep_days=HISTORY_DAYS)
    settle(world.keeper(), passes=12)

    free = [s for s in world.states().values() if s is CloneState.FREE]
    assert len(free) == 9  # 6 expected within the lead, + sqrt(6), rounded up
    world.store.close()


def test_the_same_pool_without_learning_keeps_its_free_size(tmp_path: Path) -> None:
    world = World(store_path=tmp_path / "state.db")
    world.spec = replace(LAB, max=10, port_last=5909)
    day, bucket = day_and_bucket(world.clock.now(), "UTC")
    world.store.record_logins("lab", day - 1, bucket + 1, 6, seconds=BUCKET, keep_days=HISTORY_DAYS)
    settle(world.keeper(), passes=12)
    assert sorted(world.states().values()) == [CloneState.FREE, CloneState.FREE]
    world.store.close()


def test_login_history_adds_up_and_forgets_days_older_than_it_keeps(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    store.record_logins("lab", 100, 7, 2, seconds=BUCKET, keep_days=28)
    store.record_logins("lab", 100, 7, 3, seconds=BUCKET, keep_days=28)
    store.record_logins("other", 100, 7, 1, seconds=BUCKET, keep_days=28)
    assert store.login_history("lab", seconds=BUCKET, since_day=0).days == {100: {7: 5}}
    store.record_logins("lab", 140, 1, 1, seconds=BUCKET, keep_days=28)
    assert store.login_history("lab", seconds=BUCKET, since_day=0).days == {140: {1: 1}}
    assert store.login_history("other", seconds=BUCKET, since_day=0).days == {100: {7: 1}}
    store.close()
    again = SQLiteStore(tmp_path / "state.db")  # it survives a restart
    assert again.login_history("lab", seconds=BUCKET, since_day=0).days == {140: {1: 1}}
    again.close()


def test_the_pool_file_turns_learning_on_and_tunes_it(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text(
        "name: lab\nimage: win10\nsize: {free: 2, max: 9}\n"
        "learn: {enabled: true, lead: 15m, shrink_after: 2m, min_free: 1}\n"
    )
    assert load_pool_file(path).learn == LearnSpec(lead=900.0, shrink_after=120.0, min_free=1)
    path.write_text("name: lab\nimage: win10\nlearn: {lead: 15m}\n")
    assert load_pool_file(path).learn == LearnSpec(lead=900.0)  # tuned: on by default


def test_a_pool_file_learns_unless_it_says_enabled_false(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text("name: lab\nimage: win10\nsize: {free: 2, max: 9}\n")
    assert load_pool_file(path).learn == LearnSpec()  # a plain pool file sizes itself
    path.write_text("name: lab\nimage: win10\nsize: {free: 2, max: 9}\nlearn: {enabled: false}\n")
    assert load_pool_file(path).learn is None  # an administrator who must not grow says so


def test_min_free_above_free_is_rejected_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text(
        "name: lab\nimage: win10\nsize: {free: 2}\nlearn: {enabled: true, min_free: 3}\n"
    )
    with pytest.raises(ConfigError, match=r"lab.yml:4.*learn.min_free.*size.free 2"):
        load_pool_file(path)


def test_a_lead_longer_than_a_day_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text("name: lab\nimage: win10\nlearn: {enabled: true, lead: 2d}\n")
    with pytest.raises(ConfigError, match=r"learn.lead"):
        load_pool_file(path)


def test_status_shows_the_learned_free_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(
        "name: lab\nimage: tiny\nsize: {initial: 0, free: 2, max: 10}\n"
        "display: {port_range: 5900-5909}\nlearn: {enabled: true}\n"
    )
    settings = tmp_path / "imagepipe.yml"
    settings.write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\n")
    clock = FakeClock()
    day, bucket = day_and_bucket(clock.now(), "UTC")
    store = SQLiteStore(tmp_path / "state.db")
    store.record_logins("lab", day - 1, bucket + 1, 6, seconds=BUCKET, keep_days=HISTORY_DAYS)
    store.close()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    adapters = Adapters(hypervisor=hv, balancer=FakeBalancer(), images=images, clock=clock)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = main(["--config", str(settings), "status", "--json"], adapters)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == 0
    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    assert pool["target_free"] == 9  # 6 expected within the lead, + sqrt(6), rounded up
