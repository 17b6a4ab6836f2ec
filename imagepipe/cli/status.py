"""`imagepipe status`: the pools and their desktops, as the keeper sees them.

Renders the read model of imagepipe.app.status (table, `--json`, `--watch`); reads the store
read-only and observes the host live, so it never blocks the keeper.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import typer

from imagepipe.app.pool_down import progress
from imagepipe.app.status import CloneStatus, HostStatus, LeaderStatus, collect, to_json
from imagepipe.cli.context import CliContext, cli_context
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import BadInputError

if TYPE_CHECKING:  # rich is imported only to draw (not for --json)
    from rich.console import Group
    from rich.text import Text

    from imagepipe.pool.model import PoolSpec

WATCH_EVERY = 2.0


def status(
    ctx: typer.Context,
    pool: str | None = typer.Argument(None, help="Show only this pool."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema imagepipe.status/1)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """Show each pool's sizes and each desktop's state, display, balancer state and session."""
    cli = cli_context(ctx)
    settings = _demo_if_nothing_else(cli.settings())
    specs = load_pools([settings.pools_dir])
    if pool is not None:
        specs = [s for s in specs if s.name == pool]
        if not specs:
            raise BadInputError(f"no pool named {pool} in {settings.pools_dir}")
    if as_json and not watch:
        typer.echo(to_json(_collect(cli, settings, specs)))
        return
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not watch:
        console.print(render(_collect(cli, settings, specs)))
        return
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(render(_collect(cli, settings, specs)), refresh=True)
                time.sleep(WATCH_EVERY)
    except KeyboardInterrupt:
        return


def _collect(cli: CliContext, settings: Settings, specs: Sequence[PoolSpec]) -> HostStatus:
    """A fresh look each time (with --watch too): a keeper started meanwhile is seen."""
    with cli.runtime(settings, manage_balancer=False) as runtime:
        return collect(runtime, specs)


def _demo_if_nothing_else(settings: Settings) -> Settings:
    """No settings file anywhere but `imagepipe demo` ran: show the demo's pools (and say so)."""
    if settings.source != "defaults":
        return settings
    from imagepipe.cli.demo import DEFAULT_DIR  # only then: the demo's module is not small

    demo = DEFAULT_DIR / "imagepipe.yml"
    if not demo.is_file():
        return settings
    typer.echo(f"no settings file found; showing the demo's ({demo})", err=True)
    return load_settings(demo)


BREAKER_OPEN = "circuit breaker open (its creates failed): no new desktops there"


def host_summary(snapshot: HostStatus) -> str | None:
    """One line per host over every pool (several hosts only): free, in use, unseen; lost
    since when, an upload under way (how far, since when), new desktops held off by the
    host's circuit breaker (until when)."""
    counts: dict[str, dict[str, int]] = {}
    for pool in snapshot.pools:
        for clone in pool.clones:
            if not clone.host:
                continue
            row = counts.setdefault(clone.host, {"free": 0, "in use": 0, "unseen": 0, "all": 0})
            row["all"] += 1
            if clone.state == "free":
                row["free"] += 1
            elif clone.state in ("in_use", "disconnected", "retiring"):
                row["in use"] += 1
            elif clone.state == "unseen":
                row["unseen"] += 1
    lost = {h.name: h.since for h in snapshot.hosts if not h.connected}
    uploads = {h.name: h.upload for h in snapshot.hosts if h.upload is not None}
    breakers = snapshot.host_breakers
    for name in (*lost, *uploads, *breakers):
        counts.setdefault(name, {"free": 0, "in use": 0, "unseen": 0, "all": 0})
    if not counts:
        return None
    lines = ["hosts:"]
    for host, row in sorted(counts.items()):
        unseen = f", {row['unseen']} unseen" if row["unseen"] else ""
        line = (
            f"  {host}: {row['all']} desktops, {row['free']} free, {row['in use']} in use{unseen}"
        )
        if host in lost:
            since = lost[host]
            when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "unknown"
            line += f"; host lost since {when}"
        upload = uploads.get(host)
        if upload is not None:
            since = upload.since
            started = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else ""
            line += f"; uploading {upload.describe()}{started}"
        until = breakers.get(host)
        if until is not None:
            line += f"; {BREAKER_OPEN} until {time.strftime('%H:%M:%S', time.localtime(until))}"
        lines.append(line)
    return "\n".join(lines)


