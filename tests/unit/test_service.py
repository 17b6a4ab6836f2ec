"""The keeper as a systemd service: notify messages on a real NOTIFY_SOCKET datagram socket,
reload (SIGHUP's work), and the Prometheus endpoint scraped over HTTP, over the fakes."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagepipe import schema
from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.app.metrics import KeeperMetrics, serve
from imagepipe.app.notify import SystemdNotifier
from imagepipe.app.reload import Reloader, load_keeper_config
from imagepipe.app.service import KeeperService
from imagepipe.app.status import CloneStatus, HostStatus, PoolStatus
from imagepipe.cli.app import main
from imagepipe.errors import StoreUnavailableError
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.model import CloneState, InstanceHealth
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages
from tests.host import free_port

LAB = """\
name: lab
image: tiny
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
"""
CLASS = """\
name: class
image: tiny
size: {initial: 1, free: 1, max: 2}
display: {port_range: 5910-5911}
"""


@dataclass
class Host:
    config: Path
    hv: FakeHypervisor
    lb: FakeBalancer
    clock: FakeClock
    runtime: Runtime

    @property
    def pools(self) -> Path:
        return self.config.parent / "pools"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(LAB)
    config = tmp_path / "imagepipe.yml"
    config.write_text("pools_dir: pools\nstate_db: state.db\nrun_dir: run\nkeeper: {tick: 1s}\n")
    clock = FakeClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    settings = load_keeper_config(config, []).settings
    runtime = bootstrap(settings, Adapters(hypervisor=hv, balancer=lb, images=images, clock=clock))
    yield Host(config, hv, lb, clock, runtime)
    runtime.close()


class NotifySocket:
    """What systemd listens on: a Unix datagram socket; collects the messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(10)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until(self, key: str) -> list[dict[str, str]]:
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if key in message:
                return seen


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def start(keeper: Keeper) -> threading.Thread:
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    return thread


def keeper_for(host: Host, service: KeeperService) -> Keeper:
    config = load_keeper_config(host.config, [])
    keeper = host.runtime.keeper(list(config.specs))
    keeper.hooks = service
    return keeper


def test_systemd_hears_ready_status_watchdog_and_stopping_on_its_notify_socket(
    host: Host, notify_socket: NotifySocket
) -> None:
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "30000000"}
    )
    service = KeeperService(notifier)
    keeper = keeper_for(host, service)
    thread = start(keeper)

    before_ready = notify_socket.until("READY")
    assert any("WATCHDOG" in m for m in before_ready)  # the loop pings from its first pass
    assert before_ready[-1]["STATUS"].startswith("pools observed (lab), balancer up")
    statuses = [m["STATUS"] for m in notify_socket.until("STATUS") if "STATUS" in m]
    service.stop(keeper)
    stopping = notify_socket.until("STOPPING")
    thread.join(10)

    assert re.fullmatch(r"lab [0-2]/2 free, 0 in use", statuses[-1])
    assert stopping[-1]["STATUS"].startswith("stopping")
    assert not thread.is_alive()
    assert notifier.watchdog_interval == 15.0


def test_an_abstract_notify_socket_name_is_reached(tmp_path: Path) -> None:
    name = f"imagepipe-test-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    try:
        assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert listener.recv(100) == b"STATUS=hi"
    finally:
        listener.close()


def test_outside_systemd_the_notifier_does_nothing_and_never_fails() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()
    gone = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not gone.ready("x")  # systemd gone: logged at debug level, the keeper goes on


def test_a_listener_that_stopped_reading_never_blocks_the_keeper(tmp_path: Path) -> None:
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(tmp_path / "deaf.sock"))
    try:
        notifier = SystemdNotifier(str(tmp_path / "deaf.sock"), watchdog_usec=1_000_000)
        began = time.monotonic()
        sent = [notifier.watchdog() for _ in range(5000)]
        took = time.monotonic() - began
    finally:
        deaf.close()

    assert sent[0] and not sent[-1]  # the queue filled up: later pings were dropped
    assert took < 5


def test_no_watchdog_pings_when_systemd_expects_them_from_another_process() -> None:
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval is None


