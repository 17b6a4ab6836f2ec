"""SIGHUP reload of `hosts:` in a running keeper (app/reload.py, app/hosts.apply_hosts):
a host added takes desktops, capacity and labels change, a host whose desktops have users
is not removed (one log line, the old list kept), a host without users is removed and its
desktops deleted there, a bad settings file is refused naming file, line and key."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.notify import SystemdNotifier
from imagepipe.app.reload import Reloader, load_keeper_config
from imagepipe.app.service import KeeperService
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import CloneState
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHosts, FakeImages
from tests.unit.test_keeper import settle

POOL = "name: lab\nimage: tiny\nsize: {initial: 6, free: 6, max: 8}\n"


def host_line(i: int, extra: str = "") -> str:
    return f"  - {{name: h{i}, uri: 'qemu+tcp://10.9.0.{i}/system', address: 10.9.0.{i}{extra}}}\n"


def settings_text(*hosts: str) -> str:
    return "pools_dir: pools\nstate_db: state.db\nrun_dir: run\nhosts:\n" + "".join(hosts)


@dataclass
class World:
    config: Path
    hv: FakeHosts
    lb: FakeBalancer
    store: SQLiteStore
    keeper: Keeper
    service: KeeperService

    def reload(self, *hosts: str) -> None:
        self.config.write_text(settings_text(*hosts))
        self.service.request_reload(self.keeper)
        self.service.before_pass(self.keeper)

    def spread(self) -> Counter[str]:
        return Counter(c.spec.host for c in self.hv.clones.values())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL)
    config = tmp_path / "imagepipe.yml"
    config.write_text(settings_text(host_line(1), host_line(2), host_line(3)))
    loaded = load_keeper_config(config, [])
    clock = FakeClock()
    images = FakeImages()
    hv = FakeHosts(clock=clock.now)
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    store = SQLiteStore(tmp_path / "state.db")
    service = KeeperService(SystemdNotifier(None), reloader=Reloader(config, [], loaded))
    keeper = Keeper(
        hypervisor=hv,
        balancer=lb,
        store=store,
        images=images,
        specs=list(loaded.specs),
        clock=clock,
        settings=KeeperOptions(tick=5.0),
        hosts=loaded.settings.host_specs(),
    )
    keeper.hooks = service
    settle(keeper)
    yield World(config, hv, lb, store, keeper, service)
    store.close()


def test_a_host_added_on_reload_takes_new_desktops_and_a_capacity_change_applies(
    world: World,
) -> None:
    assert world.spread() == {"h1": 2, "h2": 2, "h3": 2}
    world.reload(
        host_line(1, ", capacity: {desktops: 2}, labels: [gpu]"),
        host_line(2),
        host_line(3),
        host_line(4),
    )
    assert [h.name for h in world.keeper.host_specs] == ["h1", "h2", "h3", "h4"]
    assert world.keeper.host_specs[0].max_desktops == 2
    assert world.keeper.host_specs[0].labels == ("gpu",)
    assert world.hv.host_names == ("h1", "h2", "h3", "h4")

    for name in ("lab-0", "lab-1"):  # two users: the pool makes two more desktops
        world.lb.connect(name)
        world.hv.connect(name, "192.0.2.7")
    settle(world.keeper)

    spread = world.spread()
    assert spread["h4"] >= 1 and spread["h1"] <= 2, spread


def test_a_host_whose_desktops_have_users_is_not_removed_and_the_old_list_stays(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    busy = world.hv.on_host("h2")[0]
    world.lb.connect(busy)
    world.hv.connect(busy, "192.0.2.7")
    world.hv.login(busy, "alice")
    settle(world.keeper)
    assert world.store.load_pool("lab").clones[busy].state is CloneState.IN_USE

    with caplog.at_level(logging.INFO):
        world.reload(host_line(1), host_line(3))

    refused = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    error = str(refused[0].__dict__["imagepipe_fields"]["error"])
    assert "host h2 is no longer under hosts:, but 1 desktop(s) on it have users" in error
    assert "imagepipe hosts drain h2 --wait" in error
    assert [h.name for h in world.keeper.host_specs] == ["h1", "h2", "h3"]
    assert world.hv.host_names == ("h1", "h2", "h3")
    assert busy in world.hv.clones and len(world.hv.on_host("h2")) == 2


def test_a_host_without_users_is_removed_and_its_desktops_are_deleted_there(
    world: World,
) -> None:
    on_h3 = world.hv.on_host("h3")
    assert len(on_h3) == 2
    world.reload(host_line(1), host_line(2))

    assert [h.name for h in world.keeper.host_specs] == ["h1", "h2"]
    assert world.hv.host_names == ("h1", "h2")
    assert world.hv.on_host("h3") == []
    settle(world.keeper)
    assert world.spread() == {"h1": 3, "h2": 3}  # the pool refilled on the hosts it has
    assert not set(on_h3) & {b.name for b in world.lb.list_backends()} - set(world.hv.clones)


def test_a_bad_hosts_list_on_reload_names_file_line_and_key_and_keeps_the_old_hosts(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        world.reload(host_line(1), host_line(2), host_line(3), host_line(1))

    refused = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 1
    error = str(refused[0].__dict__["imagepipe_fields"]["error"])
    assert "imagepipe.yml:8: hosts[3].name" in error and "already defined" in error, error
    assert [h.name for h in world.keeper.host_specs] == ["h1", "h2", "h3"]
    assert world.hv.host_names == ("h1", "h2", "h3")


def test_a_refused_reload_logs_every_problem_of_the_file_not_only_the_first(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in two hosts makes four problems (a key missing and an unknown one, twice):
    the log line names them all, not the first with "(and 3 more below)" and nothing below."""
    typo = [host_line(n).replace("address:", "adress:") for n in (1, 2)]
    with caplog.at_level(logging.INFO):
        world.reload(*typo)

    (refused,) = [r for r in caplog.records if "reload refused" in r.getMessage()]
    error = str(refused.__dict__["imagepipe_fields"]["error"])
    assert "more below" not in error, error
    assert error.count("unknown key; did you mean 'address'?") == 2, error
    assert error.count("address: required key is missing") == 2, error
    assert world.hv.host_names == ("h1", "h2", "h3")
