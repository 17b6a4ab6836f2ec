"""`imagepipe rollout`: the command as an administrator and a CI job use it, through main()
with fakes injected (the keeper runs its passes while the command waits)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.app import main
from imagepipe.config import load_pool_file
from imagepipe.pool.keeper import Keeper
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages, FakeVersion

POOL_FILE = """\
name: lab
image: tiny
channel: stable
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5909}
failures: {max: 2, backoff: 1s}
boot_timeout: 30s
"""


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setenv("COLUMNS", "200")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class KeeperClock(FakeClock):
    """While the command waits (sleep), the keeper runs a pass and the guests boot."""

    keeper: Keeper | None = None
    hv: FakeHypervisor | None = None
    interrupt_after: int | None = None  # Ctrl-C after this many sleeps
    sleeps: int = field(default=0)

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.sleeps += 1
        if self.interrupt_after is not None and self.sleeps > self.interrupt_after:
            raise KeyboardInterrupt
        assert self.keeper is not None and self.hv is not None
        self.keeper.run_pass()
        self.hv.tick()


@dataclass
class Host:
    root: Path
    clock: KeeperClock
    hv: FakeHypervisor
    images: FakeImages
    store: SQLiteStore

    def cli(self, *args: str) -> int:
        adapters = Adapters(
            hypervisor=self.hv, balancer=self.lb, images=self.images, clock=self.clock
        )
        return main(["--config", str(self.root / "imagepipe.yml"), "rollout", *args], adapters)

    lb: FakeBalancer = field(default_factory=FakeBalancer)

    def build(self, version: int, *, broken: bool = False) -> None:
        self.images.versions["tiny"].add(version)
        self.hv.add_base(FakeVersion("tiny", version).base_image())
        if broken:
            self.hv.never_ready.add(("tiny", version))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL_FILE)
    (tmp_path / "imagepipe.yml").write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\n")
    clock = KeeperClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1, channel="stable"))
    store = SQLiteStore(tmp_path / "state.db")
    h = Host(tmp_path, clock, hv, images, store)
    spec = load_pool_file(tmp_path / "pools" / "lab.yml")
    keeper = Keeper(
        hypervisor=hv,
        balancer=h.lb,
        store=store,
        images=images,
        specs=[spec],
        clock=clock,
        channels=images,
    )
    clock.keeper, clock.hv = keeper, hv
    for _ in range(4):
        keeper.run_pass()
        hv.tick()
    yield h
    store.close()


def test_rollout_wait_json_follows_to_done_and_exits_0(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2)

    code = host.cli("tiny", "--drain", "--wait", "--json")

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert lines[0]["state"] == "pending" and lines[0]["to_version"] == 2
    assert lines[-1]["state"] == "done"
    assert lines[-1]["progress"][0]["new_ready"] == 2
    assert lines[-1]["progress"][0]["old_removed"] == 2
    assert all(line["schema"] == "imagepipe.rollout/1" for line in lines)
    assert host.images.channels[("tiny", "stable")] == 2


def test_a_broken_version_rolls_back_and_wait_exits_4(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2, broken=True)

    code = host.cli("tiny", "--wait")

    out = capsys.readouterr().out
    assert code == 4
    assert "rolled back" in out
    assert "v2's desktops failed in pool lab" in out
    assert host.images.channels[("tiny", "stable")] == 1


def test_ctrl_c_stops_following_and_the_rollout_goes_on(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2)
    host.clock.interrupt_after = 1

    code = host.cli("tiny", "--wait")

    assert code == 130
    assert "rollout #1 goes on" in capsys.readouterr().out
    assert host.store.rollouts("tiny")[0].active


def test_status_pause_resume_and_history(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.build(2)
    assert host.cli("tiny", "--canary", "1") == 0
    assert host.cli("pause", "tiny") == 0
    assert host.cli("status", "tiny") == 0
    out = capsys.readouterr().out
    assert "rollout #1 tiny@stable v1 → v2  paused" in out
    assert "`imagepipe rollout resume tiny` goes on" in out

    assert host.cli("resume", "tiny", "--wait") == 0
    assert host.cli("status", "--all", "--json") == 0
    (doc,) = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert doc["state"] == "done" and doc["canary"] == 1


def test_dry_run_prints_the_plan_and_changes_nothing(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2)

    code = host.cli("tiny", "--deadline", "1h", "--dry-run")

    out = capsys.readouterr().out
    assert code == 0
    assert "lab: v1 → v2: 2 new desktop(s) made first; 2 old free replaced" in out
    assert "dry run: nothing was changed" in out
    assert host.images.channels[("tiny", "stable")] == 1
    assert host.store.rollouts() == []


def test_without_a_running_keeper_rollout_exits_3(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2)
    host.clock.advance(3600)
    beat = host.store.heartbeat()
    assert beat is not None
    from dataclasses import replace

    host.store.beat(replace(beat, host="another-host"))

    code = host.cli("tiny")

    assert code == 3
    assert "no keeper is running" in capsys.readouterr().err
    assert host.images.channels[("tiny", "stable")] == 1


def test_bad_options_are_refused_before_anything_changes(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.build(2)
    assert host.cli("tiny", "--drain", "--deadline", "1h") == 2
    assert host.cli("tiny", "--bake", "10m") == 2
    assert host.cli("tiny", "--deadline", "soon") == 2
    assert host.cli("pause", "tiny") == 2  # nothing in progress
    err = capsys.readouterr().err
    assert "--drain waits for every logoff" in err
    assert "--bake goes with --canary N" in err
    assert "--deadline: expected a duration" in err
    assert "no rollout of tiny is in progress" in err
    assert host.store.rollouts() == []


def test_wait_shows_rolling_back_while_the_channel_cannot_move_and_exits_4_once_it_moved(
    host: Host, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagepipe.errors import OperationFailedError

    host.build(2, broken=True)
    move = host.images.move_channel
    refused: list[str] = []

    def refusing(image: str, channel: str, version: int, by: str) -> None:
        if version == 1 and len(refused) < 2:
            refused.append(by)
            raise OperationFailedError("the registry is locked by another writer")
        move(image, channel, version, by)

    monkeypatch.setattr(host.images, "move_channel", refusing)

    code = host.cli("tiny", "--wait", "--json")

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    states = [line["state"] for line in lines]
    assert "rolling_back" in states
    back = states.index("rolling_back")
    assert "the registry is locked by another writer" in lines[back]["reason"]
    assert states[-1] == "rolled_back" and "rolled_back" not in states[:back]
    assert len(refused) == 2
    assert host.images.channels[("tiny", "stable")] == 1
    assert code == 4


def test_status_says_rolling_back_while_the_channel_has_not_moved(
    host: Host, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagepipe.errors import OperationFailedError

    host.build(2, broken=True)

    def refusing(image: str, channel: str, version: int, by: str) -> None:
        raise OperationFailedError("the registry is locked by another writer")

    assert host.cli("tiny") == 0
    monkeypatch.setattr(host.images, "move_channel", refusing)
    for _ in range(200):
        host.clock.sleep(1.0)  # keeper passes
    capsys.readouterr()

    assert host.cli("status", "tiny") == 0

    out = capsys.readouterr().out
    assert "rolling back" in out and "rolled back" not in out
    assert "could not be moved back to v1" in out
    assert host.images.channels[("tiny", "stable")] == 2
