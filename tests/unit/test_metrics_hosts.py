"""Prometheus metrics with several hosts: a bounded `host` label (the settings' host names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from imagepipe.app.metrics import KeeperMetrics
from imagepipe.app.status import CloneStatus, HostStatus, PoolStatus
from imagepipe.pool.keeper import PassReport
from imagepipe.pool.model import HostState


def clone(name: str, host: str, state: str) -> CloneStatus:
    return CloneStatus(
        name=name,
        slot=int(name[-1]),
        version=1,
        state=state,
        power="running" if state != "unseen" else None,
        display=None,
        balancer=None,
        connections=0,
        client=None,
        users=(),
        since=None,
        failures=0,
        host=host,
    )


def test_host_metrics_say_which_host_is_up_and_its_desktops_by_state() -> None:
    registry = CollectorRegistry()
    metrics = KeeperMetrics(registry)
    clones = (
        clone("lab-0", "h1", "free"),
        clone("lab-1", "h1", "in_use"),
        clone("lab-2", "h2", "unseen"),
        clone("lab-3", "gone", "free"),  # not a configured host: no series of its own
    )
    pool = PoolStatus("lab", "tiny", 1, 2, 1, 1, 3, 4, 0, None, None, clones)
    snapshot = HostStatus("imagepipe.status/1", 100.0, (pool,), (), None)
    hosts = (HostState("h1", True, None), HostState("h2", False, 90.0))
    metrics.record_pass(PassReport(at=100.0, hosts=hosts), snapshot, 0.1, 100.0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("imagepipe_host_up", host="h1") == 1.0
    assert value("imagepipe_host_up", host="h2") == 0.0
    assert value("imagepipe_host_desktops", host="h1", state="free") == 1.0
    assert value("imagepipe_host_desktops", host="h1", state="in_use") == 1.0
    assert value("imagepipe_host_desktops", host="h2", state="unseen") == 1.0
    assert value("imagepipe_host_desktops", host="gone", state="free") is None


def test_a_host_whose_breaker_is_open_shows_in_the_metrics_until_its_cooldown() -> None:
    registry = CollectorRegistry()
    metrics = KeeperMetrics(registry)
    snapshot = HostStatus("imagepipe.status/1", 100.0, (), (), None)
    hosts = (HostState("h1", True, None), HostState("h2", True, None))
    report = PassReport(at=100.0, hosts=hosts, host_breakers={"h2": 700.0})
    metrics.record_pass(report, snapshot, 0.1, 100.0)
    assert registry.get_sample_value("imagepipe_host_breaker_open", {"host": "h1"}) == 0.0
    assert registry.get_sample_value("imagepipe_host_breaker_open", {"host": "h2"}) == 1.0
