"""The balancer contract and IPVS-specific behaviour against a real IPVS kernel.

One director test machine (Debian's cloud kernel under QEMU, see tests/ipvs_director.py)
boots per module; every test starts from an empty IPVS table. The adapter's runner executes
ipvsadm inside that machine. Desktops are tiny TCP servers on this host's 127.0.0.1 (each
greets with its port, then echoes), which the machine reaches at 10.0.3.2; clients connect
from this host through QEMU's port forward to the VIP. Real TCP sessions, real NAT.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from imagepipe import doctor
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.ipvs.parse import (
    Forward,
    format_endpoint,
    parse_list,
    parse_names,
    parse_stats,
    parse_thresholds,
    render_names,
)
from imagepipe.config import BalancerSettings, Settings
from imagepipe.doctor import Status
from imagepipe.pool.executor import ExecutorSettings
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import Backend, BackendState, Endpoint, PoolSpec, RecordClone
from imagepipe.pool.ports import Balancer
from imagepipe.stores.sqlite import SQLiteStore
from tests.conftest import require, require_program
from tests.contract.balancer_suite import BalancerContract, by_name, listed
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages
from tests.host import free_port
from tests.ipvs_director import Director, build_director

pytestmark = pytest.mark.real

WAIT = 5.0  # seconds the emulated machine gets to settle a count
GREETING_WAIT = 3.0  # a client with no greeting by then got no desktop (IPVS dropped its SYN)
NAMES = "/var/lib/imagepipe/ipvs-test.names"


class Desktop:
    """A TCP server that greets with its port and echoes: a stand-in for a VNC/RDP desktop."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(f"{self.port}\n".encode())
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped = True
        self.listener.close()


@dataclass
class Client:
    sock: socket.socket
    landed_on: Endpoint | None

    def alive(self) -> bool:
        try:
            self.sock.sendall(b"ping\n")
            return self.sock.recv(16) == b"ping\n"
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


@dataclass
class IPVSHarness:
    director: Director
    desktops: list[Desktop] = field(default_factory=list)

    def new_adapter(self, **options: object) -> IPVSBalancer:
        settings: dict[str, object] = {
            "vip": self.director.vip.host,
            "port": self.director.vip.port,
            "names_file": NAMES,
            "runner": self.director.runner,
        }
        settings.update(options)
        return IPVSBalancer(**settings)  # type: ignore[arg-type]

    def desktop(self, index: int) -> Endpoint:
        while len(self.desktops) <= index:
            self.desktops.append(Desktop())
        return Endpoint(self.director.desktop_host, self.desktops[index].port)

    def connect(self) -> Client:
        """A client; landed_on None when IPVS had no desktop for it. IPVS cannot queue a
        connection the way HAProxy does: it answers the SYN with ICMP port unreachable,
        which QEMU's user network does not pass on, so the client just hears nothing."""
        front = self.director.frontend
        sock = socket.create_connection((front.host, front.port), timeout=WAIT)
        sock.settimeout(GREETING_WAIT)
        try:
            greeting = sock.recv(16)
        except (TimeoutError, ConnectionResetError):
            greeting = b""
        sock.settimeout(WAIT)
        port = int(greeting) if greeting.strip().isdigit() else None
        return Client(sock, Endpoint(self.director.desktop_host, port) if port else None)

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        """An administrator adds a real server by hand and names it in the names file."""
        vip = format_endpoint(self.director.vip)
        self.director.run("ipvsadm", "-a", "-t", vip, "-r", str(address), "-m", "-w", "1")
        names = parse_names(self.director.run("cat", NAMES).stdout)
        names[name] = address
        script = 'cat >"$1"'
        result = self.director.runner.run(
            ["sh", "-c", script, "sh", NAMES], stdin=render_names(names)
        )
        assert result.ok, result.describe()

    def reopen(self) -> Balancer:
        return self.new_adapter()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            assert time.monotonic() < deadline, f"IPVS did not get to {what} in {WAIT} s"
            time.sleep(0.05)

    def kernel(self) -> str:
        return self.director.run("ipvsadm", "-L", "-n", "--exact").stdout

    def cleanup(self) -> None:
        for desktop in self.desktops:
            desktop.stop()


@pytest.fixture(scope="module")
def director(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Director]:
    require_program("qemu-system-x86_64")
    require(
        Path("/bin/busybox").exists(), "busybox-static is not installed (scripts/setup-host.sh)"
    )
    work = tmp_path_factory.mktemp("ipvs-director")
    files = build_director(work / "files")
    machine = Director.boot(files, work / "run")
    print(f"director booted in {machine.boot_seconds:.1f} s")
    try:
        yield machine
    finally:
        machine.stop()


