"""The `imagepipe` command: global options, the command table, error handling.

Each command (or command group) lives in its own module under imagepipe/cli/ and is named in
COMMANDS with a one-line summary. Only the invoked command's module is imported (it imports
the use cases and adapters it needs, and those build adapters only when they run); the list
in `imagepipe --help` and the completion of command names come from the table alone.
User-facing errors (ImagepipeError) become one line on stderr and a documented exit code.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

from imagepipe import __version__
from imagepipe.errors import ImagepipeError
from imagepipe.record import Record

if TYPE_CHECKING:
    from typer import _click as click  # typer's own click

    from imagepipe.app.bootstrap import Adapters


class Command(Record, kw_only=False):
    """A row of the command table: where the command is and what `--help` says of it."""

    module: str
    attribute: str  # a typer.Typer (a command group) or a command function
    summary: str

    def stub(self, name: str) -> click.Command:
        """The command as listed: its name and summary, nothing imported."""
        return TyperCommand(name, help=self.summary, short_help=self.summary)

    def load(self, name: str) -> click.Command:
        found = getattr(importlib.import_module(self.module), self.attribute)
        if isinstance(found, typer.Typer):
            command: click.Command = typer.main.get_group(found)
        else:
            # completion is the root's (`imagepipe --install-completion`), not each command's
            single = typer.Typer(add_completion=False)
            single.command(name=name)(found)
            command = typer.main.get_command(single)
        command.name = name
        return command


COMMANDS = {
    "build": Command(
        "imagepipe.cli.build", "build", "Build IMAGE with Packer and register it as a new version."
    ),
    "simulate": Command(
        "imagepipe.cli.simulate",
        "simulate",
        "Simulate days of logins on POOL_FILE with the real planner and report how long users "
        "waited, how many desktops sat idle, and how many operations it took.",
    ),
    "keep": Command(
        "imagepipe.cli.keep",
        "keep",
        "Keep the pools' desktops ready: make, boot, recycle and remove clones, and keep the "
        "load balancer in step.",
    ),
    "status": Command(
        "imagepipe.cli.status",
        "status",
        "Show each pool's sizes and each desktop's state, display, balancer state and session.",
    ),
    "rollout": Command(
        "imagepipe.cli.rollout",
        "rollout",
        "Move every pool of IMAGE (or the named pools) onto a new version, blue/green: new "
        "desktops are ready before old free ones go; old desktops in use take no new user and "
        "are removed when their user logs off (or at --deadline).",
    ),
    "demo": Command(
        "imagepipe.cli.demo",
        "demo",
        "Build the tiny image, start a demo pool of 3 desktops behind 127.0.0.1:5999, and keep "
        "it until Ctrl-C (the desktops keep running afterwards).",
    ),
    "doctor": Command(
        "imagepipe.cli.doctor",
        "doctor",
        "Check settings, pool files, Packer, the hypervisor, the balancer, the state database "
        "and the registry on this host, without changing anything.",
    ),
    "web": Command(
        "imagepipe.cli.web",
        "web",
        "Serve desktops in the browser on web.bind: noVNC's page and a websocket whose only "
        "target is HAProxy, which gets each browser user's address by the PROXY protocol.",
    ),
    "pools": Command("imagepipe.cli.pools", "app", "Pool files: validate them."),
    "images": Command("imagepipe.cli.images", "app", "Registered image versions and channels."),
    "store": Command("imagepipe.cli.store", "app", "The state store: copy it into PostgreSQL."),
    "hosts": Command(
        "imagepipe.cli.hosts",
        "app",
        "The hosts of a keeper that spans several: list them, drain one for maintenance.",
    ),
}


class LazyGroup(TyperGroup):
    """The root group over COMMANDS. Every command starts as its stub (name and summary), so
    help, completion of a command name and typo suggestions import nothing; a command is
    imported when it is invoked, or its own options are completed."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands.update({name: row.stub(name) for name, row in COMMANDS.items()})
        self._loaded: set[str] = set()
        self._listing = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        row = COMMANDS.get(cmd_name)
        if row is not None and not self._listing and cmd_name not in self._loaded:
            self.commands[cmd_name] = row.load(cmd_name)
            self._loaded.add(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[Any]:
        self._listing = True
        try:
            return super().shell_complete(ctx, incomplete)
        finally:
            self._listing = False


app = typer.Typer(
    name="imagepipe",
    help="Build desktop images with Packer, version them, and keep warm pools of desktops.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imagepipe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="Settings file (else $IMAGEPIPE_CONFIG, ./imagepipe.yml, "
        "/etc/imagepipe/imagepipe.yml, built-in defaults).",
        envvar="IMAGEPIPE_CONFIG",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
    log_format: str = typer.Option("text", "--log-format", help="text (key=value) or json."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """imagepipe: images → versions → warm pools of desktops behind one address."""
    from imagepipe.cli.context import CliContext
    from imagepipe.log import setup_logging

    if log_format not in ("text", "json"):
        raise typer.BadParameter("expected text or json", param_hint="--log-format")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter("expected debug, info, warning or error", param_hint="--log-level")
    ctx.ensure_object(CliContext).config = config
    setup_logging(log_level, log_format)


def main(argv: list[str] | None = None, adapters: Adapters | None = None) -> int:
    """Console entry point. Returns the exit code (0 ok, 2 bad input, 3 environment, 4 failed).

    `adapters` replaces the configured hypervisor, balancer, images, registry, Packer or clock
    (tests, embedders).
    """
    from imagepipe.cli.context import CliContext

    obj = CliContext(adapters=adapters) if adapters is not None else CliContext()
    try:
        app(args=argv, prog_name="imagepipe", obj=obj)
    except ImagepipeError as exc:
        typer.echo(f"imagepipe: error: {exc}", err=True)
        return exc.exit_code
    except SystemExit as exc:  # typer always ends with one; usage errors give 2
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        typer.echo("imagepipe: interrupted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