def render(snapshot: HostStatus) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Table | Text] = []
    for pool in snapshot.pools:
        version = f"v{pool.version}" if pool.version is not None else "no version"
        title = (
            f"{pool.name}  ({pool.image} {version})  free {pool.free}/{pool.target_free}  "
            f"in use {pool.in_use}  total {pool.total}/{pool.max}"
        )
        parts.append(Text(title, style="bold"))  # not a table title: those wrap to its width
        table = Table()
        several = any(c.host for c in pool.clones)
        columns = ("clone", "host") if several else ("clone",)
        for column in (*columns, "version", "state", "display", "balancer", "session"):
            table.add_column(column)
        for clone in pool.clones:
            table.add_row(
                clone.name,
                *((clone.host or "-",) if several else ()),
                f"v{clone.version}" if clone.version is not None else "-",
                clone.state + (f" ({clone.failures} failures)" if clone.failures else ""),
                clone.display or "-",
                _balancer_cell(clone),
                _session_cell(clone, snapshot.generated_at),
            )
        parts.append(table)
        if pool.breaker_open_until and pool.breaker_open_until > snapshot.generated_at:
            wait = pool.breaker_open_until - snapshot.generated_at
            parts.append(
                Text(
                    f"  {pool.name}: circuit breaker open for {wait:.0f}s more "
                    f"after {pool.failures} failures",
                    style="red",
                )
            )
        if pool.note:
            parts.append(Text(f"  {pool.name}: {pool.note}", style="yellow"))
        going = progress(pool)
        if going:
            parts.append(Text(f"  {going}", style="yellow"))
    summary = host_summary(snapshot)
    if summary:
        parts.append(Text(summary))
    for stray in snapshot.stray_clones:
        parts.append(
            Text(
                f"clone {stray.name} belongs to pool {stray.pool}, which is not configured "
                f"({stray.power}); delete it or add the pool back",
                style="yellow",
            )
        )
    if snapshot.balancer_error:
        parts.append(Text(f"balancer: {snapshot.balancer_error}", style="red"))
    for instance in snapshot.balancer_instances:
        if instance.reachable:
            parts.append(Text(f"balancer {instance.name}: up, {instance.backends} backend(s)"))
        else:
            parts.append(
                Text(f"balancer {instance.name}: unreachable: {instance.error}", style="red")
            )
    if not snapshot.pools:
        parts.append(Text("no pools configured"))
    if snapshot.leader is not None:
        parts.append(_leader_line(snapshot.leader))
    return Group(*parts)


def _leader_line(leader: LeaderStatus) -> Text:
    """Several keepers on one shared state: which one leads (the others wait)."""
    from rich.text import Text

    if leader.lease_left > 0:
        return Text(
            f"keeper: {leader.holder} leads (epoch {leader.epoch}, lease "
            f"{leader.lease_left:.0f}s left); any other keeper waits"
        )
    return Text(
        f"keeper: nobody leads: the lease of {leader.holder} ran out "
        f"{-leader.lease_left:.0f}s ago (a standby takes over on its next try)",
        style="yellow",
    )


def _balancer_cell(clone: CloneStatus) -> str:
    if clone.balancer is None:
        return "-"
    return clone.balancer + (f" ({clone.connections} conn)" if clone.connections else "")


def _session_cell(clone: CloneStatus, now: float) -> str:
    if clone.client is None and not clone.users:
        return "-"
    where = clone.client or "disconnected"
    since = f" {int(now - clone.since)}s" if clone.since else ""
    who = ",".join(clone.users)
    return f"{who}@{where}{since}" if who else f"{where}{since}"
