"""`imagepipe hosts`: the hosts of a keeper that spans several, and their maintenance."""

from __future__ import annotations

import json
import time

import typer

from imagepipe.cli.context import cli_context
from imagepipe.config import load_pools
from imagepipe.units import format_size

app = typer.Typer(no_args_is_help=False, add_completion=False)


@app.callback(invoke_without_command=True)
def hosts(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the hosts as a JSON list."),
) -> None:
    """The hosts of a keeper that spans several: list them, drain one for maintenance.

    Without a subcommand: each host's state (up, draining, lost since, breaker until: its
    creates failed, no new desktops there until then), desktops free and in use, versions
    present and capacity. `hosts drain HOST`, `hosts undrain HOST`."""
    if ctx.invoked_subcommand is not None:
        return
    from imagepipe.app.hosts import configured, host_rows

    cli = cli_context(ctx)
    settings = cli.settings()
    configured(settings)
    specs = load_pools([settings.pools_dir])
    with cli.runtime(settings, manage_balancer=False) as runtime:
        rows = host_rows(runtime, specs)
    if as_json:
        doc = [r.to_json() for r in rows]
        typer.echo(json.dumps(doc, indent=2, sort_keys=True, allow_nan=False))
        return
    typer.echo(
        f"{'HOST':<12} {'STATE':<9} {'FREE':>4} {'IN USE':>6} {'OTHER':>5} {'UNSEEN':>6} "
        f"{'CAPACITY':<14} VERSIONS"
    )
    for r in rows:
        capacity = "/".join(
            x
            for x in (
                f"{r.max_desktops} desktops" if r.max_desktops is not None else "",
                format_size(r.max_memory) if r.max_memory is not None else "",
            )
            if x
        )
        versions = ", ".join(r.versions) or "-"
        if r.upload:
            since = f" since {clock(r.upload_since)}" if r.upload_since is not None else ""
            versions += f" (uploading {r.upload}{since})"
        state = r.state
        if r.state == "lost" and r.since is not None:
            state += " since " + clock(r.since)
        if r.state == "breaker" and r.breaker_open_until is not None:
            state += " until " + clock(r.breaker_open_until)
        typer.echo(
            f"{r.name:<12} {state:<9} {r.free:>4} {r.in_use:>6} {r.other:>5} {r.lost:>6} "
            f"{capacity or 'unlimited':<14} {versions}"
        )


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


@app.command()
def drain(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host to drain."),
    wait: bool = typer.Option(
        False, "--wait", help="Wait until no desktop is left on the host (users log off)."
    ),
) -> None:
    """No new desktops on HOST: its free desktops are replaced on the other hosts, desktops in
    use stay until their users log off. The running keeper does it; `hosts undrain` ends it."""
    from imagepipe.app.hosts import drain as drain_host
    from imagepipe.app.hosts import wait_empty

    cli = cli_context(ctx)
    settings = cli.settings()
    with cli.runtime(settings, manage_balancer=False) as runtime:
        if drain_host(runtime, host, time.time()):
            typer.echo(f"{host} is draining: no new desktops there; the keeper moves free ones")
        else:
            typer.echo(f"{host} was draining already; nothing changed")
        if wait:
            wait_empty(
                runtime,
                load_pools([settings.pools_dir]),
                host,
                sleep=time.sleep,
                report=lambda n: typer.echo(f"{host}: {n} desktop(s) left"),
            )


@app.command()
def undrain(
    ctx: typer.Context,
    host: str = typer.Argument(..., help="The host to take desktops again."),
) -> None:
    """New desktops may go to HOST again (nothing moves back by itself)."""
    from imagepipe.app.hosts import undrain as undrain_host

    cli = cli_context(ctx)
    settings = cli.settings()
    with cli.runtime(settings, manage_balancer=False) as runtime:
        changed = undrain_host(runtime, host)
    if changed:
        typer.echo(f"{host} takes new desktops again")
    else:
        typer.echo(f"{host} was not draining; nothing changed")