@pytest.fixture
def harness(director: Director) -> Iterator[IPVSHarness]:
    director.run("ipvsadm", "-C")
    director.run("rm", "-f", NAMES)
    director.run("sysctl", "-w", "net.ipv4.vs.expire_nodest_conn=0")
    director.run("sysctl", "-w", "net.ipv4.vs.expire_quiescent_template=1")
    h = IPVSHarness(director)
    try:
        yield h
    finally:
        h.cleanup()


class TestIPVSContract(BalancerContract):
    @pytest.fixture
    def balancer(self, harness: IPVSHarness) -> IPVSBalancer:
        adapter = harness.new_adapter()
        adapter.ensure_frontend()
        return adapter


def test_a_ready_desktop_is_a_masq_real_server_with_weight_1_and_threshold_1(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    (service,) = parse_list(harness.kernel())
    assert (service.address, service.scheduler, service.persistence) == (
        harness.director.vip,
        "wlc",
        0,
    )
    (server,) = service.real_servers
    assert (server.address, server.forward, server.weight) == (harness.desktop(0), Forward.MASQ, 1)
    thresholds = parse_thresholds(
        harness.director.run("ipvsadm", "-L", "-n", "--exact", "--thresholds").stdout
    )
    assert [(t.address, t.upper) for t in thresholds] == [(harness.desktop(0), 1)]


def test_ensure_frontend_sets_the_sysctls_the_drain_rule_needs(harness: IPVSHarness) -> None:
    harness.new_adapter().ensure_frontend()
    values = harness.director.run(
        "sysctl", "-n", "net.ipv4.vs.expire_nodest_conn", "net.ipv4.vs.expire_quiescent_template"
    ).stdout.split()
    assert values == ["1", "0"]


def test_a_drained_desktop_takes_its_returning_user_with_persistence(
    harness: IPVSHarness,
) -> None:
    """With -p, the user's persistence template brings them back to their own desktop even
    while it drains (expire_quiescent_template=0); the drain still keeps new users off."""
    balancer = harness.new_adapter(persistence=300)
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    balancer.enable("lab-2", harness.desktop(1))
    first = harness.connect()
    assert first.landed_on is not None
    mine = next(b.name for b in balancer.list_backends() if b.address == first.landed_on)
    balancer.drain(mine)
    first.close()
    harness.eventually(lambda: by_name(balancer)[mine].connections == 0, "the session to end")
    again = harness.connect()
    assert again.landed_on == first.landed_on
    assert again.alive()
    assert listed(balancer)[[b.name for b in listed(balancer)].index(mine)] == Backend(
        mine, first.landed_on, BackendState.DRAIN, 1
    )
    again.close()


def test_a_closed_session_lingering_as_inactconn_does_not_block_removal_or_the_next_user(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    user = harness.connect()
    assert user.landed_on == harness.desktop(0)
    user.close()

    def lingering() -> bool:
        (service,) = parse_list(harness.kernel())
        return service.real_servers[0].active == 0 and service.real_servers[0].inactive >= 1

    harness.eventually(lingering, "list the closed session as InActConn")
    assert by_name(balancer)["lab-1"].connections == 0
    started = time.monotonic()
    balancer.drain("lab-1")
    balancer.remove("lab-1")  # at once: not after the 2-minute FIN/TIME_WAIT timeout
    assert balancer.list_backends() == []
    balancer.enable("lab-1", harness.desktop(0))  # the desktop was reset and is back
    harness.eventually(
        lambda: (c := harness.connect()).landed_on == harness.desktop(0) or c.close() is not None,
        "let the next user onto the desktop",
    )
    assert time.monotonic() - started < 30


def test_a_keeper_restart_reads_names_states_and_sessions_back_from_the_kernel(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    balancer.enable("lab-2", harness.desktop(1))
    client = harness.connect()
    busy = next(b.name for b in balancer.list_backends() if b.address == client.landed_on)
    idle = ({"lab-1", "lab-2"} - {busy}).pop()
    balancer.drain(busy)
    before = balancer.list_backends()
    balancer.close()

    again = harness.new_adapter()
    again.ensure_frontend()
    # the session counters may have moved on: IPVS publishes them every 2 s (its estimator)
    assert listed(again) == [replace(b, sessions_total=None) for b in before]
    assert {b.name: (b.state, b.connections) for b in before} == {
        busy: (BackendState.DRAIN, 1),
        idle: (BackendState.READY, 0),
    }
    assert client.alive()
    client.close()


def test_orphans_both_ways_a_lost_real_server_comes_back_a_stray_one_goes(
    harness: IPVSHarness,
) -> None:
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    balancer.enable("lab-2", harness.desktop(1))
    vip = format_endpoint(harness.director.vip)
    # behind imagepipe's back: lab-2 deleted, an unnamed real server added
    harness.director.run("ipvsadm", "-d", "-t", vip, "-r", str(harness.desktop(1)))
    harness.director.run("ipvsadm", "-a", "-t", vip, "-r", str(harness.desktop(2)), "-m")
    stray = f"ipvs-10.0.3.2-{harness.desktop(2).port}"
    assert [b.name for b in balancer.list_backends()] == [
        "ipvs-10.0.3.2-" + str(harness.desktop(2).port),
        "lab-1",
    ]
    # what a keeper pass does with that: the wanted desktop back, the stray out
    balancer.enable("lab-2", harness.desktop(1))
    balancer.remove(stray)
    assert {b.name: b.address for b in balancer.list_backends()} == {
        "lab-1": harness.desktop(0),
        "lab-2": harness.desktop(1),
    }
    assert set(parse_names(harness.director.run("cat", NAMES).stdout)) == {"lab-1", "lab-2"}


def test_a_service_changed_or_flushed_behind_our_back_is_put_back(harness: IPVSHarness) -> None:
    balancer = harness.new_adapter(scheduler="lc", persistence=60)
    balancer.ensure_frontend()
    vip = format_endpoint(harness.director.vip)
    harness.director.run("ipvsadm", "-E", "-t", vip, "-s", "rr")
    balancer.ensure_frontend()
    (service,) = parse_list(harness.kernel())
    assert (service.scheduler, service.persistence) == ("lc", 60)

    harness.director.run("ipvsadm", "-C")
    assert balancer.list_backends() == []
    balancer.enable("lab-1", harness.desktop(0))  # recreates the service it needs
    client = harness.connect()
    assert client.landed_on == harness.desktop(0)
    client.close()


def test_doctor_finds_the_director_ready(harness: IPVSHarness) -> None:
    settings = Settings(
        balancer=BalancerSettings(
            driver="ipvs", vip=harness.director.vip.host, port=harness.director.vip.port
        )
    )
    harness.new_adapter().ensure_frontend()

    checks = doctor.check_ipvs(settings, harness.director.runner)

    assert [(c.check, c.status) for c in checks] == [
        (name, Status.OK)
        for name in ("ipvs-module", "ipvsadm", "ipvs-vip", "ipvs-sysctls", "ipvs-forwarding")
    ], checks


# -- the keeper on a real IPVS kernel ------------------------------------------------------


def consecutive_desktops(harness: IPVSHarness, count: int) -> int:
    """Desktops listening on `count` consecutive loopback ports (a pool's port range);
    returns the first port."""
    for _ in range(50):
        first = free_port()
        listeners: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                listeners.append(socket.create_server(("127.0.0.1", port)))
        except OSError:
            for s in listeners:
                s.close()
            continue
        for s in listeners:
            desktop = Desktop.__new__(Desktop)
            desktop.listener, desktop.port, desktop._stopped = s, s.getsockname()[1], False
            threading.Thread(target=desktop._accept, daemon=True).start()
            harness.desktops.append(desktop)
        return first
    raise AssertionError("no free consecutive ports on 127.0.0.1")


def settle(keeper: Keeper, passes: int = 8) -> None:
    """Run passes until one has nothing to do for the hypervisor or the balancer."""
    for _ in range(passes):
        report = keeper.run_pass()
        assert report.ok, report
        if not [a for a in report.actions if not isinstance(a, RecordClone)]:
            return
    raise AssertionError(f"no convergence after {passes} passes: {report.actions}")


def test_the_keeper_runs_a_pool_on_ipvs_from_empty_to_recycled(
    harness: IPVSHarness, tmp_path: Path
) -> None:
    """Real kernel, real sessions; the desktops' hypervisor is the in-memory fake."""
    started = time.monotonic()
    first = consecutive_desktops(harness, 3)
    spec = PoolSpec(
        name="lab",
        image="tiny",
        initial=2,
        free=2,
        max=3,
        port_first=first,
        port_last=first + 2,
        display_address=harness.director.desktop_host,
        recycle_after=60.0,
    )
    clock, images = FakeClock(), FakeImages()
    hv = FakeHypervisor(clock=clock.now)
    hv.add_base(images.publish("tiny", 1))
    store = SQLiteStore(tmp_path / "state.db")

    def keeper(balancer: IPVSBalancer) -> Keeper:
        return Keeper(
            hypervisor=hv,
            balancer=balancer,
            store=store,
            images=images,
            specs=[spec],
            clock=clock,
            settings=KeeperOptions(tick=5.0, executor=ExecutorSettings()),
        )

    def kernel_state(balancer: IPVSBalancer) -> dict[str, BackendState]:
        return {b.name: b.state for b in balancer.list_backends()}

    balancer = harness.new_adapter()
    settle(keeper(balancer))
    assert kernel_state(balancer) == {"lab-0": BackendState.READY, "lab-1": BackendState.READY}

    # a user arrives through the VIP; the keeper drains that desktop and adds a free one
    user = harness.connect()
    assert user.landed_on is not None
    taken = next(b.name for b in balancer.list_backends() if b.address == user.landed_on)
    hv.connect(taken, "10.0.2.2")
    hv.login(taken, "alice")
    settle(keeper(balancer))
    assert kernel_state(balancer)[taken] is BackendState.DRAIN
    assert sorted(kernel_state(balancer)) == ["lab-0", "lab-1", "lab-2"]

    # behind the keeper's back: a free desktop deleted, a leftover of the pool added
    free = next(n for n, s in kernel_state(balancer).items() if s is BackendState.READY)
    vip = format_endpoint(harness.director.vip)
    address = by_name(balancer)[free].address
    harness.director.run("ipvsadm", "-d", "-t", vip, "-r", str(address))
    balancer.enable("lab-9", harness.desktop(3))  # a clone that is long gone
    assert sorted(kernel_state(balancer)) == sorted({"lab-0", "lab-1", "lab-2", "lab-9"} - {free})

    # a restarted keeper reads everything back and puts the kernel right, both ways
    restarted = harness.new_adapter()
    settle(keeper(restarted))
    assert kernel_state(restarted) == {
        "lab-0": kernel_state(restarted)["lab-0"],
        "lab-1": kernel_state(restarted)["lab-1"],
        "lab-2": BackendState.READY,
    }
    assert kernel_state(restarted)[taken] is BackendState.DRAIN
    assert user.alive()

    # disconnected but logged in: the desktop stays; logged off: recycled, back in at once
    user.close()
    hv.disconnect(taken)
    settle(keeper(restarted))
    assert kernel_state(restarted)[taken] is BackendState.DRAIN
    hv.logout(taken, "alice")
    settle(keeper(restarted))
    clock.advance(spec.recycle_after + 1)
    settle(keeper(restarted))
    assert hv.count("reset") == 1
    assert kernel_state(restarted)[taken] is BackendState.READY
    store.close()
    print(f"keeper scenario on IPVS: {time.monotonic() - started:.1f} s")


def test_desktops_enabled_at_the_same_time_all_keep_their_names(harness: IPVSHarness) -> None:
    """The executor runs actions on different clones at once; no name may be lost."""
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    threads = [
        threading.Thread(target=balancer.enable, args=(f"lab-{i}", harness.desktop(i)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert {b.name: b.address for b in balancer.list_backends()} == {
        f"lab-{i}": harness.desktop(i) for i in range(4)
    }


def test_a_desktop_added_again_while_its_old_connections_linger_still_counts_from_zero(
    harness: IPVSHarness,
) -> None:
    """The kernel gives a real server removed and added again within its connections'
    lifetime (TIME_WAIT) its old counters back from its trash; the adapter keeps them as the
    name's base, so the backend counts from 0 and a reset desktop is not taken for used."""
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", harness.desktop(0))
    client = harness.connect()
    harness.eventually(lambda: by_name(balancer)["lab-1"].sessions_total == 1, "Conns 1")
    client.close()
    harness.eventually(lambda: by_name(balancer)["lab-1"].connections == 0, "the session end")
    balancer.drain("lab-1")
    balancer.remove("lab-1")
    balancer.enable("lab-1", harness.desktop(0))

    vip = format_endpoint(harness.director.vip)
    raw = parse_stats(
        harness.director.run("ipvsadm", "-L", "-n", "--exact", "--stats", "-t", vip).stdout
    )
    assert raw[0].real_servers[0][1] == 1, "the kernel brought the old counter back"
    assert by_name(balancer)["lab-1"].sessions_total == 0
    again = harness.connect()
    assert again.landed_on == harness.desktop(0)
    harness.eventually(lambda: by_name(balancer)["lab-1"].sessions_total == 1, "Conns 2 - 1")
    again.close()
