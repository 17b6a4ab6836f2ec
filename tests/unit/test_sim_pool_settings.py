"""`imagepipe simulate` answers for the pool in the file: its start mode, learning and
schedule come from the pool file, and options only override them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepipe.cli.app import main

POOL = "name: lab\nimage: win10\nsize: {initial: 2, free: 2, max: 50}\n"
STORM = ["--profile", "morning-storm", "--users", "30"]


def simulate_json(pool: Path, capsys: pytest.CaptureFixture[str], *options: str) -> list[dict]:
    assert main(["simulate", str(pool), *STORM, *options, "--json"]) == 0
    results: list[dict] = json.loads(capsys.readouterr().out)["results"]
    return results


def pool_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "lab.yml"
    path.write_text(POOL + extra)
    return path


def test_simulate_restores_desktops_when_the_pool_file_does_not_say_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = pool_file(tmp_path, "learn: {enabled: false}\n")
    (plain,) = simulate_json(pool, capsys)
    (restored,) = simulate_json(pool, capsys, "--start", "restore")
    (booted,) = simulate_json(pool, capsys, "--start", "boot")
    assert plain == restored  # the keeper restores this pool's desktops: so does simulate
    assert plain["wait_seconds"] != booted["wait_seconds"]


def test_simulate_boots_desktops_of_a_pool_file_that_says_start_boot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = pool_file(tmp_path, "start: boot\nlearn: {enabled: false}\n")
    assert simulate_json(pool, capsys) == simulate_json(pool, capsys, "--start", "boot")


def test_simulate_takes_the_schedule_from_the_pool_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = pool_file(tmp_path, "learn: {enabled: false}\n")
    (fixed,) = simulate_json(plain, capsys, "--start", "boot")
    morning = "schedule: [{days: mon-fri, from: '07:00', to: '12:00', free: 15}]\n"
    scheduled = pool_file(tmp_path, "learn: {enabled: false}\n" + morning)
    (warm,) = simulate_json(scheduled, capsys, "--start", "boot")
    assert warm["instant_share"] == 1.0 > fixed["instant_share"]
