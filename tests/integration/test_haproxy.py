"""The balancer contract and HAProxy-specific behaviour against a real HAProxy 2.6.

Each test starts its own HAProxy on a free loopback port (manage=True) with its files in a
short temp directory, and tiny TCP servers on 127.0.0.1 standing in for desktops: each sends
its own port on connect, then echoes. Every HAProxy is stopped even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.errors import EnvironmentMissingError
from imagepipe.pool.model import BackendState, Endpoint
from imagepipe.pool.ports import Balancer
from tests.conftest import require_program
from tests.contract.balancer_suite import BalancerContract
from tests.host import free_port

pytestmark = pytest.mark.real

WAIT = 3.0  # seconds a real HAProxy gets to settle a count


class Desktop:
    """A TCP server that greets with its port and echoes: a stand-in for a VNC/RDP desktop."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = Endpoint("127.0.0.1", self.listener.getsockname()[1])
        self.open = 0
        self._lock = threading.Lock()
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
        with self._lock:
            self.open += 1
        with conn:
            try:
                conn.sendall(f"{self.endpoint.port}\n".encode())
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass
        with self._lock:
            self.open -= 1

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


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


@dataclass
class RealHarness:
    workdir: Path
    frontend: Endpoint
    balance: str = "leastconn"
    desktops: list[Desktop] = field(default_factory=list)
    adapters: list[HAProxyBalancer] = field(default_factory=list)

    def new_adapter(self, *, manage: bool = True, balance: str | None = None) -> HAProxyBalancer:
        adapter = HAProxyBalancer(
            bind=str(self.frontend),
            admin_socket=self.workdir / "admin.sock",
            config_path=self.workdir / "haproxy.cfg",
            pid_file=self.workdir / "haproxy.pid",
            manage=manage,
            balance=balance or self.balance,
        )
        self.adapters.append(adapter)
        return adapter

    def desktop(self, index: int) -> Endpoint:
        while len(self.desktops) <= index:
            self.desktops.append(Desktop())
        return self.desktops[index].endpoint

    def connect(self) -> Client:
        sock = socket.create_connection((self.frontend.host, self.frontend.port), timeout=WAIT)
        sock.settimeout(0.5)
        try:
            greeting = sock.recv(16)
        except TimeoutError:
            greeting = b""  # queued: no desktop free
        sock.settimeout(WAIT)
        port = int(greeting) if greeting.strip().isdigit() else None
        return Client(sock, Endpoint("127.0.0.1", port) if port else None)

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        admin = self.adapters[0].admin
        assert admin.command(f"add server desktops/{name} {address} maxconn 1").strip() == (
            "New server registered."
        )
        assert admin.command(f"enable server desktops/{name}").strip() == ""

    def reopen(self) -> Balancer:
        return self.new_adapter()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            assert time.monotonic() < deadline, f"HAProxy did not get to {what} in {WAIT} s"
            time.sleep(0.02)

    def haproxy_pid(self) -> int:
        return int((self.workdir / "haproxy.pid").read_text().split()[0])

    def cleanup(self) -> None:
        for desktop in self.desktops:
            desktop.stop()
        with contextlib.suppress(Exception):
            self.new_adapter().shutdown()
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.haproxy_pid(), signal.SIGKILL)


@pytest.fixture
def real_harness() -> Iterator[RealHarness]:
    require_program("haproxy")
    # unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer
    workdir = Path(tempfile.mkdtemp(prefix="ipx-haproxy-"))
    harness = RealHarness(workdir, Endpoint("127.0.0.1", free_port()))
    try:
        yield harness
    finally:
        harness.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


class TestHAProxyContract(BalancerContract):
    @pytest.fixture
    def harness(self, real_harness: RealHarness) -> RealHarness:
        return real_harness

    @pytest.fixture
    def balancer(self, real_harness: RealHarness) -> HAProxyBalancer:
        adapter = real_harness.new_adapter()
        adapter.ensure_frontend()
        return adapter


def test_killed_haproxy_is_restarted_and_desktops_can_be_added_again(
    real_harness: RealHarness,
) -> None:
    balancer = real_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    first_pid = real_harness.haproxy_pid()
    os.kill(first_pid, signal.SIGKILL)
    real_harness.eventually(lambda: gone(first_pid), "die")

    balancer.ensure_frontend()
    assert real_harness.haproxy_pid() != first_pid
    assert balancer.list_backends() == []  # dynamic servers die with the process
    balancer.enable("lab-1", real_harness.desktop(0))
    assert [(b.name, b.state) for b in balancer.list_backends()] == [("lab-1", BackendState.READY)]
    client = real_harness.connect()
    assert client.landed_on == real_harness.desktop(0)
    client.close()


