"""`imagepipe rollout`: move pools onto a new image version blue/green, watch, pause, undo.

    imagepipe rollout IMAGE [--to V] [--pool P]… [--drain | --deadline DUR [--message T] | --now]
                            [--canary N [--bake DUR]] [--surge N] [--warn 10m,1m]
                            [--wait] [--dry-run] [--json]
    imagepipe rollout status [IMAGE] [--watch] [--json] [--all]
    imagepipe rollout pause|resume|cancel|undo IMAGE

The running keeper executes the rollout (imagepipe/pool/rollout/); this command parses,
calls the use case (app/rollout.py) and renders what it returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import typer
from rich.console import Console

from imagepipe.app import rollout as use_case
from imagepipe.cli.context import cli_context
from imagepipe.config import load_pools
from imagepipe.errors import BadInputError
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.rollout.control import WARN_BEFORE, PoolPlan, Request, RolloutControl
from imagepipe.pool.rollout.records import Rollout, RolloutState
from imagepipe.units import format_duration, parse_duration

SCHEMA = "imagepipe.rollout/1"
VERBS = ("status", "pause", "resume", "cancel", "undo")


def rollout(
    ctx: typer.Context,
    words: list[str] = typer.Argument(
        ..., metavar="IMAGE | status [IMAGE] | pause|resume|cancel|undo IMAGE"
    ),
    to: str | None = typer.Option(None, "--to", help="Version (7 or v7); default: the newest."),
    pool: list[str] = typer.Option([], "--pool", "-p", help="Only this pool (repeatable)."),
    drain: bool = typer.Option(False, "--drain", help="Wait for every user to log off (default)."),
    deadline: str | None = typer.Option(
        None, "--deadline", help="End remaining sessions after this long (e.g. 8h)."
    ),
    message: str | None = typer.Option(
        None, "--message", help="Shown inside the desktops before the deadline."
    ),
    now: bool = typer.Option(False, "--now", help="Deadline after the last warning's grace."),
    canary: int | None = typer.Option(
        None, "--canary", min=1, help="Only N new desktops per pool first, then pause."
    ),
    bake: str | None = typer.Option(
        None, "--bake", help="With --canary: go on by itself after this long without failure."
    ),
    surge: int | None = typer.Option(
        None, "--surge", min=0, help="Desktops allowed above max meanwhile (default size.free)."
    ),
    warn: str | None = typer.Option(
        None, "--warn", help="Warnings before the deadline (default 10m,1m)."
    ),
    wait: bool = typer.Option(False, "--wait", help="Follow it: exit 0 done, 4 failed/back."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="JSON (lines, with --wait/--watch)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="status: follow until Ctrl-C."),
    all_: bool = typer.Option(False, "--all", help="status: every rollout, past ones too."),
) -> None:
    """Move every pool of IMAGE (or the named pools) onto a new version, blue/green: new
    desktops are ready before old free ones go; old desktops in use take no new user and are
    removed when their user logs off (or at --deadline). The running keeper does the work;
    Ctrl-C on --wait leaves the rollout going; --wait follows a rollback until the channel
    is back on the old version. Exit codes: 0 done (or started), 2 bad input, 3 no keeper
    running, 4 the rollout failed, was cancelled or rolled back, 130 interrupted."""
    cli = cli_context(ctx)
    settings = cli.settings()
    verb, image = _verb(words)
    specs = load_pools([settings.pools_dir])
    console = Console(highlight=False, soft_wrap=True)
    # rollouts write intent and read progress: the keeper acts, so the balancer is only read
    with cli.runtime(settings, manage_balancer=False) as runtime:
        rollouts = use_case.open_rollouts(runtime)
        if verb == "status":
            code = _status(rollouts, image, as_json, watch, all_, console)
            if code:
                raise typer.Exit(code)
            return
        assert image is not None
        if verb != "start":
            done = _control(rollouts, specs, verb, image)
            _print(done, as_json, console, f"{verb}: ")
            if wait and done.active:
                _follow(rollouts, done, as_json, console)
            return
        if deadline is not None and now:
            raise BadInputError("give --deadline or --now, not both")
        if drain and (deadline is not None or now):
            raise BadInputError("--drain waits for every logoff; it excludes --deadline and --now")
        if bake is not None and canary is None:
            raise BadInputError("--bake goes with --canary N")
        request = Request(
            image=image,
            to=to,
            pools=tuple(pool),
            deadline=_duration("--deadline", deadline),
            now=now,
            message=message,
            canary=canary,
            bake=_duration("--bake", bake),
            surge=surge,
            warn_before=_warnings(warn),
        )
        if dry_run:
            plans = use_case.dry_run(rollouts, runtime, specs, request)
            _print_plans(plans, as_json, console)
            return
        started = use_case.start(rollouts, specs, request, by=use_case.who())
        for name in started.left_alone:
            if not as_json:
                console.print(f"pool {name} is pinned (version: in its file): left alone")
        if started.rollout is None:
            if as_json:
                typer.echo(json.dumps({"schema": SCHEMA, "nothing": started.message}))
            else:
                console.print(started.message)
            return
        _print(started.rollout, as_json, console, "started: ")
        if wait:
            _follow(rollouts, started.rollout, as_json, console)


def _verb(words: list[str]) -> tuple[str, str | None]:
    if words[0] in VERBS:
        if len(words) > 2 or (words[0] != "status" and len(words) != 2):
            raise BadInputError(f"usage: imagepipe rollout {words[0]} IMAGE")
        return words[0], words[1] if len(words) == 2 else None
    if len(words) != 1:
        raise BadInputError(f"usage: imagepipe rollout IMAGE [options]; got {' '.join(words)}")
    return "start", words[0]


def _control(rollouts: RolloutControl, specs: list[PoolSpec], verb: str, image: str) -> Rollout:
    if verb == "pause":
        return rollouts.pause(image)
    if verb == "resume":
        return rollouts.resume(image)
    if verb == "cancel":
        return rollouts.cancel(specs, image, by=use_case.who())
    return rollouts.undo(specs, image, by=use_case.who())


def _duration(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadInputError(f"{option}: {exc}") from None


def _warnings(text: str | None) -> tuple[float, ...]:
    if text is None:
        return WARN_BEFORE
    if text.strip() in ("", "none"):
        return ()
    values = [_duration("--warn", part.strip()) for part in text.split(",")]
    return tuple(sorted((v for v in values if v is not None), reverse=True))


def _follow(rollouts: RolloutControl, rollout: Rollout, as_json: bool, console: Console) -> None:
    """Print each change until the rollout ends; exit with its code. Ctrl-C (130) leaves it
    going: it belongs to the keeper."""
    last = rollout
    shown = _lines(rollout)
    try:
        for current in rollouts.follow(rollout.id):
            last = current
            if as_json:
                typer.echo(to_json_line(current))
            elif _lines(current) != shown:
                shown = _lines(current)
                console.print(shown)
    except KeyboardInterrupt:
        if not as_json:
            console.print(
                f"stopped following; rollout #{rollout.id} goes on "
                f"(imagepipe rollout status {rollout.image})"
            )
        raise typer.Exit(130) from None
    code = exit_code(last)
    if code:
        raise typer.Exit(code)


def _status(
    rollouts: RolloutControl,
    image: str | None,
    as_json: bool,
    watch: bool,
    history: bool,
    console: Console,
) -> int:
    shown = rollouts.shown(image, history=history)
    if not watch or not shown:
        if as_json:
            typer.echo(json.dumps([json.loads(to_json_line(r)) for r in shown], sort_keys=True))
        elif not shown:
            console.print("no rollouts" + (f" of {image}" if image else ""))
        for r in shown if not as_json else ():
            console.print(_lines(r))
        keeper = rollouts.keeper_running()
        if keeper is not None and any(r.active for r in shown) and not as_json:
            console.print(f"[yellow]warning:[/] {keeper}")
        return 0
    try:
        _follow(rollouts, shown[0], as_json, console)
    except typer.Exit as exc:
        return exc.exit_code
    return 0


def _print(rollout: Rollout, as_json: bool, console: Console, head: str) -> None:
    if as_json:
        typer.echo(to_json_line(rollout))
    else:
        console.print(head + _lines(rollout))


def _lines(r: Rollout) -> str:
    head = (
        f"rollout #{r.id} {r.image}@{r.channel} v{r.from_version} → v{r.to_version}  "
        f"[bold]{r.state.label}[/]"
    )
    extra = []
    if r.canary is not None:
        extra.append(f"canary {r.canary}" + (f" bake {format_duration(r.bake)}" if r.bake else ""))
    if r.deadline_at is not None:
        extra.append(f"deadline {clock_text(r.deadline_at)}")
    extra.append(f"started {clock_text(r.created_at)} by {r.created_by}")
    if r.finished_at is not None:
        extra.append(f"ended {clock_text(r.finished_at)}")
    lines = [head + "  " + "  ".join(extra)]
    if r.reason:
        lines.append(f"  {r.reason}")
    for p in r.progress:
        lines.append(
            f"  {p.pool}: new {p.new_ready} ready, {p.new_booting} starting, {p.new_in_use} in "
            f"use · old {p.old_free} free, {p.old_in_use} in use (draining), "
            f"{p.old_leaving} leaving, {p.old_removed} removed"
            + (f" · waiting: {p.waiting}" if p.waiting else "")
        )
    return "\n".join(lines)


def _print_plans(plans: list[PoolPlan], as_json: bool, console: Console) -> None:
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in plans], sort_keys=True))
        return
    for p in plans:
        if not p.from_versions:
            console.print(f"{p.pool}: already on v{p.to_version}: nothing to do")
            continue
        olds = ",".join(f"v{v}" for v in p.from_versions)
        end = (
            f"sessions ended at {clock_text(p.forced_end_at)}"
            if p.forced_end_at is not None
            else "nobody is kicked off"
        )
        console.print(
            f"{p.pool}: {olds} → v{p.to_version}: {p.new_desktops} new desktop(s) made first; "
            f"{p.replaced_at_once} old free replaced as soon as they are ready; "
            f"{p.wait_for_logoff} wait for a logoff; {end}"
        )
    console.print("dry run: nothing was changed")


def to_json_line(rollout: Rollout) -> str:
    doc = asdict(rollout)
    doc["schema"] = SCHEMA
    doc["state"] = rollout.state.value
    doc["progress"] = [{**asdict(p), "old_removed": p.old_removed} for p in rollout.progress]
    return json.dumps(doc, sort_keys=True)


def exit_code(rollout: Rollout) -> int:
    """`--wait`: 0 done, 4 anything else it ended in (failed, rolled back, cancelled)."""
    return 0 if rollout.state is RolloutState.DONE else 4


def clock_text(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
