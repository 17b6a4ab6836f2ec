"""The keeper's Prometheus metrics (`keeper.metrics: 127.0.0.1:9464`), with the official
client library.

Two kinds:

- what the host looks like after the last pass (desktops by state and version, free target,
  failures, breaker, balancer backends by state, rollout progress, pools going down): a
  collector that renders the last status snapshot, so a desktop or a version that is gone
  leaves no stale series behind;
- what happened (actions by kind and outcome with their durations, logins, pass durations,
  the last successful pass): counters and histograms.

Labels are bounded: pool (configured pools), state (the planner's states), version (the
versions a pool runs, a handful during a rollout), kind (action types), outcome (ok/failed).
Never a user, client address or clone name.

Logins: a desktop that turns `in_use` is a login. It "found a ready desktop" when the pool had
a free desktop in the pass before; otherwise its wait is measured from the moment the pool
ran out of free desktops (an upper bound: the keeper cannot see when a user started waiting
at the balancer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagepipe.app.status import IN_USE, HostStatus, PoolStatus
from imagepipe.errors import EnvironmentMissingError
from imagepipe.log import fields
from imagepipe.pool.keeper import PassReport
from imagepipe.pool.model import BackendState, CloneState

log = logging.getLogger(__name__)

ACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_IN_USE = {str(s) for s in IN_USE}


class KeeperMetrics:
    """The keeper's metrics in their own registry; `record_pass` after every pass."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        self._snapshot: HostStatus | None = None
        self._hosts: dict[str, bool] = {}  # several hosts: connected, as of the last pass
        self._breakers: dict[str, float] = {}  # hosts whose breaker is open -> until
        self._previous: dict[str, dict[str, str]] = {}  # pool -> clone -> state, last pass
        self._free_before: dict[str, int] = {}  # pool -> free desktops in the last pass
        self._starved_since: dict[str, float] = {}  # pool -> when it ran out of free desktops
        self.actions = Counter(
            "imagepipe_actions",
            "Actions the keeper ran, by kind and outcome.",
            ["pool", "kind", "outcome"],
            registry=r,
        )
        self.action_seconds = Histogram(
            "imagepipe_action_duration_seconds",
            "How long actions took, by kind and outcome.",
            ["kind", "outcome"],
            buckets=ACTION_BUCKETS,
            registry=r,
        )
        self.logins = Counter(
            "imagepipe_logins",
            "Sessions that began on a desktop; found_ready=false when the pool had no free "
            "desktop just before.",
            ["pool", "found_ready"],
            registry=r,
        )
        self.login_wait = Histogram(
            "imagepipe_login_wait_seconds",
            "For logins that found no ready desktop: time since the pool ran out of free "
            "desktops (an upper bound of the wait).",
            ["pool"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.pass_seconds = Histogram(
            "imagepipe_keeper_pass_duration_seconds",
            "Duration of one keeper pass (observe, plan, execute).",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.passes = Counter(
            "imagepipe_keeper_passes", "Keeper passes, by outcome.", ["outcome"], registry=r
        )
        self.last_success = Gauge(
            "imagepipe_keeper_last_success_timestamp_seconds",
            "When the last pass that reconciled every pool without a failed action ended.",
            registry=r,
        )
        self.leading = Gauge(
            "imagepipe_keeper_leading",
            "1 while this keeper leads (holds the shared state's lease), 0 while it waits; "
            "only with a PostgreSQL state.",
            registry=r,
        )
        self.store_reachable = Gauge(
            "imagepipe_state_store_reachable",
            "0 while the shared state database does not answer (the keeper changes nothing); "
            "only with a PostgreSQL state.",
            registry=r,
        )
        r.register(_SnapshotCollector(self))

    # ---- recording -------------------------------------------------------------------

    def record_role(self, *, leading: bool, reachable: bool) -> None:
        """After each step of the lease loop (imagepipe.app.leadership.ElectionLoop)."""
        self.leading.set(1 if leading else 0)
        self.store_reachable.set(1 if reachable else 0)

    def record_pass(
        self,
        report: PassReport | None,
        snapshot: HostStatus | None,
        seconds: float,
        now: float,
    ) -> None:
        """One pass: its duration, its actions, and the host as it was observed."""
        self.pass_seconds.observe(seconds)
        if report is None:
            self.passes.labels("error").inc()
            return
        ok = report.ok and report.observation.balancer_error is None
        self.passes.labels("ok" if ok else "failed").inc()
        if ok:
            self.last_success.set(now)
        for outcome in report.execution.outcomes:
            result = "ok" if outcome.ok else "failed"
            self.actions.labels(outcome.action.pool, outcome.action.kind, result).inc()
            self.action_seconds.labels(outcome.action.kind, result).observe(outcome.seconds)
        for action in report.execution.skipped:
            self.actions.labels(action.pool, action.kind, "skipped").inc()
        with self._lock:
            self._hosts = {h.name: h.connected for h in report.hosts}
            self._breakers = dict(report.host_breakers)
        if snapshot is not None:
            self._count_logins(snapshot, now)
            with self._lock:
                self._snapshot = snapshot

    def _count_logins(self, snapshot: HostStatus, now: float) -> None:
        for pool in snapshot.pools:
            before = self._previous.get(pool.name)
            states = {c.name: c.state for c in pool.clones}
            if before is not None:
                for name, state in states.items():
                    if state == CloneState.IN_USE and before.get(name) not in _IN_USE:
                        self._login(pool.name, now)
            self._previous[pool.name] = states
            self._free_before[pool.name] = pool.free
            if pool.free == 0:
                self._starved_since.setdefault(pool.name, now)
            else:
                self._starved_since.pop(pool.name, None)

    def _login(self, pool: str, now: float) -> None:
        found = self._free_before.get(pool, 0) > 0
        self.logins.labels(pool, "true" if found else "false").inc()
        if not found:
            self.login_wait.labels(pool).observe(now - self._starved_since.get(pool, now))

    def snapshot(self) -> HostStatus | None:
        with self._lock:
            return self._snapshot

    def hosts(self) -> dict[str, bool]:
        """Several hosts: each configured host, connected or lost, as of the last pass."""
        with self._lock:
            return dict(self._hosts)

    def host_breakers(self) -> dict[str, float]:
        """Several hosts: those whose circuit breaker was open in the last pass, until when."""
        with self._lock:
            return dict(self._breakers)


class _SnapshotCollector(Collector):
    """Gauges rendered from the last pass's status snapshot."""

    def __init__(self, metrics: KeeperMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snapshot = self.metrics.snapshot()
        families = _families()
        if snapshot is not None:
            families["balancer_up"].add_metric([], 0.0 if snapshot.balancer_error else 1.0)
            for instance in snapshot.balancer_instances:
                families["balancer_instance_up"].add_metric(
                    [instance.name], 1.0 if instance.reachable else 0.0
                )
            for pool in snapshot.pools:
                _pool_samples(families, pool, snapshot.generated_at)
            _host_samples(families, snapshot, self.metrics.hosts())
            breakers = self.metrics.host_breakers()
            for host in sorted(self.metrics.hosts()):
                families["host_breaker"].add_metric([host], 1.0 if host in breakers else 0.0)
        return families.values()


def _families() -> dict[str, GaugeMetricFamily]:
    def g(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    return {
        "desktops": g(
            "imagepipe_desktops",
            "Desktops by state and image version.",
            ["pool", "state", "version"],
        ),
        "free_target": g(
            "imagepipe_free_target", "Free ready desktops the pool wants now.", ["pool"]
        ),
        "free": g("imagepipe_free_desktops", "Free ready desktops now.", ["pool"]),
        "max": g("imagepipe_pool_max", "The pool's size.max.", ["pool"]),
        "failures": g(
            "imagepipe_pool_failures", "Consecutive failed creates/starts in the pool.", ["pool"]
        ),
        "breaker": g(
            "imagepipe_breaker_open",
            "1 while the pool's circuit breaker stops new desktops.",
            ["pool"],
        ),
        "backends": g(
            "imagepipe_balancer_backends", "Balancer entries by state.", ["pool", "state"]
        ),
        "version": g("imagepipe_pool_version", "The image version the pool runs.", ["pool"]),
        "rollout": g(
            "imagepipe_rollout_progress_ratio",
            "Share of the pool's desktops on the version it runs (1 = rollout done).",
            ["pool"],
        ),
        "down": g(
            "imagepipe_pool_going_down",
            "1 while the pool is being taken down (imagepipe pools down).",
            ["pool"],
        ),
        "balancer_up": g(
            "imagepipe_balancer_up", "1 when the balancer answered in the last pass.", []
        ),
        # several hosts only; `host` takes the settings' host names, so it stays bounded
        "host_up": g(
            "imagepipe_host_up",
            "1 while the keeper reaches the host, 0 while it is lost.",
            ["host"],
        ),
        "host_breaker": g(
            "imagepipe_host_breaker_open",
            "1 while the host's circuit breaker keeps new desktops off it.",
            ["host"],
        ),
        "host_desktops": g(
            "imagepipe_host_desktops", "Desktops on each host by state.", ["host", "state"]
        ),
        "balancer_instance_up": g(
            "imagepipe_balancer_instance_up",
            "Of several balancer instances kept in step: 1 when this one answered in the last "
            "pass.",
            ["instance"],
        ),
    }


def _host_samples(
    families: dict[str, GaugeMetricFamily], snapshot: HostStatus, hosts: dict[str, bool]
) -> None:
    for host, connected in sorted(hosts.items()):
        families["host_up"].add_metric([host], 1.0 if connected else 0.0)
    counts: dict[tuple[str, str], int] = {}
    for pool in snapshot.pools:
        for clone in pool.clones:
            if clone.host and clone.host in hosts:
                key = (clone.host, clone.state)
                counts[key] = counts.get(key, 0) + 1
    for (host, state), value in sorted(counts.items()):
        families["host_desktops"].add_metric([host, state], value)


@dataclass(frozen=True)
class _Count:
    state: str
    version: str


def _pool_samples(families: dict[str, GaugeMetricFamily], pool: PoolStatus, now: float) -> None:
    name = pool.name
    counts: dict[_Count, int] = {}
    backends = {str(s): 0 for s in BackendState}
    on_target = existing = 0
    for clone in pool.clones:
        key = _Count(clone.state, "" if clone.version is None else str(clone.version))
        counts[key] = counts.get(key, 0) + 1
        if clone.balancer is not None:
            backends[clone.balancer] = backends.get(clone.balancer, 0) + 1
        if clone.power is not None:
            existing += 1
            on_target += clone.version == pool.version
    for key, value in sorted(counts.items(), key=lambda kv: (kv[0].state, kv[0].version)):
        families["desktops"].add_metric([name, key.state, key.version], value)
    families["free_target"].add_metric([name], pool.target_free)
    families["free"].add_metric([name], pool.free)
    families["max"].add_metric([name], pool.max)
    families["failures"].add_metric([name], pool.failures)
    breaker_open = pool.breaker_open_until is not None and pool.breaker_open_until > now
    families["breaker"].add_metric([name], 1.0 if breaker_open else 0.0)
    for state, value in backends.items():
        families["backends"].add_metric([name, state], value)
    if pool.version is not None:
        families["version"].add_metric([name], pool.version)
    families["rollout"].add_metric([name], on_target / existing if existing else 1.0)
    families["down"].add_metric([name], 1.0 if pool.going_down else 0.0)


def serve(metrics: KeeperMetrics, address: str) -> WSGIServer:
    """Serve /metrics on host:port in a daemon thread; shutdown() the server to stop."""
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=metrics.registry
        )
    except OSError as exc:
        raise EnvironmentMissingError(
            f"cannot serve metrics on {address}: {exc.strerror}; set keeper.metrics to a free "
            "address in the settings file (or remove it)"
        ) from exc
    log.info("metrics served", extra=fields(address=f"http://{address}/metrics"))
    return server
