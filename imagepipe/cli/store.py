"""`imagepipe store copy --to postgresql://...`: move the SQLite state into PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from imagepipe.cli.context import cli_context
from imagepipe.errors import BadInputError

app = typer.Typer(help="The state store: copy it into PostgreSQL.", no_args_is_help=True)


@app.callback()
def store() -> None:
    """The keeper's state store (SQLite in state_db, or PostgreSQL in state)."""
    # A callback makes `store` a command group, so `copy` keeps its name.


@app.command()
def copy(
    ctx: typer.Context,
    to: str = typer.Option(
        ..., "--to", help="The empty PostgreSQL database: postgresql://user@host:port/db."
    ),
    password_file: Path | None = typer.Option(
        None,
        "--password-file",
        help="File whose first line is the database password (else the settings' "
        "state_password_file, else PGPASSWORD or ~/.pgpass).",
    ),
) -> None:
    """Copy the SQLite state (state_db) into an empty PostgreSQL database and verify it.

    Stop the keeper first. Refuses while a keeper runs on the state, and a target that holds
    any state. Afterwards set `state:` to the URL in the settings and start the keeper.
    """
    from imagepipe.app.bootstrap import copy_state, read_password_file, state_password
    from imagepipe.config.values import parse_state_dsn

    settings = cli_context(ctx).settings()
    try:
        parse_state_dsn(to)
    except ValueError as exc:
        raise BadInputError(f"--to: {exc}") from None
    password = (
        read_password_file(password_file, file=None, key="--password-file")
        if password_file is not None
        else state_password(settings)
    )
    report = copy_state(settings, to, password=password, now=time.time())
    for table in report.tables:
        typer.echo(f"{table.table}: {table.rows} rows, sha256 {table.digest[:16]} (verified)")
    total = sum(t.rows for t in report.tables)
    typer.echo(
        f"copied {total} rows from {report.source} to {report.target} and read them back "
        f"equal; now set `state: {report.target}` in the settings and start the keeper"
    )
