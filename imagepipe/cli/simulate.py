"""`imagepipe simulate`: days of logins against the real planner, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from imagepipe.config import load_pool_file
from imagepipe.errors import BadInputError
from imagepipe.sim.compare import COMPARISONS, compare_runs
from imagepipe.sim.engine import SimSettings
from imagepipe.sim.profiles import PROFILES, make_profile
from imagepipe.sim.report import SimResult, SimRun
from imagepipe.sim.trace import Login, load_trace
from imagepipe.sim.world import Latencies, Start
from imagepipe.units import format_duration

MAX_USERS = 100_000  # bounds the time and memory one simulated day takes
MAX_PARALLEL = 1000
MAX_DAYS = 28  # four weeks: what the learned warm-up looks back on


def simulate(
    pool_file: Path = typer.Argument(..., help="The pool file to simulate (pools/*.yml)."),
    trace: Path | None = typer.Option(
        None, "--trace", help="CSV of logins: user,login_time,session_length."
    ),
    profile: str | None = typer.Option(
        None, "--profile", help=f"Built-in day instead of a trace: {', '.join(PROFILES)}."
    ),
    users: int = typer.Option(100, "--users", help="Users in the profile."),
    seed: int = typer.Option(1, "--seed", help="Same seed, same days."),
    days: int = typer.Option(
        1, "--days", help="Days to replay back to back (a learning pool needs past days)."
    ),
    start: Start | None = typer.Option(
        None,
        "--start",
        help="How new and recycled desktops come up: boot or restore (default: the pool "
        "file's start).",
    ),
    compare: list[str] | None = typer.Option(
        None,
        "--compare",
        help="Repeatable: also run on the same logins the original tool's policy (original), "
        "the pool started the other way (boot, restore), or with learning on or off "
        "(learned, fixed).",
    ),
    parallel: int = typer.Option(4, "--parallel", help="Hypervisor operations at a time."),
    latency: list[str] | None = typer.Option(
        None,
        "--latency",
        help="NAME=DURATION, repeatable: clone, start, boot, reset, delete, suspend, resume, "
        "stop, restore, save (defaults 4s, 1s, 30s, 15s, 3s, 5s, 5s, 10s, 0.8s, 5s).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    chart: Path | None = typer.Option(
        None,
        "--chart",
        help="Also draw the day(s) into FILE (.png, .svg or .html): arrivals, desktops in "
        "use, free and starting, users waiting, idle desktop-hours; one panel per column. "
        "Needs matplotlib (imagepipe[charts]).",
    ),
) -> None:
    """Simulate days of logins on POOL_FILE with the real planner and report how long users
    waited, how many desktops sat idle, and how many operations it took.

    Exit codes: 0 simulated; 2 bad pool file, trace or option; 3 --chart without
    matplotlib.
    """
    if (trace is None) == (profile is None):
        raise BadInputError("give exactly one of --trace FILE or --profile NAME")
    for name in compare or []:
        if name not in COMPARISONS:
            raise BadInputError(f"--compare knows {', '.join(COMPARISONS)}; got {name!r}")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise BadInputError(f"--parallel must be between 1 and {MAX_PARALLEL}, got {parallel}")
    if not 1 <= users <= MAX_USERS:
        raise BadInputError(f"--users must be between 1 and {MAX_USERS}, got {users}")
    if not 1 <= days <= MAX_DAYS:
        raise BadInputError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    try:
        latencies = Latencies.parse(latency or [])
    except ValueError as exc:
        raise BadInputError(f"--latency: {exc}") from None
    if chart is not None:
        from imagepipe.sim.chart import chart_format, require_matplotlib

        chart_format(chart)
        require_matplotlib()
    spec = load_pool_file(pool_file)
    if trace is not None:
        logins = load_trace(trace)
        schedule: list[list[Login]] = [logins for _ in range(days)]
    else:
        schedule = [make_profile(str(profile), users, seed + day) for day in range(days)]
    sample = None if chart is None else 60.0 if days <= 7 else 300.0
    settings = SimSettings(latencies=latencies, parallel=parallel, start=start, sample=sample)
    runs = compare_runs(spec, schedule, settings, compare or [])
    if chart is not None:
        from imagepipe.sim.chart import write_chart

        write_chart(chart, spec.name, runs)
    if as_json:
        out = {"pool": spec.name, "days": days, "results": [run.to_json() for run in runs]}
        typer.echo(json.dumps(out))
        return
    Console().print(render(spec.name, runs))


def render(pool: str, runs: list[SimRun]) -> Table:
    days = len(runs[0].days)
    title = f"simulated day of pool {pool}"
    if days > 1:
        title = f"pool {pool}: the last of {days} simulated days"
    table = Table(title=title)
    table.add_column("")
    results: list[SimResult] = [run.last_day for run in runs]
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
    if days > 1:
        row("ready, day by day", [" ".join(f"{d.instant_share:.0%}" for d in r.days) for r in runs])
        row(
            "idle d-h, day by day",
            [" ".join(f"{d.idle_desktop_hours:.0f}" for d in r.days) for r in runs],
        )
    return table
