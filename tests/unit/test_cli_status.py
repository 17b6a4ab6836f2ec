"""`imagepipe status`: the JSON document scripts rely on, and the table people read."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from imagepipe import schema
from imagepipe.app.bootstrap import Adapters
from imagepipe.app.status import SCHEMA, HostStatus, PoolStatus
from imagepipe.balancers.group import BalancerGroup
from imagepipe.cli.app import main
from imagepipe.cli.status import render
from imagepipe.config import load_pool_file
from imagepipe.pool.keeper import Keeper
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

POOL_FILE = """\
name: lab
image: tiny
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
"""

POOL_KEYS = {
    "name", "image", "version", "target_free", "free", "in_use", "total", "max",
    "failures", "breaker_open_until", "note", "clones", "going_down", "unknown",
}  # fmt: skip
CLONE_KEYS = {
    "name", "slot", "version", "state", "power", "display", "balancer", "connections",
    "client", "users", "since", "failures", "started_by", "host",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() points the root logger at the (captured, then closed) stderr; undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setenv("COLUMNS", "160")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, FakeHypervisor, Adapters]:
    """A settings file, a pool, and a host where the keeper made the pool ready and one
    user is on lab-0."""
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL_FILE)
    settings = tmp_path / "imagepipe.yml"
    settings.write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\n")
    clock = FakeClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    spec = load_pool_file(tmp_path / "pools" / "lab.yml")
    store = SQLiteStore(tmp_path / "state.db")
    keeper = Keeper(
        hypervisor=hv, balancer=lb, store=store, images=images, specs=[spec], clock=clock
    )
    for _ in range(4):
        keeper.run_pass()
    lb.connect("lab-0")
    hv.connect("lab-0", "192.0.2.10")
    hv.login("lab-0", "alice")
    for _ in range(4):
        keeper.run_pass()
    store.close()
    return settings, hv, Adapters(hypervisor=hv, balancer=lb.reopen(), images=images, clock=clock)


def test_status_json_describes_every_pool_and_desktop_with_a_stable_schema(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = host

    code = main(["--config", str(settings), "status", "--json"], adapters)

    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {
        "schema",
        "generated_at",
        "pools",
        "stray_clones",
        "balancer_error",
        "balancer_instances",
        "leader",
        "hosts",
        "host_breakers",
    }
    assert doc["leader"] is None  # one keeper on SQLite: no lease was ever taken
    assert doc["hosts"] == [] and doc["host_breakers"] == {}  # one host: no host list
    assert doc["schema"] == "imagepipe.status/1"
    assert doc["balancer_instances"] == [], "one balancer: no instances to list"
    (pool,) = doc["pools"]
    assert set(pool) == POOL_KEYS
    assert (pool["name"], pool["image"], pool["version"]) == ("lab", "tiny", 1)
    assert (pool["free"], pool["in_use"], pool["total"], pool["target_free"]) == (2, 1, 3, 2)
    clones = {c["name"]: c for c in pool["clones"]}
    assert all(set(c) == CLONE_KEYS for c in clones.values())
    alice = clones["lab-0"]
    assert alice["state"] == "in_use"
    assert alice["client"] == "192.0.2.10" and alice["users"] == ["alice"]
    assert alice["balancer"] == "drain" and alice["connections"] == 1
    assert alice["display"] == "127.0.0.1:5900" and alice["power"] == "running"
    assert clones["lab-1"]["state"] == "free" and clones["lab-1"]["balancer"] == "ready"


def test_status_reports_clones_of_pools_that_are_not_configured(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, hv, adapters = host
    (settings.parent / "pools" / "lab.yml").unlink()
    (settings.parent / "pools" / "other.yml").write_text(
        POOL_FILE.replace("lab", "other").replace("5900-5903", "6000-6003")
    )

    assert main(["--config", str(settings), "status", "--json"], adapters) == 0

    doc = json.loads(capsys.readouterr().out)
    assert sorted(s["name"] for s in doc["stray_clones"]) == sorted(hv.clones)
    assert doc["pools"][0]["clones"] == []


def test_status_table_shows_sizes_and_who_is_on_which_desktop(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = host

    assert main(["--config", str(settings), "status", "lab"], adapters) == 0

    out = capsys.readouterr().out
    assert "free 2/2" in out and "in use 1" in out and "total 3/4" in out
    assert "alice@192.0.2.10" in out
    assert "lab-1" in out and "ready" in out


def test_status_of_an_unknown_pool_is_a_clear_error(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = host

    assert main(["--config", str(settings), "status", "nope"], adapters) == 2
    assert "no pool named nope" in capsys.readouterr().err


def test_status_header_of_an_empty_pool_stays_on_one_line() -> None:
    """A pool with no desktops yet has a narrow table; its header must not wrap to it."""
    empty = PoolStatus(
        name="classroom",
        image="win10",
        version=None,
        target_free=3,
        free=0,
        in_use=0,
        total=0,
        max=30,
        failures=0,
        breaker_open_until=None,
        note="image 'win10' has no registered versions",
        clones=(),
    )
    snapshot = HostStatus(SCHEMA, 0.0, (empty,), (), None)
    console = Console(width=80, record=True)
    console.print(render(snapshot))
    lines = console.export_text().splitlines()
    header = "classroom  (win10 no version)  free 0/3  in use 0  total 0/30"
    assert header in [line.rstrip() for line in lines]


def test_status_reports_desktops_the_host_no_longer_has_as_missing_not_free(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    """Domains deleted by hand (or a host rebuilt): the store still remembers them, but the
    hypervisor is the truth for what exists. None of them may be counted as free."""
    settings, hv, adapters = host
    for name in list(hv.clones):
        hv.remove_behind_our_back(name)

    assert main(["--config", str(settings), "status", "--json"], adapters) == 0

    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    assert (pool["free"], pool["in_use"], pool["total"]) == (0, 0, 0)
    assert {c["name"]: c["state"] for c in pool["clones"]} == {
        "lab-0": "missing",
        "lab-1": "missing",
        "lab-2": "missing",
    }
    assert all(c["power"] is None and c["balancer"] is None for c in pool["clones"])


def test_status_table_counts_add_up_when_desktops_are_missing(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, hv, adapters = host
    hv.remove_behind_our_back("lab-1")

    assert main(["--config", str(settings), "status", "--json"], adapters) == 0

    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    existing = [c for c in pool["clones"] if c["state"] != "missing"]
    assert pool["total"] == len(existing) == 2
    assert pool["free"] + pool["in_use"] <= pool["total"]
    assert [c["name"] for c in pool["clones"] if c["state"] == "missing"] == ["lab-1"]


def test_status_shows_an_old_version_desktop_in_use_as_retiring_during_a_rollout(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    """A new version on the pool's channel starts a rollout: alice's v1 desktop takes no new
    user and goes when she logs off. Status must say so, exactly as the keeper acts on it."""
    settings, hv, adapters = host
    assert adapters.images is not None
    hv.add_base(adapters.images.publish("tiny", 2))  # type: ignore[attr-defined]

    assert main(["--config", str(settings), "status", "--json"], adapters) == 0

    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    assert pool["version"] == 2
    alice = next(c for c in pool["clones"] if c["name"] == "lab-0")
    assert (alice["version"], alice["state"], alice["users"]) == (1, "retiring", ["alice"])


def test_status_shows_each_instance_of_a_balancer_pair_and_which_does_not_answer(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _, adapters = host
    assert adapters.balancer is not None
    second = FakeBalancer()
    second.state.reachable = False
    pair = BalancerGroup([("lb1", adapters.balancer), ("lb2", second)])
    with_pair = schema.replace(adapters, balancer=pair)

    code = main(["--config", str(settings), "status", "--json"], with_pair)

    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["balancer_error"] is None, "one instance answering is enough to keep serving"
    lb1, lb2 = doc["balancer_instances"]
    assert lb1 == {"name": "lb1", "reachable": True, "error": None, "backends": 3}
    assert lb2["name"] == "lb2" and lb2["reachable"] is False and "does not answer" in lb2["error"]
    assert main(["--config", str(settings), "status"], with_pair) == 0
    table = capsys.readouterr().out
    assert "balancer lb1: up, 3 backend(s)" in table
    assert "balancer lb2: unreachable: the balancer does not answer" in table
