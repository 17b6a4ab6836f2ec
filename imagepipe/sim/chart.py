"""`simulate --chart FILE`: the simulated day(s) drawn with matplotlib (an optional extra).

One figure, time of day along the bottom: logins arriving; then one panel per policy with
its desktops in use, free and ready, and starting, and the users waiting for one; then the
idle desktop-hours and the logins that had to wait, accumulating, one line per policy.
matplotlib is imported only here, only when a chart is asked for.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.sim.report import SimRun
from imagepipe.sim.timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".html")
HOUR = 3600.0
DAY = 86400.0
# one colour per series, the same in every panel (colour-blind-safe, Okabe-Ito)
IN_USE, FREE, STARTING, WAITING = "#0072B2", "#009E73", "#E69F00", "#D55E00"
POLICY_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
LINE_STYLES = ("-", "--", ":", "-.")  # lines that lie on each other stay apart


def chart_format(path: Path) -> str:
    """The chart's format from the file name; BadInputError names the known ones."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(
            f"--chart {path}: expected a file name ending in {', '.join(FORMATS)}, "
            f"got {suffix or 'no extension'!r}"
        )
    return suffix


def require_matplotlib() -> None:
    """EnvironmentMissingError (exit 3) saying how to install it when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise EnvironmentMissingError(
            "--chart needs matplotlib, which is not installed: "
            "pip install 'imagepipe[charts]' into imagepipe's venv"
        ) from None
    matplotlib.use("Agg")  # files only, no display


def write_chart(path: Path, pool: str, runs: Sequence[SimRun]) -> None:
    """Draw the runs (each recorded with a timeline) into `path` (.png, .svg or .html)."""
    suffix = chart_format(path)
    require_matplotlib()
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in SVG (searchable)
    figure = draw(pool, runs)
    if suffix == ".html":
        svg = io.StringIO()
        figure.savefig(svg, format="svg", bbox_inches="tight")
        title = html.escape(f"imagepipe simulate: pool {pool}")
        path.write_text(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"</head>\n<body>\n{svg.getvalue()}\n</body></html>\n",
            encoding="utf-8",
        )
    else:
        figure.savefig(path, format=suffix[1:], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)


def draw(pool: str, runs: Sequence[SimRun]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.dates import AutoDateLocator, DateFormatter
    from matplotlib.ticker import MaxNLocator

    timelines = [_timeline(run) for run in runs]
    first = timelines[0]
    zone = ZoneInfo(first.timezone)
    begin, end = _span(first)
    days = len(runs[0].days)

    def when(seconds: float) -> datetime:
        return datetime.fromtimestamp(first.epoch + seconds, zone)

    rows = 1 + len(runs) + 2
    heights = [1.0] + [1.6] * len(runs) + [1.1, 1.1]
    figure, axes = plt.subplots(
        rows,
        1,
        sharex=True,
        figsize=(11, 1.9 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    span = f"{days} simulated days" if days > 1 else "a simulated day"
    figure.suptitle(f"Pool {pool}: {span}", fontsize=13, fontweight="bold")

    # logins arriving (the same for every policy)
    width = 300.0 if end - begin <= 2 * DAY else HOUR
    arrivals = _per_bin(first, width, begin, end)
    ax = axes[0]
    ax.bar(
        [when(at) for at, _ in arrivals],
        [n for _, n in arrivals],
        width=width / DAY,
        align="edge",
        color="#666666",
        label=f"logins per {'5 min' if width < HOUR else 'hour'}",
    )
    ax.set_ylabel("logins")
    ax.set_title("Users arriving", loc="left", fontsize=10)
    _legend_above(ax)

    for ax, run, timeline in zip(axes[1 : 1 + len(runs)], runs, timelines, strict=True):
        shown = [s for s in timeline.samples if begin <= s.at <= end]
        at = [when(s.at) for s in shown]
        in_use = [s.in_use for s in shown]
        free = [s.free_ready for s in shown]
        starting = [s.starting for s in shown]
        ax.stackplot(
            at,
            in_use,
            free,
            starting,
            labels=["desktops in use", "free and ready", "starting"],
            colors=[IN_USE, FREE, STARTING],
            alpha=0.8,
            step="post",
        )
        ax.step(at, [s.waiting for s in shown], where="post", color=WAITING, linewidth=1.6)
        ax.plot([], [], color=WAITING, linewidth=1.6, label="users waiting")
        ax.set_ylabel("desktops / users")
        last = run.last_day
        ax.set_title(
            f"{run.policy}: {last.instant_share:.1%} of logins found a ready desktop"
            + (" (last day)" if days > 1 else ""),
            loc="left",
            fontsize=10,
        )
        _legend_above(ax, ncols=4)

    idle_ax, waited_ax = axes[-2], axes[-1]
    for index, (run, timeline) in enumerate(zip(runs, timelines, strict=True)):
        colour = POLICY_COLOURS[index % len(POLICY_COLOURS)]
        style = LINE_STYLES[index % len(LINE_STYLES)]
        shown = [s for s in timeline.samples if begin <= s.at <= end]
        at = [when(s.at) for s in shown]
        idle = [s.idle_hours for s in shown]
        idle_ax.plot(at, idle, color=colour, linestyle=style, linewidth=1.8, label=run.policy)
        waited = [s.waited for s in shown]
        waited_ax.step(
            at, waited, where="post", color=colour, linestyle=style, linewidth=1.8, label=run.policy
        )
    idle_ax.set_ylabel("desktop-hours")
    idle_ax.set_title(
        "Idle desktop-hours so far (running, nobody on them)", loc="left", fontsize=10
    )
    _legend_above(idle_ax, ncols=len(runs))
    waited_ax.set_ylabel("logins")
    waited_ax.set_title("Logins so far that had to wait for a desktop", loc="left", fontsize=10)
    _legend_above(waited_ax, ncols=len(runs))

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))
        if ax is not idle_ax:  # counts of logins, desktops and users: whole numbers
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    policy_axes = axes[1 : 1 + len(runs)]
    top = max(ax.get_ylim()[1] for ax in policy_axes)
    for ax in policy_axes:  # one scale, so the policies' panels compare at a glance
        ax.set_ylim(0, top)
    bottom = axes[-1]
    bottom.set_xlim(when(begin), when(end))
    locator = AutoDateLocator(tz=zone, minticks=5, maxticks=14)  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_locator(locator)
    label = DateFormatter("%a %H:%M" if days > 1 else "%H:%M", tz=zone)  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_formatter(label)
    bottom.set_xlabel(f"time of day ({first.timezone})")
    return figure


def _legend_above(ax: Axes, ncols: int = 1) -> None:
    """The panel's legend on the line of its title, at the right: never over the data."""
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=ncols, fontsize=8, frameon=False)


