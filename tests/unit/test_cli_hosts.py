"""`imagepipe hosts`, `hosts drain HOST [--wait]`, `hosts undrain HOST` over FakeHosts with
a real store, a real keeper and the real CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.app import main
from imagepipe.config import load_pool_file, load_settings
from imagepipe.pool.keeper import Keeper
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHosts, FakeImages

SETTINGS = """\
pools_dir: pools
state_db: state.db
run_dir: run
hosts:
  - {name: h1, uri: 'qemu+tcp://10.9.0.1/system', address: 10.9.0.1, capacity: {desktops: 4}}
  - {name: h2, uri: 'qemu+tcp://10.9.0.2/system', address: 10.9.0.2, capacity: {memory: 8G}}
  - {name: h3, uri: 'qemu+tcp://10.9.0.3/system', address: 10.9.0.3}
"""
POOL = "name: lab\nimage: tiny\nsize: {initial: 3, free: 3, max: 4}\n"


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, FakeHosts, Adapters]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL)
    settings = tmp_path / "imagepipe.yml"
    settings.write_text(SETTINGS)
    clock = FakeClock()
    hv = FakeHosts(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    store = SQLiteStore(tmp_path / "state.db")
    keeper = Keeper(
        hypervisor=hv,
        balancer=FakeBalancer(),
        store=store,
        images=images,
        specs=[load_pool_file(tmp_path / "pools" / "lab.yml")],
        clock=clock,
        hosts=load_settings(settings).host_specs(),
    )
    for _ in range(4):
        keeper.run_pass()
    store.close()
    return settings, hv, Adapters(hypervisor=hv, images=images, clock=clock)


def test_hosts_lists_state_desktops_versions_and_capacity(
    world: tuple[Path, FakeHosts, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, hv, adapters = world
    hv.cut("h3")
    assert main(["--config", str(settings), "hosts", "--json"], adapters) == 0
    doc = {h["name"]: h for h in json.loads(capsys.readouterr().out)}
    assert [doc[h]["state"] for h in ("h1", "h2", "h3")] == ["up", "up", "lost"]
    assert [doc[h]["free"] for h in ("h1", "h2", "h3")] == [1, 1, 1]
    assert doc["h1"]["versions"] == ["tiny v1"]
    assert (doc["h1"]["max_desktops"], doc["h2"]["max_memory"]) == (4, 8 * 1024**3)

    assert main(["--config", str(settings), "hosts"], adapters) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["HOST", "STATE"]
    assert lines[1].split()[:3] == ["h1", "up", "1"] and "4 desktops" in lines[1]
    assert lines[3].split()[:3] == ["h3", "lost", "since"]


def test_drain_and_undrain_are_stored_for_the_keeper(
    world: tuple[Path, FakeHosts, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = world
    assert main(["--config", str(settings), "hosts", "drain", "h2"], adapters) == 0
    assert "h2 is draining" in capsys.readouterr().out
    assert main(["--config", str(settings), "hosts", "drain", "h2"], adapters) == 0
    assert "already" in capsys.readouterr().out
    store = SQLiteStore(settings.parent / "state.db")
    assert list(store.draining_hosts()) == ["h2"]
    store.close()
    assert main(["--config", str(settings), "hosts", "--json"], adapters) == 0
    doc = {h["name"]: h for h in json.loads(capsys.readouterr().out)}
    assert doc["h2"]["state"] == "draining"
    assert main(["--config", str(settings), "hosts", "undrain", "h2"], adapters) == 0
    assert "takes new desktops again" in capsys.readouterr().out


def test_an_unknown_host_is_refused_naming_the_configured_ones(
    world: tuple[Path, FakeHosts, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = world
    assert main(["--config", str(settings), "hosts", "drain", "h9"], adapters) == 2
    err = capsys.readouterr().err
    assert "no host named h9" in err and "h1, h2, h3" in err
    store = SQLiteStore(settings.parent / "state.db")
    assert store.draining_hosts() == {}
    store.close()


def test_hosts_without_a_host_list_says_there_is_one_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "imagepipe.yml"
    (tmp_path / "pools").mkdir()
    settings.write_text("pools_dir: pools\nstate_db: state.db\n")
    assert main(["--config", str(settings), "hosts"]) == 2
    assert "no hosts configured; this keeper drives the one host" in capsys.readouterr().err


def test_status_shows_each_desktops_host_and_a_lost_hosts_desktops_as_unseen(
    world: tuple[Path, FakeHosts, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, hv, adapters = world
    keeper_world = settings.parent
    store = SQLiteStore(keeper_world / "state.db")
    keeper = Keeper(
        hypervisor=hv,
        balancer=FakeBalancer(),
        store=store,
        images=adapters.images,  # type: ignore[arg-type]
        specs=[load_pool_file(keeper_world / "pools" / "lab.yml")],
        clock=adapters.clock,  # type: ignore[arg-type]
        hosts=load_settings(settings).host_specs(),
    )
    hv.cut("h3")
    keeper.run_pass()
    store.close()
    assert main(["--config", str(settings), "status", "--json"], adapters) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(h["name"], h["connected"]) for h in doc["hosts"]] == [
        ("h1", True),
        ("h2", True),
        ("h3", False),
    ]
    assert doc["hosts"][2]["since"] is not None
    (pool,) = doc["pools"]
    hosts = {c["name"]: (c["host"], c["state"]) for c in pool["clones"]}
    lost = [name for name, (host, _) in hosts.items() if host == "h3"]
    assert lost and all(hosts[name][1] == "unseen" for name in lost)
    assert {host for host, _ in hosts.values()} >= {"h1", "h2"}
    assert main(["--config", str(settings), "status"], adapters) == 0
    out = capsys.readouterr().out
    assert "hosts:" in out and "h3: 1 desktops, 0 free, 0 in use, 1 unseen; host lost since" in out