def test_reload_picks_up_a_new_pool_file_and_a_new_tick(host: Host) -> None:
    config = load_keeper_config(host.config, [])
    service = KeeperService(SystemdNotifier(None), reloader=Reloader(host.config, [], config))
    keeper = keeper_for(host, service)
    keeper.run_pass()
    (host.pools / "class.yml").write_text(CLASS)
    host.config.write_text(host.config.read_text().replace("tick: 1s", "tick: 3s"))

    service.request_reload(keeper)
    service.before_pass(keeper)
    keeper.run_pass()

    assert sorted(keeper.specs) == ["class", "lab"] and keeper.settings.tick == 3.0
    assert sorted(host.hv.clones) == ["class-0", "lab-0", "lab-1"]


def test_a_reload_with_a_bad_file_is_refused_in_one_log_line_and_the_last_good_config_stays(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_keeper_config(host.config, [])
    service = KeeperService(SystemdNotifier(None), reloader=Reloader(host.config, [], config))
    keeper = keeper_for(host, service)
    (host.pools / "lab.yml").write_text(LAB.replace("free: 2", "free: two"))

    with caplog.at_level(logging.INFO):
        service.request_reload(keeper)
        service.before_pass(keeper)
    keeper.run_pass()

    refused = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "lab.yml:3: size.free" in str(refused[0].__dict__["imagepipe_fields"]["error"])
    assert keeper.specs["lab"].free == 2
    assert sorted(host.hv.clones) == ["lab-0", "lab-1"]


def test_a_removed_pool_file_stops_the_pools_growth_and_deletes_none_of_its_desktops(
    host: Host,
) -> None:
    config = load_keeper_config(host.config, [])
    service = KeeperService(SystemdNotifier(None), reloader=Reloader(host.config, [], config))
    keeper = keeper_for(host, service)
    for _ in range(3):
        keeper.run_pass()
    (host.pools / "lab.yml").unlink()

    service.request_reload(keeper)
    service.before_pass(keeper)
    host.hv.connect("lab-0", "192.0.2.7")  # a user: the pool would make a desktop for the next
    for _ in range(3):
        host.clock.advance(3 * 3600)  # long past shrink_after: idle desktops would go
        keeper.run_pass()

    assert sorted(host.hv.clones) == ["lab-0", "lab-1"]
    states = {n: r.state for n, r in host.runtime.store.load_pool("lab").clones.items()}
    assert states == {"lab-0": CloneState.IN_USE, "lab-1": CloneState.FREE}
    assert [b.name for b in host.lb.list_backends() if b.state == "ready"] == ["lab-1"]


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> labels -> value, parsed from the Prometheus text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def test_a_scrape_of_the_running_keeper_shows_desktops_logins_actions_and_passes(
    host: Host,
) -> None:
    metrics = KeeperMetrics()
    port = free_port()
    server = serve(metrics, f"127.0.0.1:{port}")
    service = KeeperService(SystemdNotifier(None), metrics=metrics)
    keeper = keeper_for(host, service)
    thread = start(keeper)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = scrape(port)
            if got.get("imagepipe_free_desktops", {}).get((("pool", "lab"),)) == 2:
                break
            time.sleep(0.05)
        host.lb.connect("lab-0")
        host.hv.connect("lab-0", "192.0.2.7")  # a login while two desktops were free
        while time.monotonic() < deadline:
            got = scrape(port)
            if got.get("imagepipe_logins_total"):
                break
            time.sleep(0.05)
    finally:
        keeper.stop()
        thread.join(10)
        server.shutdown()

    assert got["imagepipe_logins_total"] == {(("found_ready", "true"), ("pool", "lab")): 1.0}
    desktops = got["imagepipe_desktops"]
    assert desktops[(("pool", "lab"), ("state", "in_use"), ("version", "1"))] == 1.0
    assert got["imagepipe_free_target"][(("pool", "lab"),)] == 2.0
    assert got["imagepipe_breaker_open"][(("pool", "lab"),)] == 0.0
    assert got["imagepipe_rollout_progress_ratio"][(("pool", "lab"),)] == 1.0
    creates = got["imagepipe_actions_total"][
        (("kind", "CreateClone"), ("outcome", "ok"), ("pool", "lab"))
    ]
    assert creates >= 2
    histogram = got["imagepipe_action_duration_seconds_count"]
    assert histogram[(("kind", "CreateClone"), ("outcome", "ok"))] == creates
    assert got["imagepipe_keeper_pass_duration_seconds_count"][()] >= 2
    assert got["imagepipe_keeper_last_success_timestamp_seconds"][()] > 0
    assert got["imagepipe_balancer_up"][()] == 1.0
    labels = {k for samples in got.values() for key in samples for k, _ in key}
    assert labels <= {"pool", "state", "version", "kind", "outcome", "found_ready", "le"}


def _snapshot(at: float, states: dict[str, str]) -> HostStatus:
    clones = tuple(
        CloneStatus(
            name=name, slot=i, version=1, state=state, power="running", display=None,
            balancer="ready" if state == "free" else "drain", connections=0, client=None,
            users=(), since=None, failures=0,
        )
        for i, (name, state) in enumerate(sorted(states.items()))
    )  # fmt: skip
    free = sum(1 for s in states.values() if s == "free")
    pool = PoolStatus(
        name="lab", image="tiny", version=1, target_free=1, free=free,
        in_use=len(states) - free, total=len(states), max=4, failures=0,
        breaker_open_until=None, note=None, clones=clones,
    )  # fmt: skip
    return HostStatus(
        schema="imagepipe.status/1", generated_at=at, pools=(pool,), stray_clones=(),
        balancer_error=None,
    )  # fmt: skip


def test_a_login_into_a_pool_with_no_free_desktop_counts_as_waiting_with_its_wait() -> None:
    metrics = KeeperMetrics()
    report = PassReport(at=0.0)
    for at, states in (
        (100.0, {"lab-0": "in_use", "lab-1": "booting"}),  # nothing free from t=100
        (130.0, {"lab-0": "in_use", "lab-1": "booting"}),
        (160.0, {"lab-0": "in_use", "lab-1": "in_use"}),  # somebody got lab-1 as it came up
        (170.0, {"lab-0": "in_use", "lab-1": "in_use", "lab-2": "free"}),
        (180.0, {"lab-0": "in_use", "lab-1": "in_use", "lab-2": "in_use"}),  # found one free
    ):
        metrics.record_pass(report, _snapshot(at, states), 0.01, at)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("imagepipe_logins_total", pool="lab", found_ready="false") == 1.0
    assert value("imagepipe_logins_total", pool="lab", found_ready="true") == 1.0
    assert value("imagepipe_login_wait_seconds_sum", pool="lab") == 60.0
    assert value("imagepipe_desktops", pool="lab", state="in_use", version="1") == 3.0


def test_a_pool_whose_file_was_removed_can_still_be_taken_down(host: Host) -> None:
    config = load_keeper_config(host.config, [])
    service = KeeperService(SystemdNotifier(None), reloader=Reloader(host.config, [], config))
    keeper = keeper_for(host, service)
    for _ in range(3):
        keeper.run_pass()
    (host.pools / "lab.yml").unlink()
    service.request_reload(keeper)
    service.before_pass(keeper)
    adapters = Adapters(hypervisor=host.hv, balancer=host.lb, clock=host.clock)

    code = main(["--config", str(host.config), "pools", "down", "lab"], adapters)
    for _ in range(3):
        keeper.run_pass()

    assert code == 0
    assert host.hv.clones == {} and host.lb.list_backends() == []


def test_each_instance_of_a_balancer_pair_has_its_up_gauge() -> None:
    metrics = KeeperMetrics()
    snapshot = schema.replace(
        _snapshot(100.0, {"lab-0": "free"}),
        balancer_instances=(
            InstanceHealth("lb1", reachable=True, backends=1),
            InstanceHealth("lb2", reachable=False, error="does not answer"),
        ),
    )
    metrics.record_pass(PassReport(at=100.0), snapshot, 0.1, 100.0)
    up = metrics.registry.get_sample_value
    assert up("imagepipe_balancer_instance_up", {"instance": "lb1"}) == 1.0
    assert up("imagepipe_balancer_instance_up", {"instance": "lb2"}) == 0.0
    assert up("imagepipe_balancer_up") == 1.0, "one instance answering keeps the balancer up"


class Unanswering:
    """A state store whose database stopped answering: every call fails as PostgreSQL's
    store fails then."""

    def __getattr__(self, name: str) -> object:
        def call(*args: object, **kwargs: object) -> object:
            raise StoreUnavailableError("cannot reach the state database: connection refused")

        return call


def test_a_state_store_that_stops_answering_right_after_a_pass_does_not_stop_the_keeper(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = KeeperMetrics()
    service = KeeperService(SystemdNotifier(None), metrics=metrics)
    keeper = keeper_for(host, service)
    report = keeper.run_pass()
    keeper.store = Unanswering()  # type: ignore[assignment]

    with caplog.at_level(logging.WARNING):
        service.after_pass(keeper, report, 0.5)  # the status of the pass cannot be read

    assert "pass status not read" in caplog.text
    assert metrics.passes.labels("ok")._value.get() == 1, "the pass itself is counted"
