"""`imagepipe build`: render an image's templates, run Packer with live progress, register."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from imagepipe.cli.context import cli_context
from imagepipe.errors import EXIT_ENVIRONMENT, EXIT_FAILED, BadInputError
from imagepipe.images.build import (
    BuildResult,
    ChangedResult,
    Progress,
    build_changed,
    build_image,
)
from imagepipe.images.progress import JsonProgress, PlainProgress, SpinnerProgress
from imagepipe.images.variables import parse_assignments


def build(
    ctx: typer.Context,
    image: str | None = typer.Argument(None, help="Image folder under packer/, e.g. tiny."),
    var: list[str] | None = typer.Option(None, "--var", help="NAME=VALUE, repeatable."),
    var_file: list[Path] | None = typer.Option(
        None, "--var-file", help="YAML/JSON file of NAME: VALUE, repeatable."
    ),
    only: list[str] | None = typer.Option(None, "--only", help="Packer build name, repeatable."),
    force: bool = typer.Option(False, "--force", help="Build even when nothing changed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Render and validate; build nothing."),
    keep_build_dir: bool = typer.Option(
        False,
        "--keep-build-dir",
        help="Keep the build directory (logs, rendered files without a secret).",
    ),
    debug_log: bool = typer.Option(
        False,
        "--debug-log",
        help="Have Packer write its debug log (PACKER_LOG=1) to packer-debug.log in the build "
        "directory, beside packer.log (what Packer printed). Also on when PACKER_LOG is set.",
    ),
    changed: bool = typer.Option(
        False, "--changed", help="Build every image whose inputs changed (what CI runs)."
    ),
    skip_unavailable: bool = typer.Option(
        False, "--skip-unavailable", help="With --changed: images this host cannot build are OK."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
) -> None:
    """Build IMAGE with Packer and register it as a new version.

    Skipped with "up to date: IMAGE vN" when a version with the same inputs exists (--force
    builds anyway). Ctrl-C stops Packer cleanly and registers nothing.
    Exit codes: 0 built or up to date; 2 bad input; 3 this host lacks what the image needs;
    4 the build failed; 130 interrupted. With --changed: 4 if any image failed, else 3 if any
    image cannot be built here (unless --skip-unavailable), else 0.
    """
    cli = cli_context(ctx)
    with cli.runtime(cli.settings()) as runtime, _progress(as_json) as progress:
        if changed:
            if image or var or var_file or only or force or dry_run:
                raise BadInputError(
                    "--changed builds every changed image: give no IMAGE or options"
                )
            results = build_changed(runtime, debug_log=debug_log, progress=progress)
        else:
            if image is None:
                raise BadInputError("name an image (imagepipe build tiny) or use --changed")
            result = build_image(
                runtime,
                image,
                variables=parse_assignments(var or []),
                var_files=var_file or [],
                only=only or [],
                force=force,
                dry_run=dry_run,
                keep_build_dir=keep_build_dir,
                debug_log=debug_log,
                progress=progress,
            )
    if changed:
        _report_changed(results, as_json, skip_unavailable)
    else:
        _report(result, as_json)


@contextlib.contextmanager
def _progress(as_json: bool) -> Iterator[Progress]:
    if as_json:
        yield JsonProgress()
    elif sys.stderr.isatty():
        with SpinnerProgress() as spinner:
            yield spinner
    else:
        yield PlainProgress()


def _report(result: BuildResult, as_json: bool) -> None:
    if as_json:
        record = result.record
        doc = {
            "event": "result",
            "image": result.image,
            "outcome": result.outcome.value,
            "version": record.version if record else None,
            "fingerprint": result.fingerprint,
            "message": result.message,
        }
        typer.echo(json.dumps(doc))
    else:
        typer.echo(result.message)


def _report_changed(results: list[ChangedResult], as_json: bool, skip_unavailable: bool) -> None:
    for item in results:
        if as_json:
            doc = {
                "event": "result",
                "image": item.image,
                "outcome": item.outcome,
                "version": item.version,
                "message": item.message,
            }
            typer.echo(json.dumps(doc))
        else:
            typer.echo(f"{item.image}: {item.outcome}: {item.message}")
    outcomes = {item.outcome for item in results}
    if "failed" in outcomes:
        raise typer.Exit(EXIT_FAILED)
    if "unavailable" in outcomes and not skip_unavailable:
        raise typer.Exit(EXIT_ENVIRONMENT)
