"""The capacity simulator: traces, profiles, and what a simulated day measures."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from imagepipe.cli.app import main
from imagepipe.errors import BadInputError, ConfigError
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.planner.forecast import day_and_bucket
from imagepipe.sim.engine import LocalBuckets, SimSettings, simulate_day
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.profiles import make_profile
from imagepipe.sim.trace import Login, parse_trace
from imagepipe.sim.world import Latencies, Start

SPEC = PoolSpec(name="lab", image="win10", initial=2, free=2, max=20)
ZERO = SimSettings(latencies=Latencies().zero(), pass_gap=0.0)


def test_trace_accepts_clock_times_seconds_and_durations() -> None:
    logins = parse_trace(
        "user,login_time,session_length\nann,08:30,1h\nbob,30600,90m\ncy,08:00:30,45\n"
    )
    assert logins == [
        Login("cy", 28830.0, 45.0),
        Login("ann", 30600.0, 3600.0),
        Login("bob", 30600.0, 5400.0),
    ]


@pytest.mark.parametrize(
    ("line", "key"),
    [("ann,8:6x,1h", "login_time"), ("ann,08:00,forever", "session_length"), ("ann,08:00", None)],
)
def test_trace_errors_name_file_line_and_column(line: str, key: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_trace(f"user,login_time,session_length\nbob,08:00,1h\n{line}\n", "day.csv")
    assert str(caught.value).startswith("day.csv:3")
    assert caught.value.key == key


def test_profiles_are_deterministic_for_a_seed() -> None:
    assert make_profile("steady", 50, 7) == make_profile("steady", 50, 7)
    assert make_profile("steady", 50, 7) != make_profile("steady", 50, 8)
    with pytest.raises(BadInputError, match="morning-storm"):
        make_profile("lunch", 10, 1)


def test_with_zero_latencies_every_login_is_instant() -> None:
    logins = make_profile("steady", 60, 3)
    result = simulate_day(SPEC, logins, POLICIES["imagepipe"], ZERO)
    assert result.logins == 60
    assert result.instant == 60 and result.max_wait == 0.0


def test_pool_smaller_than_concurrent_users_makes_some_wait() -> None:
    small = PoolSpec(name="lab", image="win10", initial=2, free=2, max=5)
    logins = [Login(f"u{i}", 8 * 3600.0 + i, 3600.0) for i in range(8)]
    result = simulate_day(small, logins, POLICIES["imagepipe"], ZERO)
    assert result.instant == 5
    assert result.wait(1.0) >= 3600.0 - 10  # the last three wait for someone to log off
    assert result.never_served == 0
    assert result.peak_clones == 5


def test_original_policy_does_worse_on_the_morning_storm() -> None:
    spec = PoolSpec(name="lab", image="win10", initial=5, free=5, max=80, port_last=6100)
    logins = make_profile("morning-storm", 60, 1)
    booting = SimSettings(start=Start.BOOT)  # as the original tool's desktops come up
    ours = simulate_day(spec, logins, POLICIES["imagepipe"], booting)
    original = simulate_day(spec, logins, POLICIES["original"], booting)
    assert ours.instant_share > original.instant_share
    assert ours.wait(0.95) < original.wait(0.95)


def test_simulation_counts_operations_and_idle_time() -> None:
    logins = [Login("ann", 9 * 3600.0, 3600.0)]
    result = simulate_day(SPEC, logins, POLICIES["imagepipe"], SimSettings())
    assert result.operations["CreateClone"] >= 2
    assert result.operations["ResetClone"] == 1  # ann's desktop is reset after she leaves
    assert 40.0 < result.idle_desktop_hours < 48.0 + 1  # two idle desktops all day


def test_cli_prints_json_for_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "lab.yml"
    pool.write_text("name: lab\nimage: win10\nsize: {initial: 1, free: 1, max: 4}\n")
    trace = tmp_path / "day.csv"
    trace.write_text("user,login_time,session_length\nann,08:00,1h\nbob,08:00:10,1h\n")
    code = main(["simulate", str(pool), "--trace", str(trace), "--compare", "original", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '"policy": "imagepipe"' in out and '"policy": "original"' in out


def test_cli_rejects_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "lab.yml"
    pool.write_text("name: lab\nimage: win10\n")
    assert main(["simulate", str(pool)]) == 2
    assert "--trace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("timezone", "start"),
    [
        ("Europe/Berlin", "2024-03-31T00:40:00+00:00"),  # clocks go forward at 01:00 UTC
        ("Europe/Berlin", "2024-10-27T00:40:00+00:00"),  # and back
        ("Asia/Kathmandu", "2024-01-08T18:00:00+00:00"),  # +05:45, local midnight inside
        ("Australia/Lord_Howe", "2024-04-06T14:40:00+00:00"),  # a half-hour change
    ],
)
def test_simulated_keeper_reads_the_local_day_and_bucket_of_every_moment(
    timezone: str, start: str
) -> None:
    """The simulator keeps the learning keeper's (local day, bucket) between passes; it
    answers as day_and_bucket at every moment around a clock change, edges included."""
    buckets = LocalBuckets(timezone)
    first = datetime.fromisoformat(start).timestamp()
    moments = [first + i * 7.3 for i in range(1500)]  # about three hours, 7.3 s apart
    moments += [first + 300.0 * i + d for i in range(36) for d in (-1e-3, -1e-6, -4e-7, 0.0, 1e-6)]
    for at in moments:
        assert buckets(at) == day_and_bucket(at, timezone), at
