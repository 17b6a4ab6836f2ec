"""Taking a pool down: the pure rule (pool/teardown.py), the keeper carrying it out over the
fakes and a real store, `imagepipe pools down/up`, `status` progress and `demo --down`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.cli import demo as demo_cli
from imagepipe.cli.app import main
from imagepipe.config import load_pool_file, load_settings
from imagepipe.config import settings as settings_module
from imagepipe.pool.actions import (
    BalancerDrain,
    BalancerRemove,
    DeleteClone,
    ForgetClone,
    RecordClone,
)
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    PoolDown,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.teardown import plan_down
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

T0 = 1_700_000_000.0
SPEC = PoolSpec(name="lab", image="tiny", initial=2, free=2, max=4)


def clone(
    slot: int,
    *,
    session: GuestSession = GuestSession(),
    backend: BackendState | None = BackendState.READY,
    connections: int = 0,
) -> ObservedClone:
    name = f"lab-{slot}"
    display = Endpoint("127.0.0.1", 5900 + slot)
    info = CloneInfo(name, "lab", slot, "tiny", 1, Power.RUNNING, display, True)
    be = None if backend is None else Backend(name, display, backend, connections)
    return ObservedClone(info=info, session=session, backend=be)


def record(slot: int, state: CloneState = CloneState.FREE) -> CloneRecord:
    return CloneRecord(name=f"lab-{slot}", slot=slot, version=1, state=state, since=T0 - 60)


def kinds(actions: list[object], clone_name: str) -> list[str]:
    return [type(a).__name__ for a in actions if getattr(a, "clone", None) == clone_name]


# ---- the rule ----------------------------------------------------------------------------


def test_a_free_desktop_leaves_the_balancer_and_is_deleted_at_once() -> None:
    observed = Observed(clones=(clone(0),), target_version=1, base_ready=True)
    rec = PoolRecord(pool="lab", clones={"lab-0": record(0)})

    actions = plan_down(SPEC, observed, rec, PoolDown(since=T0), T0)

    assert kinds(actions, "lab-0") == ["BalancerRemove", "DeleteClone", "RecordClone"]
    (memo,) = [a for a in actions if isinstance(a, RecordClone)]
    assert memo.record.state is CloneState.DELETING


def test_a_desktop_in_use_is_drained_and_kept_until_its_session_ends() -> None:
    busy = clone(0, session=GuestSession(client="192.0.2.1", users=("bob",)), connections=1)
    rec = PoolRecord(pool="lab", clones={"lab-0": record(0, CloneState.IN_USE)})

    first = plan_down(SPEC, Observed(clones=(busy,), target_version=1), rec, PoolDown(T0), T0)
    drained = clone(0, backend=BackendState.DRAIN, connections=0)
    retiring = PoolRecord(pool="lab", clones={"lab-0": record(0, CloneState.RETIRING)})
    ended = plan_down(SPEC, Observed(clones=(drained,)), retiring, PoolDown(T0), T0 + 60)

    assert kinds(first, "lab-0") == ["BalancerDrain", "RecordClone"]
    assert not any(isinstance(a, DeleteClone | BalancerRemove) for a in first)
    assert kinds(ended, "lab-0") == ["BalancerRemove", "DeleteClone", "RecordClone"]


def test_now_deletes_a_desktop_in_use_but_never_removes_an_entry_under_a_connection() -> None:
    busy = clone(0, session=GuestSession(client="192.0.2.1"), connections=1)
    rec = PoolRecord(pool="lab", clones={"lab-0": record(0, CloneState.IN_USE)})

    actions = plan_down(SPEC, Observed(clones=(busy,)), rec, PoolDown(T0, now=True), T0)

    assert kinds(actions, "lab-0") == ["BalancerDrain", "DeleteClone", "RecordClone"]


def test_gone_desktops_are_forgotten_and_orphan_entries_removed_or_drained() -> None:
    quiet = Backend("lab-7", Endpoint("127.0.0.1", 5907), BackendState.DRAIN, 0)
    busy = Backend("lab-8", Endpoint("127.0.0.1", 5908), BackendState.READY, 2)
    observed = Observed(orphan_backends=(quiet, busy))
    rec = PoolRecord(pool="lab", clones={"lab-3": record(3)})

    actions = plan_down(SPEC, observed, rec, PoolDown(T0), T0)

    assert actions == [
        ForgetClone(pool="lab", clone="lab-3"),
        BalancerRemove(pool="lab", clone="lab-7"),
        BalancerDrain(pool="lab", clone="lab-8"),
    ]


def test_a_pool_with_nothing_left_needs_nothing_and_makes_nothing() -> None:
    empty = Observed(target_version=1, base_ready=True)

    assert plan_down(SPEC, empty, PoolRecord("lab"), PoolDown(T0), T0) == []


# ---- the keeper, the CLI, status -------------------------------------------------------------

LAB = """\
name: lab
image: tiny
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
"""


@dataclass
class Host:
    config: Path
    hv: FakeHypervisor
    lb: FakeBalancer
    adapters: Adapters
    runtime: Runtime

    def passes(self, n: int = 3) -> None:
        keeper = self.runtime.keeper([load_pool_file(self.config.parent / "pools" / "lab.yml")])
        for _ in range(n):
            keeper.run_pass()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(LAB)
    config = tmp_path / "imagepipe.yml"
    config.write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\n")
    clock = FakeClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    adapters = Adapters(hypervisor=hv, balancer=lb, images=images, clock=clock)
    runtime = bootstrap(load_settings(config), adapters)
    yield Host(config, hv, lb, adapters, runtime)
    runtime.close()


def test_pools_down_removes_free_desktops_at_once_and_the_busy_one_after_its_logoff(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.passes()
    host.lb.connect("lab-0")
    host.hv.connect("lab-0", "192.0.2.7")
    host.passes()
    before = set(host.hv.clones)
    capsys.readouterr()

    assert main(["--config", str(host.config), "pools", "down", "lab"], host.adapters) == 0
    said = capsys.readouterr().out
    host.passes()
    after_down = set(host.hv.clones)
    entries = [(b.name, b.state) for b in host.lb.list_backends()]
    assert main(["--config", str(host.config), "status", "lab"], host.adapters) == 0
    shown = capsys.readouterr().out
    host.hv.disconnect("lab-0")
    host.lb.disconnect("lab-0")
    host.passes()
    assert main(["--config", str(host.config), "status", "lab"], host.adapters) == 0
    finally_shown = capsys.readouterr().out

    assert len(before) == 3  # lab-0 in use, two free
    assert "lab is going down: 2 desktop(s) removed now, 1 in use as their sessions end" in said
    assert after_down == {"lab-0"}
    assert entries == [("lab-0", BackendState.DRAIN)]
    assert "lab going down (as sessions end): 1 desktop(s) left, 1 waiting" in shown
    assert host.hv.clones == {} and host.lb.list_backends() == []
    assert "lab is down: no desktop and no balancer entry left" in finally_shown


def test_pools_down_now_asks_first_and_changes_nothing_when_refused(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.passes()
    host.hv.connect("lab-0", "192.0.2.7")
    host.hv.login("lab-0", "alice")
    host.passes()

    code = main(["--config", str(host.config), "pools", "down", "lab", "--now"], host.adapters)

    err = capsys.readouterr().err
    assert code == 2
    assert "--now removes 1 desktop(s) of lab in use (192.0.2.7, alice)" in err
    assert host.runtime.store.pool_down("lab") is None


def test_pools_down_now_with_yes_ends_sessions_and_pools_up_brings_the_pool_back(
    host: Host,
) -> None:
    host.passes()
    host.hv.connect("lab-0", "192.0.2.7")
    host.passes()
    argv = ["--config", str(host.config), "pools"]

    assert main([*argv, "down", "lab", "--now", "--yes"], host.adapters) == 0
    host.passes()
    gone = set(host.hv.clones)
    assert main([*argv, "up", "lab"], host.adapters) == 0
    host.passes()

    assert gone == set()
    assert len(host.hv.clones) == 2


def test_pools_down_of_an_unknown_pool_is_refused(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--config", str(host.config), "pools", "down", "nope"], host.adapters)

    assert code == 2
    assert "no pool named nope" in capsys.readouterr().err


# ---- the demo ------------------------------------------------------------------------------


def test_demo_down_removes_every_demo_desktop_and_balancer_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "demo"
    files = demo_cli.write_demo_files(directory, load_settings(None))
    hv = FakeHypervisor()
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    adapters = Adapters(hypervisor=hv, balancer=lb, images=images)
    runtime = bootstrap(load_settings(files.settings), adapters)
    keeper = runtime.keeper([load_pool_file(files.pool)])
    for _ in range(3):
        keeper.run_pass()
    hv.connect("demo-0", "192.0.2.7")
    runtime.close()
    assert len(hv.clones) == 3

    code = main(["demo", "--down", "--dir", str(directory)], adapters)

    assert code == 0, capsys.readouterr().err
    assert hv.clones == {} and lb.list_backends() == []
    assert "The demo is down" in capsys.readouterr().err


def test_demo_down_without_a_demo_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--down", "--dir", str(tmp_path)]) == 2
    assert f"no demo in {tmp_path}" in capsys.readouterr().err


def test_status_without_settings_after_the_demo_shows_the_demos_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # no settings anywhere: not in ./ (a temp dir), $IMAGEPIPE_CONFIG or the system file,
    # which this host may well have, so point its lookup at a temp path that does not exist
    monkeypatch.setattr(settings_module, "SYSTEM_SETTINGS", tmp_path / "etc" / "imagepipe.yml")
    directory = tmp_path / "demo"
    demo_cli.write_demo_files(directory, load_settings(None))
    monkeypatch.setattr(demo_cli, "DEFAULT_DIR", directory)  # where the demo put its files
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEPIPE_CONFIG", raising=False)
    hv = FakeHypervisor()
    images = FakeImages()
    adapters = Adapters(hypervisor=hv, balancer=FakeBalancer(), images=images)

    assert main(["status"], adapters) == 0

    out, err = capsys.readouterr()
    assert f"showing the demo's ({directory / 'imagepipe.yml'})" in err
    assert "demo  (tiny" in out


def test_the_store_remembers_a_take_down_and_a_second_request_can_only_hurry_it(
    tmp_path: Path,
) -> None:
    from imagepipe.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "state.db")
    store.mark_down("lab", PoolDown(since=T0, now=True))
    store.mark_down("lab", PoolDown(since=T0 + 5, now=False))
    store.close()
    store = SQLiteStore.open_readonly(tmp_path / "state.db")
    remembered = store.pool_down("lab"), store.pool_down("other")
    store.close()

    assert remembered == (PoolDown(since=T0, now=True), None)
