"""`imagepipe keep`: run the pool keeper (the systemd service)."""

from __future__ import annotations

import typer

from imagepipe.app.keeping import fail_if_failed
from imagepipe.app.leadership import ElectionLoop, election_for, pass_once
from imagepipe.app.metrics import KeeperMetrics, serve
from imagepipe.app.notify import SystemdNotifier
from imagepipe.app.reload import Reloader, load_keeper_config
from imagepipe.app.service import KeeperService, service_signals
from imagepipe.cli.context import cli_context


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
    load balancer in step. Stops cleanly on SIGTERM or Ctrl-C (desktops keep running);
    SIGHUP re-reads the settings and pool files. Under systemd (Type=notify) it reports
    READY, STATUS and watchdog pings; with keeper.metrics set it serves Prometheus metrics."""
    cli = cli_context(ctx)
    config = load_keeper_config(cli.config, pool)
    runtime = cli.runtime(config.settings)
    try:
        keeper = runtime.keeper(list(config.specs), other_pools=config.other_pools)
        election = election_for(config.settings, runtime.store, runtime.clock)
        if once:
            report = keeper.run_pass() if election is None else pass_once(keeper, election)
            fail_if_failed(report)
            return
        address = config.settings.keeper.metrics
        metrics = KeeperMetrics() if address else None
        server = serve(metrics, address) if metrics is not None and address else None
        notifier = SystemdNotifier.from_environment()
        service = KeeperService(
            notifier, metrics=metrics, reloader=Reloader(cli.config, pool, config)
        )
        keeper.hooks = service
        loop = None
        if election is not None:  # a shared state: the keepers elect a leader
            keeper.lead = election
            loop = ElectionLoop(election, notifier, on_change=keeper.wake, metrics=metrics)
            loop.start()
        try:
            with service_signals(keeper, service):
                keeper.run()
        finally:
            if loop is not None:
                loop.stop()
                loop.election.release()
            if server is not None:
                server.shutdown()
            notifier.close()
    finally:
        runtime.close()
