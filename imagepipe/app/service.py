"""The keeper as a service: systemd notify and watchdog, reload on SIGHUP, metrics.

    service = KeeperService(notifier, metrics=..., reloader=...)
    keeper.hooks = service
    with service_signals(keeper, service):
        keeper.run()

The hooks run in the keeper's own loop (imagepipe.pool.keeper.KeeperHooks):

- `observed`: once the first pass has observed every pool and the balancer answered, READY=1
  with a one-line STATUS; every pass pings the watchdog (WATCHDOG=1) when the unit has
  WatchdogSec=. A keeper whose loop wedges stops pinging and systemd restarts it.
- `after_pass`: STATUS with the new summary, metrics.
- `before_pass`: a reload asked for by SIGHUP (RELOADING=1, re-read, READY=1 again).
SIGTERM / SIGINT: STOPPING=1, then the keeper stops (actions in flight finish).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from imagepipe.app.bootstrap import keeper_options
from imagepipe.app.hosts import apply_hosts, sessions_on
from imagepipe.app.metrics import KeeperMetrics
from imagepipe.app.notify import SystemdNotifier
from imagepipe.app.reload import Reloader
from imagepipe.app.status import HostStatus, build_status, load_records
from imagepipe.errors import ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.observe import HostObservation

log = logging.getLogger(__name__)


class KeeperService:
    """KeeperHooks for `imagepipe keep`: what systemd and Prometheus are told."""

    def __init__(
        self,
        notifier: SystemdNotifier,
        *,
        metrics: KeeperMetrics | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.reloader = reloader
        self.ready = False
        self._reload = threading.Event()

    # ---- requests from signal handlers ------------------------------------------------

    def request_reload(self, keeper: Keeper) -> None:
        """Reload before the next pass, which starts now. Safe in a signal handler."""
        self._reload.set()
        keeper.wake()

    def stop(self, keeper: Keeper) -> None:
        self.notifier.stopping()
        keeper.stop()

    # ---- KeeperHooks ------------------------------------------------------------------

    def before_pass(self, keeper: Keeper) -> None:
        if not self._reload.is_set():
            return
        self._reload.clear()
        if self.reloader is None:
            return
        self.notifier.reloading()
        specs = list(keeper.specs.values())
        config = self.reloader.reload(lambda host: sessions_on(keeper.store, specs, host))
        if config is not None:
            apply_hosts(keeper, config.settings.host_specs())
            keeper.reconfigure(config.specs, config.other_pools, keeper_options(config.settings))
        self.notifier.ready(f"reloaded; {len(keeper.specs)} pool(s)")

    def observed(self, keeper: Keeper, host: HostObservation) -> None:
        self.notifier.watchdog()
        if self.ready or host.balancer_error is not None or host.unobservable:
            return
        self.ready = True
        pools = ", ".join(keeper.specs) or "none"
        self.notifier.ready(f"pools observed ({pools}), balancer up; reconciling")
        log.info("keeper ready", extra=fields(pools=pools))

    def after_pass(self, keeper: Keeper, report: PassReport | None, seconds: float) -> None:
        """Metrics first, then STATUS and the watchdog ping: whoever hears the STATUS of a
        pass can scrape that pass's metrics."""
        now = keeper.clock.now()
        snapshot = None
        if report is not None:
            try:
                snapshot = self._snapshot(keeper, report, now)
            except ImagepipeError as exc:
                # the state store stopped answering since the pass (a database outage): the
                # keeper goes on; its own election says the store is unreachable, once
                log.warning(
                    "pass status not read; retrying next pass", extra=fields(error=str(exc))
                )
        if self.metrics is not None:
            self.metrics.record_pass(report, snapshot, seconds, now)
        if self.notifier.enabled:
            self.notifier.status(summary(snapshot) if snapshot else "last pass failed; retrying")
        self.notifier.watchdog()

    def _snapshot(self, keeper: Keeper, report: PassReport, now: float) -> HostStatus:
        specs = list(keeper.specs.values())
        records, downs = load_records(keeper.store, specs, now)
        return build_status(specs, report.observation, records, now, downs)


def summary(snapshot: HostStatus) -> str:
    """One line for systemd's STATUS= (`systemctl status` shows it)."""
    parts = []
    for pool in snapshot.pools:
        text = f"{pool.name} {pool.free}/{pool.target_free} free, {pool.in_use} in use"
        if pool.going_down:
            text += f", going down ({pool.total} left)"
        elif pool.note:
            text += " (cannot make desktops)"
        parts.append(text)
    line = "; ".join(parts) or "no pools"
    if snapshot.balancer_error:
        line += "; balancer down"
    down = [i.name for i in snapshot.balancer_instances if not i.reachable]
    if down and not snapshot.balancer_error:
        line += f"; balancer {', '.join(down)} unreachable"
    return line


@contextmanager
def service_signals(keeper: Keeper, service: KeeperService) -> Iterator[None]:
    """SIGTERM / SIGINT stop the keeper (STOPPING=1 first); SIGHUP reloads. The previous
    handlers come back afterwards."""

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop(keeper)

    def reload(signum: int, frame: FrameType | None) -> None:
        service.request_reload(keeper)

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, stop),
            (signal.SIGINT, stop),
            (signal.SIGHUP, reload),
        )
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
