"""`imagepipe keep --once` driven through the real CLI, on fake adapters."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.app import main
from imagepipe.errors import FatalHypervisorError
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeHypervisor, FakeImages

POOL_FILE = """\
name: lab
image: tiny
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
"""


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, FakeHypervisor, Adapters]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL_FILE)
    config = tmp_path / "imagepipe.yml"
    config.write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\n")
    hv = FakeHypervisor()
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()

    return config, hv, Adapters(hypervisor=hv, balancer=lb, images=images)


def test_keep_once_makes_the_clones_the_pool_needs_and_exits_0(
    host: tuple[Path, FakeHypervisor, Adapters],
) -> None:
    config, hv, adapters = host

    assert main(["--config", str(config), "keep", "--once"], adapters) == 0

    assert sorted(hv.clones) == ["lab-0", "lab-1"]


def test_keep_once_exits_4_and_names_the_failure_when_an_action_fails(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    config, hv, adapters = host
    hv.fail_next("create_clone", FatalHypervisorError("no space left on device"))

    assert main(["--config", str(config), "keep", "--once"], adapters) == 4

    err = capsys.readouterr().err
    assert "1 of 2 actions failed" in err and "no space left on device" in err


def test_keep_for_an_unknown_pool_is_refused_before_anything_runs(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    config, hv, adapters = host

    assert main(["--config", str(config), "keep", "--pool", "nope", "--once"], adapters) == 2

    assert "no pool named nope (configured pools: lab)" in capsys.readouterr().err
    assert hv.calls == []


def test_keep_once_exits_4_and_says_why_when_a_pool_image_was_never_built(
    host: tuple[Path, FakeHypervisor, Adapters], capsys: pytest.CaptureFixture[str]
) -> None:
    config, hv, adapters = host
    (config.parent / "pools" / "lab.yml").write_text(POOL_FILE.replace("tiny", "win10"))

    assert main(["--config", str(config), "keep", "--once"], adapters) == 4

    err = capsys.readouterr().err
    assert "pool lab cannot make desktops" in err and "win10" in err
    assert hv.clones == {}


def test_keep_once_succeeds_while_a_base_is_only_busy_being_updated(
    host: tuple[Path, FakeHypervisor, Adapters],
) -> None:
    config, hv, adapters = host
    assert main(["--config", str(config), "keep", "--once"], adapters) == 0
    hv.bases[("tiny", 1)] = False  # powered on for patching: no new clones from it now

    assert main(["--config", str(config), "keep", "--once"], adapters) == 0
