"""The simulator over several days: learning from past days, and restore vs boot latency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepipe.cli.app import main
from imagepipe.pool.model import LearnSpec, PoolSpec
from imagepipe.record import replace
from imagepipe.sim.compare import compare_runs
from imagepipe.sim.engine import SimSettings, simulate, simulate_day
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.trace import Login
from imagepipe.sim.world import Start

PLAIN = PoolSpec(name="lab", image="win10", initial=2, free=2, max=60, port_last=6100)
LEARNING = replace(PLAIN, learn=LearnSpec())


def storm_days(users: int, days: int) -> list[list[Login]]:
    return [make_profile("morning-storm", users, 1 + day) for day in range(days)]


def test_a_learning_pool_serves_the_storm_at_once_after_a_day_with_fewer_idle_hours() -> None:
    days = storm_days(40, 3)
    boot = SimSettings(start=Start.BOOT)  # desktops booted: restored ones hide a late pool
    learned = simulate(LEARNING, days, POLICIES["imagepipe"], boot)
    original = simulate(PLAIN, days, POLICIES["original"], boot)
    fixed = simulate(PLAIN, days, POLICIES["imagepipe"], boot)

    assert learned.days[0].instant_share == fixed.days[0].instant_share  # nothing learned yet
    assert learned.last_day.instant_share >= 0.995
    assert fixed.last_day.instant_share < 0.9
    assert learned.last_day.idle_desktop_hours < original.last_day.idle_desktop_hours
    assert learned.last_day.never_served == 0


def test_days_are_measured_apart_and_add_up() -> None:
    run = simulate(PLAIN, storm_days(20, 2), POLICIES["imagepipe"])
    assert [day.logins for day in run.days] == [len(d) for d in storm_days(20, 2)]
    assert run.total.logins == sum(day.logins for day in run.days)
    assert run.total.idle_desktop_hours == pytest.approx(
        sum(day.idle_desktop_hours for day in run.days)
    )
    assert run.days[0].simulated_seconds == 86400.0


def test_one_day_is_what_simulate_day_reports() -> None:
    logins = make_profile("steady", 30, 2)
    assert simulate(PLAIN, [logins], POLICIES["imagepipe"]).total == simulate_day(
        PLAIN, logins, POLICIES["imagepipe"]
    )


def test_a_restored_desktop_is_ready_at_restore_speed_not_after_a_boot() -> None:
    one = replace(PLAIN, initial=1, free=1, max=1)
    # ann leaves at 09:10; bob comes 2 minutes later and needs her desktop, recycled
    logins = [Login("ann", 9 * 3600.0, 600.0), Login("bob", 9 * 3600.0 + 601.0 + 60.0, 600.0)]
    boot = simulate_day(one, logins, POLICIES["imagepipe"], SimSettings(start=Start.BOOT))
    restore = simulate_day(one, logins, POLICIES["imagepipe"], SimSettings(start=Start.RESTORE))
    reset_then_boot = 15.0 + 30.0
    assert boot.max_wait >= reset_then_boot - 5.0
    assert restore.max_wait <= 0.8 + 2.0  # one restore call, and the keeper's next pass


def test_desktops_boot_until_the_warm_parent_exists() -> None:
    logins = [Login("early", 0.0, 60.0)]  # arrives before the parent is made
    result = simulate_day(
        replace(PLAIN, initial=0, free=1),
        logins,
        POLICIES["imagepipe"],
        SimSettings(start=Start.RESTORE),
    )
    assert result.max_wait >= 30.0  # its desktop booted: no parent to restore yet


def test_compare_runs_the_same_days_in_every_column() -> None:
    runs = compare_runs(
        PLAIN,
        storm_days(10, 2),
        SimSettings(),
        ["original", "restore", "learned", "fixed"],
    )
    assert [run.policy for run in runs] == ["imagepipe", "original", "restore", "learned", "fixed"]
    assert len({run.total.logins for run in runs}) == 1


def test_cli_reports_the_last_day_apart_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = tmp_path / "lab.yml"
    pool.write_text(
        "name: lab\nimage: win10\nsize: {initial: 2, free: 2, max: 40}\n"
        "display: {port_range: 6000-6100}\nlearn: {enabled: true}\n"
    )
    argv = ["simulate", str(pool), "--profile", "morning-storm", "--users", "20"]
    code = main([*argv, "--days", "3", "--compare", "fixed", "--start", "boot", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["days"] == 3
    ours, fixed = out["results"]
    assert ours["policy"] == "imagepipe" and fixed["policy"] == "fixed"
    assert len(ours["per_day"]) == 3
    assert ours["last_day"] == ours["per_day"][-1]
    assert ours["last_day"]["instant_share"] >= fixed["last_day"]["instant_share"]


def test_cli_rejects_an_unknown_comparison_and_zero_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = tmp_path / "lab.yml"
    pool.write_text("name: lab\nimage: win10\n")
    argv = ["simulate", str(pool), "--profile", "steady"]
    assert main([*argv, "--compare", "vmware"]) == 2
    assert "restore" in capsys.readouterr().err
    assert main([*argv, "--days", "0"]) == 2
    assert "--days" in capsys.readouterr().err