def _timeline(run: SimRun) -> Timeline:
    if run.timeline is None:
        raise ValueError(f"run {run.policy!r} was simulated without samples (settings.sample)")
    return run.timeline


def _span(timeline: Timeline) -> tuple[float, float]:
    """From an hour before the first login to an hour after the last user left or stopped
    waiting, within the simulated days (all of them when nobody logged in)."""
    samples = timeline.samples
    arrivals = [b.at for a, b in pairwise(samples) if b.arrived > a.arrived]
    busy = [s.at for s in samples if s.in_use or s.waiting]
    if not arrivals:
        return samples[0].at, samples[-1].at
    begin = max(samples[0].at, min(arrivals) - HOUR)
    end = min(samples[-1].at, max(busy + arrivals) + HOUR)
    return begin, end


def _per_bin(timeline: Timeline, width: float, begin: float, end: float) -> list[tuple[float, int]]:
    """Logins arriving in each `width`-second bin from `begin` to `end`."""
    counts: dict[float, int] = {}
    previous = 0
    for sample in timeline.samples:
        came = sample.arrived - previous
        previous = sample.arrived
        if came and begin <= sample.at <= end + width:
            start = (sample.at - timeline.interval) // width * width  # they came before `at`
            counts[start] = counts.get(start, 0) + came
    return [(at, counts.get(at, 0)) for at in _bins(begin, end, width)]


def _bins(begin: float, end: float, width: float) -> list[float]:
    first = begin // width * width
    return [first + i * width for i in range(int((end - first) // width) + 1)]
