"""`imagepipe pools check`: a summary line per good pool; file:line: key and exit 2 otherwise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagepipe.cli import pools
from imagepipe.cli.context import CliContext
from imagepipe.errors import EXIT_BAD_INPUT, ConfigError, ImagepipeError

REPO = Path(__file__).resolve().parents[2]
CLI_MODULES = ("build", "demo", "images", "keep", "simulate", "status")
ALL_COMMANDS_EXIST = all(
    importlib.util.find_spec(f"imagepipe.cli.{name}") is not None for name in CLI_MODULES
)
needs_whole_cli = pytest.mark.skipif(
    not ALL_COMMANDS_EXIST, reason="the other imagepipe.cli modules are not all written yet"
)

BROKEN = "name: lab\nimage: tiny\nsessions:\n  recycle_after: 1 minute\n"
BROKEN_LINE = (
    "pools/lab.yml:4: sessions.recycle_after: expected a duration such as 90s, 1m, 2h, 1h30m "
    "or 1d, got '1 minute'"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pools").mkdir()
    return tmp_path


def run(*args: str, config: Path | None = None) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(pools.app, list(args), obj=CliContext(config=config))
    error = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, error


def test_check_prints_one_summary_line_per_pool() -> None:
    code, output, error = run("check", str(REPO / "pools"))
    assert (code, error) == (0, None)
    assert output.splitlines() == [
        "classroom  image win10@stable  linked  initial 5 free 3 max 30  ports 5100-5129  "
        "recycle 1m  schedule 2 rule(s) Europe/Berlin  assigned 2  standby suspend",
        "lab        image tiny@latest  linked  initial 2 free 2 max 4  ports 5900-5903  recycle 1m",
    ]


def test_check_json_is_a_stable_list_of_pools() -> None:
    code, output, _ = run("check", str(REPO / "pools" / "lab.yml"), "--json")
    assert code == 0
    [lab] = json.loads(output)
    assert lab["name"] == "lab" and lab["image"] == "tiny" and lab["channel"] == "latest"
    assert lab["size"] == {"initial": 2, "free": 2, "max": 4}
    assert lab["display"] == {"address": "127.0.0.1", "port_first": 5900, "port_last": 5909}
    assert lab["sessions"]["recycle_after"] == 60.0
    assert lab["machine"]["memory_human"] == "256M"
    assert list(lab) == sorted(lab)  # keys in a stable order
    again = run("check", str(REPO / "pools" / "lab.yml"), "--json")[1]
    assert again == output


def test_check_json_writes_schedules_in_the_pool_file_form() -> None:
    code, output, _ = run("check", str(REPO / "pools" / "classroom.yml"), "--json")
    assert code == 0
    [room] = json.loads(output)
    assert room["schedule"][0] == {
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "from": "07:00",
        "to": "12:00",
        "free": 10,
    }
    assert room["version"] is None and room["rollout"] == {"drain_deadline": 28800.0}


def test_check_without_paths_uses_the_settings_pools_dir(workdir: Path) -> None:
    (workdir / "conf").mkdir()
    (workdir / "conf" / "imagepipe.yml").write_text("pools_dir: ../mine\n")
    (workdir / "mine").mkdir()
    (workdir / "mine" / "x.yml").write_text("name: x\nimage: tiny\n")
    code, output, _ = run("check", config=workdir / "conf" / "imagepipe.yml")
    assert code == 0
    assert output.startswith("x  image tiny@latest  linked  initial 1 free 1 max 5")


def test_check_refuses_a_broken_pool_file_naming_file_line_and_key(workdir: Path) -> None:
    (workdir / "pools" / "lab.yml").write_text(BROKEN)
    _, output, error = run("check", "pools")
    assert isinstance(error, ConfigError)
    assert str(error) == BROKEN_LINE
    assert error.exit_code == EXIT_BAD_INPUT
    assert output == ""


def test_check_refuses_an_empty_pools_folder(workdir: Path) -> None:
    _, _, error = run("check", "pools")
    assert isinstance(error, ImagepipeError)
    assert str(error) == "pools: no pool files (*.yml) in this folder"
    assert error.exit_code == EXIT_BAD_INPUT


@needs_whole_cli
def test_the_imagepipe_command_exits_2_with_one_line_on_a_broken_pool_file(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagepipe.cli.app import main

    (workdir / "pools" / "lab.yml").write_text(BROKEN)
    assert main(["pools", "check", "pools"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err == f"imagepipe: error: {BROKEN_LINE}\n"
    assert captured.out == ""


@needs_whole_cli
def test_the_imagepipe_command_checks_the_example_pools(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from imagepipe.cli.app import main

    assert main(["pools", "check", str(REPO / "pools")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["classroom", "lab"]
