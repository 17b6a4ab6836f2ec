"""`imagepipe simulate`: a working day of logins against the real planner, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from imagepipe.config import load_pool_file
from imagepipe.errors import BadInputError
from imagepipe.sim.engine import SimSettings, simulate_day
from imagepipe.sim.policies import POLICIES
from imagepipe.sim.profiles import PROFILES, make_profile
from imagepipe.sim.report import SimResult
from imagepipe.sim.trace import load_trace
from imagepipe.sim.world import Latencies
from imagepipe.units import format_duration

MAX_USERS = 100_000  # bounds the time and memory one simulated day takes
MAX_PARALLEL = 1000


def simulate(
    pool_file: Path = typer.Argument(..., help="The pool file to simulate (pools/*.yml)."),
    trace: Path | None = typer.Option(
        None, "--trace", help="CSV of logins: user,login_time,session_length."
    ),
    profile: str | None = typer.Option(
        None, "--profile", help=f"Built-in day instead of a trace: {', '.join(PROFILES)}."
    ),
    users: int = typer.Option(100, "--users", help="Users in the profile."),
    seed: int = typer.Option(1, "--seed", help="Same seed, same day."),
    compare: str | None = typer.Option(
        None, "--compare", help="Also run another policy on the same logins: original."
    ),
    parallel: int = typer.Option(4, "--parallel", help="Hypervisor operations at a time."),
    latency: list[str] | None = typer.Option(
        None,
        "--latency",
        help="NAME=DURATION, repeatable: clone, start, boot, reset, "
        "delete, suspend, resume, stop (defaults 4s, 1s, 30s, 15s, 3s, 5s, 5s, 10s).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Simulate a day of logins on POOL_FILE with the real planner and report how long users
    waited, how many desktops sat idle, and how many operations it took.

    Exit codes: 0 simulated; 2 bad pool file, trace or option.
    """
    if (trace is None) == (profile is None):
        raise BadInputError("give exactly one of --trace FILE or --profile NAME")
    if compare is not None and compare != "original":
        raise BadInputError(f"--compare knows only 'original', got {compare!r}")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise BadInputError(f"--parallel must be between 1 and {MAX_PARALLEL}, got {parallel}")
    if not 1 <= users <= MAX_USERS:
        raise BadInputError(f"--users must be between 1 and {MAX_USERS}, got {users}")
    try:
        latencies = Latencies.parse(latency or [])
    except ValueError as exc:
        raise BadInputError(f"--latency: {exc}") from None
    spec = load_pool_file(pool_file)
    logins = load_trace(trace) if trace is not None else make_profile(str(profile), users, seed)
    settings = SimSettings(latencies=latencies, parallel=parallel)
    results = [simulate_day(spec, logins, POLICIES["imagepipe"], settings)]
    if compare is not None:
        results.append(simulate_day(spec, logins, POLICIES[compare], settings))
    if as_json:
        typer.echo(json.dumps({"pool": spec.name, "results": [r.to_json() for r in results]}))
        return
    Console().print(render(spec.name, results))


def render(pool: str, results: list[SimResult]) -> Table:
    table = Table(title=f"simulated day of pool {pool}")
    table.add_column("")
    for result in results:
        table.add_column(result.policy, justify="right")

    def row(label: str, values: list[str]) -> None:
        table.add_row(label, *values)

    row("logins", [str(r.logins) for r in results])
    row("found a ready desktop", [f"{r.instant_share:.1%}" for r in results])
    for label, share in (("wait p50", 0.5), ("wait p95", 0.95), ("wait p99", 0.99)):
        row(label, [format_duration(r.wait(share)) for r in results])
    row("wait max", [format_duration(r.max_wait) for r in results])
    row("never served", [str(r.never_served) for r in results])
    row("idle desktop-hours", [f"{r.idle_desktop_hours:.1f}" for r in results])
    row("peak clones", [str(r.peak_clones) for r in results])
    kinds = sorted({kind for r in results for kind in r.operations})
    for kind in kinds:
        row(f"ops {kind}", [str(r.operations.get(kind, 0)) for r in results])
    return table
