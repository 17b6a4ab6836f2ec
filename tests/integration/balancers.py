"""The two real balancers the integration tests drive, behind one harness each (the
contract suite's `BalancerHarness`, tests/contract/balancer_suite.py, plus what the
scenarios both balancers share need): a real HAProxy 2.6 started on a free loopback port,
and a real IPVS kernel in the director test machine (tests/ipvs_director.py).

Desktops are tiny TCP servers on this host's 127.0.0.1 standing in for VNC/RDP desktops:
each greets with its port, then echoes. Clients connect through the balancer's frontend as
users would; `Client.landed_on` is the desktop that greeted them.
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
from imagepipe.balancers.haproxy.config import Peer
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.ipvs.parse import format_endpoint, parse_names, render_names
from imagepipe.pool.model import Endpoint
from imagepipe.pool.ports import Balancer
from tests.conftest import require, require_program
from tests.host import free_port
from tests.ipvs_director import Director, build_director

HAPROXY_WAIT = 3.0  # seconds a real HAProxy gets to settle a count
IPVS_WAIT = 5.0  # seconds the emulated machine gets to settle a count
GREETING_WAIT = 12.0  # an IPVS client with no greeting by then got no desktop (3 s, then 6 s,
# were too short once each on a loaded host: the director is a TCG guest whose user network
# relays each byte; only the three checks that no desktop answers wait this long)
NAMES = "/var/lib/imagepipe/ipvs-test.names"


class Desktop:
    """A TCP server that greets with its port and echoes: a stand-in for a VNC/RDP desktop."""

    def __init__(self, listener: socket.socket | None = None) -> None:
        self.listener = listener or socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = 0  # connections being served now
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
                conn.sendall(f"{self.port}\n".encode())
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


def greeted(sock: socket.socket, wait: float, host: str, first_read: float) -> Client:
    """The client whose socket is `sock`: the port its desktop greeted with, if any within
    `first_read` seconds (none: it waits in a queue, or got no desktop)."""
    sock.settimeout(first_read)
    try:
        greeting = sock.recv(16)
    except (TimeoutError, ConnectionResetError):
        greeting = b""
    sock.settimeout(wait)
    port = int(greeting) if greeting.strip().isdigit() else None
    return Client(sock, Endpoint(host, port) if port else None)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


@dataclass
class HAProxyHarness:
    """A real HAProxy (manage=True) with its files in `workdir`, bound to `frontend`."""

    workdir: Path
    frontend: Endpoint
    balance: str = "leastconn"
    desktops: list[Desktop] = field(default_factory=list)
    adapters: list[HAProxyBalancer] = field(default_factory=list)
    wait: float = HAPROXY_WAIT

    def new_adapter(
        self,
        *,
        manage: bool = True,
        balance: str | None = None,
        persist: str = "none",
        peers: tuple[Peer, ...] = (),
        local_peer: str | None = None,
    ) -> HAProxyBalancer:
        adapter = HAProxyBalancer(
            bind=str(self.frontend),
            admin_socket=self.workdir / "admin.sock",
            config_path=self.workdir / "haproxy.cfg",
            pid_file=self.workdir / "haproxy.pid",
            manage=manage,
            balance=balance or self.balance,
            persist=persist,
            peers=peers,
            local_peer=local_peer,
        )
        self.adapters.append(adapter)
        return adapter

    def persistent_adapter(self) -> Balancer:
        """An adapter that sends a returning client (same source address) back to its
        desktop, also while it drains."""
        return self.new_adapter(persist="source")

    def desktop(self, index: int) -> Endpoint:
        while len(self.desktops) <= index:
            self.desktops.append(Desktop())
        return Endpoint("127.0.0.1", self.desktops[index].port)

    def connect(self, source: str | None = None) -> Client:
        """A client, from the loopback address `source` when given (a user's own machine)."""
        bind = None if source is None else (source, 0)
        address = (self.frontend.host, self.frontend.port)
        sock = socket.create_connection(address, self.wait, source_address=bind)
        return greeted(sock, self.wait, "127.0.0.1", first_read=0.5)  # none: queued

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        admin = self.adapters[0].admin
        assert admin.command(f"add server desktops/{name} {address} maxconn 1").strip() == (
            "New server registered."
        )
        assert admin.command(f"enable server desktops/{name}").strip() == ""

    def reopen(self) -> Balancer:
        return self.new_adapter()

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.wait
        while not check():
            assert time.monotonic() < deadline, f"HAProxy did not get to {what} in {self.wait} s"
            time.sleep(0.02)

    def frontend_pid(self) -> int:
        """The process serving the frontend (HAProxy's pid)."""
        return int((self.workdir / "haproxy.pid").read_text().split()[0])

    def lose_frontend(self) -> None:
        """The frontend dies behind imagepipe's back: HAProxy killed with SIGKILL."""
        pid = self.frontend_pid()
        os.kill(pid, signal.SIGKILL)
        self.eventually(lambda: gone(pid), "die")

    def cleanup(self) -> None:
        for desktop in self.desktops:
            desktop.stop()
        with contextlib.suppress(Exception):
            self.new_adapter().shutdown()
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.frontend_pid(), signal.SIGKILL)


