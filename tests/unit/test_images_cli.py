"""`imagepipe images …` through the real entry point: output, --json, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imagepipe.cli import app as app_module
from imagepipe.images.registry import NewVersion, Registry

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    config = tmp_path / "imagepipe.yml"
    config.write_text(
        f"registry: {tmp_path / 'registry'}\nimage_store: {tmp_path / 'images'}\n"
        f"pools_dir: {tmp_path / 'pools'}\nstate_db: {tmp_path / 'state.db'}\n"
    )

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = app_module.main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _seed(tmp_path: Path, count: int) -> Registry:
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    for n in range(count):
        build = tmp_path / f"build{n}"
        build.mkdir()
        (build / "disk.qcow2").write_text(f"disk {n}")
        registry.register(
            NewVersion(
                image="tiny",
                fingerprint=f"fp{n}",
                builder="qemu",
                packer_version="1.6.6",
                files=(build / "disk.qcow2",),
                disk="disk.qcow2",
            )
        )
    return registry


def test_list_and_show_describe_versions(cli: Cli, tmp_path: Path) -> None:
    _seed(tmp_path, 2)
    code, out, _ = cli("images", "list", "--json")
    assert code == 0
    docs = json.loads(out)
    assert [(d["version"], d["channels"]) for d in docs] == [(1, []), (2, ["latest"])]
    code, out, _ = cli("images", "show", "tiny@v1")
    assert code == 0
    assert "version         1" in out
    assert "artifact        disk.qcow2" in out


def test_promote_then_rollback_a_channel(cli: Cli, tmp_path: Path) -> None:
    _seed(tmp_path, 2)
    assert cli("images", "promote", "tiny", "1", "--channel", "stable")[1] == "tiny stable -> v1\n"
    assert cli("images", "promote", "tiny", "v2", "--channel", "stable")[0] == 0
    code, out, _ = cli("images", "rollback", "tiny", "--channel", "stable", "--json")
    assert code == 0
    assert json.loads(out) == {"image": "tiny", "channel": "stable", "version": 1}
    code, out, _ = cli("images", "show", "tiny@stable", "--json")
    assert json.loads(out)["version"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["images", "show", "nope"], "unknown image 'nope'"),
        (["images", "show", "tiny@7"], "tiny has no version 7"),
        (["images", "promote", "tiny", "1", "--channel", "stable"], "revoked"),
        (["images", "revoke", "tiny", "9", "--reason", "x"], "no version 9"),
        (["build", "nope"], "unknown image 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    cli: Cli, tmp_path: Path, argv: list[str], message: str
) -> None:
    registry = _seed(tmp_path, 1)
    registry.revoke("tiny", 1, "broken")
    before = registry.channels("tiny"), registry.versions("tiny")
    (tmp_path / "packer").mkdir()
    code, _, err = cli(*argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert (registry.channels("tiny"), registry.versions("tiny")) == before


def test_a_registry_that_is_not_git_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "x").write_text("x")
    code, _, err = cli("images", "list")
    assert code == 2
    assert "is not a git repository" in err


def test_prune_never_removes_what_a_channel_points_at(cli: Cli, tmp_path: Path) -> None:
    registry = _seed(tmp_path, 4)
    registry.promote("tiny", 1, "stable")
    code, out, _ = cli("images", "prune", "--keep", "1", "--json")
    assert code == 0
    assert {d["version"]: d["removed"] for d in json.loads(out)} == {
        1: False,
        2: True,
        3: True,
        4: False,
    }
    assert (tmp_path / "images" / "tiny" / "v1").exists()
    assert not (tmp_path / "images" / "tiny" / "v2").exists()


def test_prune_never_removes_a_version_a_pool_asks_for(cli: Cli, tmp_path: Path) -> None:
    _seed(tmp_path, 4)
    pools = tmp_path / "pools"
    pools.mkdir()
    (pools / "lab.yml").write_text("name: lab\nimage: tiny\nversion: 2\n")
    code, out, err = cli("images", "prune", "--keep", "1")
    assert code == 0, err
    assert out.splitlines() == [
        "removed tiny v1 (prunable)",
        "kept tiny v2 (pool lab)",
        "removed tiny v3 (prunable)",
        "kept tiny v4 (one of the 1 newest)",
    ]
