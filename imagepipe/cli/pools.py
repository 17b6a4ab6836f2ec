"""`imagepipe pools check`: validate pool files and show what each pool will be."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from imagepipe.app.bootstrap import Runtime
from imagepipe.cli.context import cli_context
from imagepipe.config import Settings, load_pools
from imagepipe.errors import BadInputError, ConfigError
from imagepipe.pool.model import PoolSpec
from imagepipe.units import format_duration, format_size
from imagepipe.yamlsrc import path_kind

app = typer.Typer(help="Pool files: validate them.", no_args_is_help=True)

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@app.callback()
def pools() -> None:
    """Pool files (pools/*.yml): one pool of desktops per file."""
    # A callback makes `pools` a command group, so `check` keeps its name.


@app.command()
def check(
    ctx: typer.Context,
    paths: list[Path] | None = typer.Argument(
        None, help="Pool files or folders of *.yml (default: the settings' pools_dir)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the pools as a JSON list."),
) -> None:
    """Validate pool files and print one summary line per pool.

    Exit code 2 with file:line: key and what was expected when a file is wrong.
    """
    if paths:
        targets, hosts = list(paths), None
    else:  # the settings' pools, checked against the settings' hosts too
        settings = cli_context(ctx).settings()
        targets, hosts = [_pools_dir(settings)], settings.host_specs()
    specs = load_pools(targets, hosts)
    if not specs:
        where = ", ".join(str(p) for p in targets)
        raise BadInputError(f"{where}: no pool files (*.yml) in this folder")
    if as_json:
        typer.echo(
            json.dumps([pool_json(s) for s in specs], indent=2, sort_keys=True, allow_nan=False)
        )
    else:
        for line in summary_lines(specs):
            typer.echo(line)


def _pools_dir(settings: Settings) -> Path:
    """The settings' pools_dir; a missing one is named with the settings file that gave it."""
    if path_kind(settings.pools_dir) == "missing":
        given = settings.source if settings.source != "defaults" else None
        raise ConfigError(
            f"{settings.pools_dir} does not exist; create it or point pools_dir elsewhere",
            file=given,
            key="pools_dir",
        )
    return settings.pools_dir


def summary_lines(specs: Sequence[PoolSpec]) -> list[str]:
    """`lab  image tiny@latest  linked  initial 2 free 2 max 4  ports 5900-5903  recycle 1m`"""
    width = max(len(s.name) for s in specs)
    lines = []
    for spec in specs:
        ref = spec.channel if spec.version is None else f"v{spec.version}"
        parts = [
            spec.name.ljust(width),
            f"image {spec.image}@{ref}",
            spec.clone.value,
            f"initial {spec.initial} free {spec.free} max {spec.max}",
            f"ports {spec.port_first}-{spec.port_first + spec.max - 1}",
            f"recycle {format_duration(spec.recycle_after)}",
        ]
        if spec.schedule:
            parts.append(f"schedule {len(spec.schedule)} rule(s) {spec.timezone}")
        if spec.assignments:
            parts.append(f"assigned {len(spec.assignments)}")
        if spec.standby.value != "none":
            parts.append(f"standby {spec.standby.value}")
        lines.append("  ".join(parts))
    return lines


def pool_json(spec: PoolSpec) -> dict[str, Any]:
    """A stable JSON form of a pool: seconds for durations, bytes for sizes."""
    return {
        "name": spec.name,
        "source": spec.source,
        "image": spec.image,
        "channel": spec.channel,
        "version": spec.version,
        "clone": spec.clone.value,
        "size": {"initial": spec.initial, "free": spec.free, "max": spec.max},
        "machine": {
            "cpus": spec.cpus,
            "memory": spec.memory,
            "memory_human": format_size(spec.memory),
        },
        "display": {
            "port_first": spec.port_first,
            "port_last": spec.port_last,
            "address": spec.display_address,
        },
        "sessions": {
            "on_logoff": spec.on_logoff.value,
            "recycle_after": spec.recycle_after,
            "disconnect_timeout": spec.disconnect_timeout,
        },
        "idle": {"shrink_after": spec.shrink_after, "standby": spec.standby.value},
        "timezone": spec.timezone,
        "schedule": [
            {
                "days": [_DAY_NAMES[d] for d in sorted(rule.days)],
                "from": _clock(rule.start_minute),
                "to": _clock(rule.end_minute),
                "free": rule.free,
            }
            for rule in spec.schedule
        ],
        "assignments": dict(sorted(spec.assignments.items())),
        "failures": {
            "max": spec.max_failures,
            "backoff": spec.retry_backoff,
            "cooldown": spec.breaker_cooldown,
        },
        "boot_timeout": spec.boot_timeout,
        "rollout": {"drain_deadline": spec.drain_deadline},
    }


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# ---- taking a pool down (imagepipe/app/pool_down.py) ------------------------------------


def down(
    ctx: typer.Context,
    pool: str = typer.Argument(..., help="The pool to take down."),
    now: bool = typer.Option(
        False, "--now", help="Remove desktops in use too, at once: their users are cut off."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before --now cuts users off."),
) -> None:
    """Take a pool down: make no more desktops, drain it from the balancer, remove its free
    desktops at once and the others as their sessions end. The keeper does the work; follow
    it with `imagepipe status POOL`; `imagepipe pools up POOL` keeps the pool again."""
    cli = cli_context(ctx)
    settings = cli.settings()
    with cli.runtime(settings, manage_balancer=False) as runtime:
        _down(runtime, pool, now, yes)


def _down(runtime: Runtime, pool: str, now: bool, yes: bool) -> None:
    from imagepipe.app.pool_down import known_pools, mark_down, request_down
    from imagepipe.app.status import collect

    settings = runtime.settings
    specs = {s.name: s for s in load_pools([settings.pools_dir])}
    if pool not in specs and pool in known_pools(runtime):
        # its pool file was removed: the running keeper still looks after it (growth stopped)
        if now and not yes:
            raise BadInputError(
                f"{pool} has no pool file any more, so who is on its desktops cannot be shown; "
                "add --yes to take it down now anyway (nothing changed)"
            )
        mark_down(runtime, pool, now=now, at=time.time())
        typer.echo(
            f"{pool} is going down (its pool file is gone; the running keeper, which still "
            f"looks after it since its last reload, does it); follow with `imagepipe status`."
        )
        return
    spec = _configured(settings.pools_dir, pool)
    (status,) = collect(runtime, [spec]).pools
    request = request_down(status, now)
    if now and request.in_use and not yes:
        who = ", ".join(request.users)
        typer.echo(
            f"warning: --now removes {request.in_use} desktop(s) of {pool} in use ({who}): "
            "their users are cut off and lose what they did not save",
            err=True,
        )
        if not sys.stdin.isatty():
            raise BadInputError(
                "not taken down (nothing changed): add --yes to cut those users off "
                "without being asked"
            )
        if not typer.confirm("Take the pool down now?", err=True):
            raise BadInputError("not taken down (nothing changed)")
    mark_down(runtime, pool, now=now, at=time.time())
    later = (
        "" if now or not request.in_use else (f", {request.in_use} in use as their sessions end")
    )
    removed = request.free + (request.in_use if now else 0)
    typer.echo(
        f"{pool} is going down: {removed} desktop(s) removed now{later}, balancer entries "
        f"removed. The keeper does it; follow with `imagepipe status {pool}`."
    )


def up(
    ctx: typer.Context,
    pool: str = typer.Argument(..., help="The pool to keep again."),
) -> None:
    """Keep a pool that `pools down` was taking down: the keeper makes its desktops again."""
    from imagepipe.app.pool_down import mark_up

    cli = cli_context(ctx)
    settings = cli.settings()
    _configured(settings.pools_dir, pool)
    with cli.runtime(settings) as runtime:
        kept = mark_up(runtime, pool)
    if kept:
        typer.echo(f"{pool} is kept again")
    else:
        typer.echo(f"{pool} was not going down; nothing changed")


def _configured(pools_dir: Path, pool: str) -> PoolSpec:
    specs = {s.name: s for s in load_pools([pools_dir])}
    if pool not in specs:
        names = ", ".join(sorted(specs)) or "none"
        raise BadInputError(f"no pool named {pool} in {pools_dir} (configured pools: {names})")
    return specs[pool]


app.command(name="down")(down)
app.command(name="up")(up)