@dataclass
class IPVSHarness:
    """The director machine's IPVS kernel; the adapter's runner runs ipvsadm inside it. The
    machine reaches this host's desktops at `director.desktop_host`; clients come from this
    host through QEMU's port forward to the VIP."""

    director: Director
    desktops: list[Desktop] = field(default_factory=list)
    wait: float = IPVS_WAIT

    def new_adapter(self, **options: object) -> IPVSBalancer:
        settings: dict[str, object] = {
            "vip": self.director.vip.host,
            "port": self.director.vip.port,
            "names_file": NAMES,
            "runner": self.director.runner,
        }
        settings.update(options)
        return IPVSBalancer(**settings)  # type: ignore[arg-type]

    def persistent_adapter(self) -> Balancer:
        """With -p, the client's persistence template brings it back to its desktop even
        while it drains (expire_quiescent_template=0)."""
        return self.new_adapter(persistence=300)

    def desktop(self, index: int) -> Endpoint:
        while len(self.desktops) <= index:
            self.desktops.append(Desktop())
        return Endpoint(self.director.desktop_host, self.desktops[index].port)

    def connect(self) -> Client:
        """A client; landed_on None when IPVS had no desktop for it. IPVS cannot queue a
        connection the way HAProxy does: it answers the SYN with ICMP port unreachable,
        which QEMU's user network does not pass on, so the client just hears nothing."""
        front = self.director.frontend
        sock = socket.create_connection((front.host, front.port), timeout=self.wait)
        return greeted(sock, self.wait, self.director.desktop_host, first_read=GREETING_WAIT)

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
        deadline = time.monotonic() + self.wait
        while not check():
            assert time.monotonic() < deadline, f"IPVS did not get to {what} in {self.wait} s"
            time.sleep(0.05)

    def frontend_pid(self) -> int | None:
        """None: the kernel serves the frontend, no process."""
        return None

    def lose_frontend(self) -> None:
        """The frontend goes behind imagepipe's back: the IPVS table flushed."""
        self.director.run("ipvsadm", "-C")

    def kernel(self) -> str:
        return self.director.run("ipvsadm", "-L", "-n", "--exact").stdout

    def cleanup(self) -> None:
        for desktop in self.desktops:
            desktop.stop()


# -- fixtures (tests/integration/conftest.py offers them to its tests) ---------------------


@pytest.fixture
def haproxy_harness() -> Iterator[HAProxyHarness]:
    """A fresh HAProxy for one test; stopped even when the test fails."""
    require_program("haproxy")
    # unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer
    workdir = Path(tempfile.mkdtemp(prefix="ipx-haproxy-"))
    harness = HAProxyHarness(workdir, Endpoint("127.0.0.1", free_port()))
    try:
        yield harness
    finally:
        harness.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
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
def ipvs_harness(director: Director) -> Iterator[IPVSHarness]:
    """The director's IPVS kernel, from an empty table, for one test."""
    director.run("ipvsadm", "-C")
    director.run("rm", "-f", NAMES)
    director.run("sysctl", "-w", "net.ipv4.vs.expire_nodest_conn=0")
    director.run("sysctl", "-w", "net.ipv4.vs.expire_quiescent_template=1")
    harness = IPVSHarness(director)
    try:
        yield harness
    finally:
        harness.cleanup()
