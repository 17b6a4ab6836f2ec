"""`imagepipe keep`: run the pool keeper (the systemd service)."""

from __future__ import annotations

import typer

from imagepipe.app.keeping import fail_if_failed, select_pools, stop_on_signals
from imagepipe.cli.context import cli_context
from imagepipe.config import load_pools


def keep(
    ctx: typer.Context,
    pool: list[str] = typer.Option(
        [], "--pool", "-p", help="Keep only this pool (repeatable); default: every pool."
    ),
    once: bool = typer.Option(
        False, "--once", help="One pass: reconcile, wait for its actions, exit (4 if any failed)."
    ),
) -> None:
    """Keep the pools' desktops ready: make, boot, recycle and remove clones, and keep the
    load balancer in step. Stops cleanly on SIGTERM or Ctrl-C; desktops keep running."""
    cli = cli_context(ctx)
    settings = cli.settings()
    configured = load_pools([settings.pools_dir])
    specs = select_pools(configured, pool)
    others = [s.name for s in configured if s not in specs]
    runtime = cli.runtime(settings)
    try:
        keeper = runtime.keeper(specs, other_pools=others)
        if once:
            report = keeper.run_pass()
            fail_if_failed(report)
            return
        with stop_on_signals(keeper):
            keeper.run()
    finally:
        runtime.close()
