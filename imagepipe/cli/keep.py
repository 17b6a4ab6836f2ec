"""`imagepipe keep`: run the pool keeper (the systemd service)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

import typer

from imagepipe.cli.app import GLOBALS
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.pool.executor import ExecutorSettings, SystemClock
from imagepipe.pool.keeper import Keeper, KeeperOptions, PassReport
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.wiring import Runtime, build_runtime


def keep(
    pool: list[str] = typer.Option(
        [], "--pool", "-p", help="Keep only this pool (repeatable); default: every pool."
    ),
    once: bool = typer.Option(
        False, "--once", help="One pass: reconcile, wait for its actions, exit (4 if any failed)."
    ),
) -> None:
    """Keep the pools' desktops ready: make, boot, recycle and remove clones, and keep the
    load balancer in step. Stops cleanly on SIGTERM or Ctrl-C; desktops keep running."""
    settings = load_settings(GLOBALS.config)
    configured = load_pools([settings.pools_dir])
    specs = select_pools(configured, pool)
    others = [s.name for s in configured if s not in specs]
    runtime = build_runtime(settings)
    try:
        keeper = make_keeper(runtime, specs, other_pools=others)
        if once:
            report = keeper.run_pass()
            fail_if_failed(report)
            return
        with stop_on_signals(keeper):
            keeper.run()
    finally:
        runtime.close()


def select_pools(specs: Sequence[PoolSpec], wanted: Sequence[str]) -> list[PoolSpec]:
    if not wanted:
        return list(specs)
    known = {s.name: s for s in specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise BadInputError(f"no pool named {', '.join(unknown)} (configured pools: {names})")
    return [known[w] for w in wanted]


def keeper_options(settings: Settings) -> KeeperOptions:
    cfg = settings.keeper
    return KeeperOptions(
        tick=cfg.tick,
        executor=ExecutorSettings(parallel=cfg.parallel, action_timeout=cfg.action_timeout),
    )


def make_keeper(
    runtime: Runtime, specs: Sequence[PoolSpec], *, other_pools: Sequence[str] = ()
) -> Keeper:
    return Keeper(
        hypervisor=runtime.hypervisor,
        balancer=runtime.balancer,
        store=runtime.store,
        images=runtime.registry,
        specs=specs,
        clock=SystemClock(),
        settings=keeper_options(runtime.settings),
        other_pools=other_pools,
    )


def fail_if_failed(report: PassReport) -> None:
    failed = report.execution.failed
    if failed:
        first = failed[0]
        raise OperationFailedError(
            f"{len(failed)} of {len(report.execution.outcomes)} actions failed; first: "
            f"{first.action.kind} {first.action.clone}: {first.error}"
        )
    if report.not_planned:
        pool, why = next(iter(report.not_planned.items()))
        raise OperationFailedError(f"pool {pool} was not reconciled: {why}")
    for pool, why in report.notes.items():
        observed = report.observation.pools.get(pool)
        if observed is None or observed.target_version is None:  # no version to run at all;
            # a base that is only busy right now (being updated) is not a failure
            raise OperationFailedError(f"pool {pool} cannot make desktops: {why}")


class stop_on_signals:
    """SIGTERM and SIGINT call keeper.stop(); the previous handlers come back afterwards."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.keeper.stop()

    def __enter__(self) -> stop_on_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