def test_a_keeper_restart_reuses_the_running_haproxy(real_harness: RealHarness) -> None:
    balancer = real_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    client = real_harness.connect()
    pid = real_harness.haproxy_pid()
    balancer.close()

    again = real_harness.new_adapter()
    again.ensure_frontend()
    assert real_harness.haproxy_pid() == pid
    assert [b.connections for b in again.list_backends()] == [1]
    assert client.alive()
    client.close()


def test_changing_the_balance_reloads_haproxy_and_keeps_backends_and_sessions(
    real_harness: RealHarness,
) -> None:
    balancer = real_harness.new_adapter(balance="leastconn")
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    balancer.enable("lab-2", real_harness.desktop(1))
    balancer.drain("lab-2")
    client = real_harness.connect()
    old_pid = real_harness.haproxy_pid()

    changed = real_harness.new_adapter(balance="first")
    changed.ensure_frontend()
    assert real_harness.haproxy_pid() != old_pid
    assert "balance first" in (real_harness.workdir / "haproxy.cfg").read_text()
    assert {b.name: b.state for b in changed.list_backends()} == {
        "lab-1": BackendState.READY,
        "lab-2": BackendState.DRAIN,
    }
    assert client.alive()  # the old process keeps serving the open session
    client.close()
    real_harness.eventually(lambda: gone(old_pid), "retire the old")


def test_balance_first_fills_the_first_desktop_before_the_next(
    real_harness: RealHarness,
) -> None:
    balancer = real_harness.new_adapter(balance="first")
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    balancer.enable("lab-2", real_harness.desktop(1))
    first = real_harness.connect()
    second = real_harness.connect()
    assert (first.landed_on, second.landed_on) == (
        real_harness.desktop(0),
        real_harness.desktop(1),
    )
    first.close()
    second.close()


def test_unmanaged_haproxy_without_a_socket_says_how_to_fix_it(
    real_harness: RealHarness,
) -> None:
    balancer = real_harness.new_adapter(manage=False)
    with pytest.raises(EnvironmentMissingError, match=r"stats socket .* level admin") as error:
        balancer.ensure_frontend()
    assert "set balancer.manage: true" in str(error.value)  # a settings key that exists
    assert not (real_harness.workdir / "haproxy.pid").exists()  # nothing was started


def test_unmanaged_adapter_drives_a_running_haproxy(real_harness: RealHarness) -> None:
    real_harness.new_adapter().ensure_frontend()  # somebody else's HAProxy, already running
    balancer = real_harness.new_adapter(manage=False)
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    balancer.drain("lab-1")
    assert [(b.name, b.state) for b in balancer.list_backends()] == [("lab-1", BackendState.DRAIN)]


def test_a_waiting_client_gets_the_desktop_when_its_user_leaves(
    real_harness: RealHarness,
) -> None:
    balancer = real_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-1", real_harness.desktop(0))
    user = real_harness.connect()
    waiting = real_harness.connect()
    assert waiting.landed_on is None
    user.close()
    waiting.sock.settimeout(WAIT)
    assert waiting.sock.recv(16) == f"{real_harness.desktop(0).port}\n".encode()
    waiting.close()


def test_users_arriving_at_the_same_instant_never_share_a_desktop(
    real_harness: RealHarness,
) -> None:
    """A morning rush: clients that connect at the same moment must each get a desktop of
    their own. (With HAProxy's default of one thread per CPU, two threads could both hand
    the same maxconn-1 server a connection: up to 1 round in 30 shared a desktop here.)"""
    ROUNDS = 200
    balancer = real_harness.new_adapter()
    balancer.ensure_frontend()
    balancer.enable("lab-0", real_harness.desktop(0))
    balancer.enable("lab-1", real_harness.desktop(1))
    shared = 0
    for _ in range(ROUNDS):
        start = threading.Barrier(2)
        clients: list[Client] = []

        def arrive(start: threading.Barrier, clients: list[Client]) -> None:
            start.wait()
            clients.append(real_harness.connect())

        arrivals = [threading.Thread(target=arrive, args=(start, clients)) for _ in range(2)]
        for t in arrivals:
            t.start()
        for t in arrivals:
            t.join()
        first, second = clients
        if first.landed_on is not None and first.landed_on == second.landed_on:
            shared += 1
        first.close()
        second.close()
        real_harness.eventually(
            lambda: all(b.connections == 0 for b in balancer.list_backends()),
            "both desktops free again",
        )
    assert shared == 0, f"two users got the same desktop in {shared} of {ROUNDS} rounds"
