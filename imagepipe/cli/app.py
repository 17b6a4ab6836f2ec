"""The `imagepipe` command: global options, subcommand registration, error handling.

Each command group lives in its own module under imagepipe/cli/ and is registered here.
User-facing errors (ImagepipeError) become one line on stderr and a documented exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from imagepipe import __version__
from imagepipe.app.bootstrap import Adapters
from imagepipe.cli.context import CliContext
from imagepipe.errors import ImagepipeError
from imagepipe.log import setup_logging

app = typer.Typer(
    name="imagepipe",
    help="Build desktop images with Packer, version them, and keep warm pools of desktops.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
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
    if log_format not in ("text", "json"):
        raise typer.BadParameter("expected text or json", param_hint="--log-format")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter("expected debug, info, warning or error", param_hint="--log-level")
    ctx.ensure_object(CliContext).config = config
    setup_logging(log_level, log_format)


_registered: list[bool] = []


def _register() -> None:
    # Imported here, not at module top, so `imagepipe --help` stays fast and each group
    # lives in its own file. Once per process: main() called again (tests, embedders) must
    # not add every group again, or each call gets slower than the one before.
    if _registered:
        return
    _registered.append(True)
    from imagepipe.cli import build, demo, doctor, images, keep, pools, rollout, simulate, status
    from imagepipe.cli import hosts as hosts_cli
    from imagepipe.cli import store as store_cli
    from imagepipe.cli import web as web_cli

    app.add_typer(pools.app, name="pools")
    app.add_typer(images.app, name="images")
    app.add_typer(store_cli.app, name="store")
    app.add_typer(hosts_cli.app, name="hosts")
    app.command(name="build")(build.build)
    app.command(name="simulate")(simulate.simulate)
    app.command(name="keep")(keep.keep)
    app.command(name="status")(status.status)
    app.command(name="rollout")(rollout.rollout)
    app.command(name="demo")(demo.demo)
    app.command(name="doctor")(doctor.doctor)
    app.command(name="web")(web_cli.web)


def main(argv: list[str] | None = None, adapters: Adapters | None = None) -> int:
    """Console entry point. Returns the exit code (0 ok, 2 bad input, 3 environment, 4 failed).

    `adapters` replaces the configured hypervisor, balancer, images or clock (tests, embedders).
    """
    _register()
    obj = CliContext(adapters=adapters or Adapters())
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
