"""A balancer pair on this host for tests and benchmarks: two network namespaces (lb1, lb2),
each with an HAProxy and keepalived running examples/keepalived, a bridge namespace joining
them and this host, and a keeper whose balancer group keeps both HAProxy in step over real
tiny libvirt desktops whose VNC listens on this host's end of the bridge. The pair persists
users by source address (`persist: source`) and shares its stick table (HAProxy peers on
each namespace's address); this host's end has two addresses, one per user machine.

    with balancer_pair() as world:
        keeper = world.runtime.keeper([world.spec])
        ...

The network is the caller's own: a private /24 checked to be unused, namespaces and links
named after this process; everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.balancers.group import BalancerGroup
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.balancers.haproxy.config import Peer
from imagepipe.config import HypervisorSettings, Settings
from imagepipe.pool.model import Endpoint, PoolSpec
from tests.conftest import libvirt_available, require, require_program
from tests.e2e.test_ipvs_e2e import OneImage
from tests.guest import VncClient, tiny_base_image
from tests.host import destroy_domains
from tests.netns import NetLab, free_subnet

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "keepalived"
POOL = "vrrpe2e"
PORT = 5999  # the users' port on the address keepalived moves
WAIT = 240.0  # TCG desktops on a shared 2-core host
FAILOVER_LIMIT = 10.0  # "within a few seconds": keepalived's checks plus three adverts
PEER_PORT = 10000  # where each HAProxy takes the other's stick-table updates


@dataclass
class Node:
    """One balancer machine: its namespace, HAProxy and keepalived."""

    name: str
    ns: str
    address: str
    workdir: Path
    keepalived: subprocess.Popen[bytes] | None = None
    peers: tuple[Peer, ...] = ()  # both HAProxy of the pair

    @property
    def admin_socket(self) -> Path:
        return self.workdir / "admin.sock"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "haproxy.pid"

    def haproxy_pid(self) -> int:
        return int(self.pid_file.read_text().split()[0])

    def adapter(self, *, manage: bool) -> HAProxyBalancer:
        wrapper = self.workdir / "haproxy"  # HAProxy run inside this machine's namespace
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {self.ns} haproxy "$@"\n')
        wrapper.chmod(0o755)
        return HAProxyBalancer(
            bind=f"0.0.0.0:{PORT}",
            admin_socket=self.admin_socket,
            config_path=self.workdir / "haproxy.cfg",
            pid_file=self.pid_file,
            manage=manage,
            persist="source",
            peers=self.peers,
            local_peer=self.name,
            program=str(wrapper),
        )


@dataclass
class World:
    lab: NetLab
    nodes: tuple[Node, Node]
    vip: str
    user_address: str  # this host's address users connect from
    newcomer_address: str  # a second user machine's (this host's second address)
    runtime: Runtime
    spec: PoolSpec
    root: Path


def keepalived_conf(node: Node, *, interface: str, vip: str, priority: int, check: Path) -> str:
    """The shipped example with this machine's values: the health check on this node's
    HAProxy, its interface, the address, its priority; the system log left as it is."""
    text = (EXAMPLE / "keepalived.conf").read_text()
    replacements = {
        r"router_id imagepipe-lb1": f"router_id imagepipe-{node.name}",
        r'script "/etc/keepalived/check-haproxy /run/haproxy.pid"': (
            f'script "{check} {node.pid_file}"'
        ),
        r"interface eth0": f"interface {interface}",
        r"priority 150": f"priority {priority}",
        r"192\.0\.2\.100/24": f"{vip}/24",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text)
        assert count == 1, f"the example no longer has {pattern!r}"
    return text


def start_keepalived(lab: NetLab, node: Node, conf: str) -> None:
    path = node.workdir / "keepalived.conf"
    path.write_text(conf)
    node.keepalived = lab.popen(
        node.ns,
        [
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "-f",
            str(path),
            "-p",
            str(node.workdir / "keepalived.pid"),
            "-r",
            str(node.workdir / "vrrp.pid"),
            "-c",
            str(node.workdir / "checkers.pid"),
        ],
        node.workdir / "keepalived.log",
    )


def eventually(check: Callable[[], bool], what: str, timeout: float) -> float:
    """Seconds until `check` held."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out ({timeout:g} s) waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


@contextlib.contextmanager
def balancer_pair() -> Iterator[World]:
    for program in ("qemu-system-x86_64", "haproxy", "keepalived", "ip"):
        require_program(program)
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    # under /run: keepalived runs only scripts whose folders no other user can write
    root = Path(tempfile.mkdtemp(prefix="ipx-vrrp-", dir="/run"))
    destroy_domains(f"{POOL}-")
    lab = NetLab()
    nodes: list[Node] = []
    runtime: Runtime | None = None
    try:
        net = free_subnet()
        host, newcomer, vip = str(net[1]), str(net[2]), str(net[100])
        switch = lab.ns("sw")
        host_end, host_port = lab.veth(None, "vrh", switch, "vrhp")
        lab.address(None, host_end, f"{host}/24")
        lab.address(None, host_end, f"{newcomer}/24")
        ports = [host_port]
        for index, name in enumerate(("lb1", "lb2")):
            ns = lab.ns(name)
            inside, port = lab.veth(ns, f"v{name}", switch, f"v{name}p")
            address = str(net[11 + index])
            lab.address(ns, inside, f"{address}/24")
            workdir = root / name
            workdir.mkdir()
            nodes.append(Node(name, ns, address, workdir))
            ports.append(port)
        peers = tuple(Peer(n.name, Endpoint(n.address, PEER_PORT)) for n in nodes)
        for node in nodes:
            node.peers = peers
        lab.bridge(switch, "br0", ports)
        check = root / "check-haproxy"
        shutil.copy(EXAMPLE / "check-haproxy", check)
        check.chmod(0o755)
        for node in nodes:
            node.adapter(manage=True).ensure_frontend()  # HAProxy up in its namespace
        for node, priority in zip(nodes, (150, 100), strict=True):
            interface = f"v{node.name}{lab.tag}"
            start_keepalived(
                lab,
                node,
                keepalived_conf(node, interface=interface, vip=vip, priority=priority, check=check),
            )
            if node.name == "lb1":  # lb1 leads: it takes the address before lb2 starts
                eventually(lambda: vip in lab.addresses(nodes[0].ns), "lb1 to take the VIP", 30)

        base = tiny_base_image(root / "tiny-v1")
        settings = Settings(
            state_db=root / "state" / "state.db",
            run_dir=root / "run",
            registry=root / "registry",
            image_store=root / "images",
            hypervisor=HypervisorSettings(driver="libvirt", uri="qemu:///system"),
        )
        group = BalancerGroup([(n.name, n.adapter(manage=False)) for n in nodes])
        runtime = bootstrap(settings, Adapters(balancer=group, images=OneImage(base)))
        first = _free_port_pair(host)
        spec = PoolSpec(
            name=POOL,
            image="tiny",
            initial=2,
            free=2,
            max=3,
            memory=192 * 1024**2,
            port_first=first,
            port_last=first + 2,
            display_address=host,  # VNC where the balancer namespaces reach it
            recycle_after=600.0,
            boot_timeout=180.0,
        )
        yield World(lab, (nodes[0], nodes[1]), vip, host, newcomer, runtime, spec, root)
    finally:
        if runtime is not None:
            runtime.close()
        destroy_domains(f"{POOL}-")
        for node in nodes:
            if node.keepalived is not None:
                node.keepalived.terminate()
                try:
                    node.keepalived.wait(10)
                except subprocess.TimeoutExpired:
                    node.keepalived.kill()
            with contextlib.suppress(OSError, ValueError):
                os.kill(node.haproxy_pid(), signal.SIGKILL)
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


def _free_port_pair(host: str) -> int:
    """The first of three consecutive ports free on `host`."""
    for first in range(15900, 16900, 3):
        if all(_free(host, first + i) for i in range(3)):
            return first
    raise AssertionError(f"no three consecutive free ports on {host}")


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def vnc_handshake(vip: str, timeout: float, source: str | None = None) -> str:
    """A new VNC client through the address (from this host's address `source`); the
    desktop's name from its ServerInit."""
    viewer = VncClient(vip, PORT, timeout=timeout, source=source)
    try:
        return viewer.handshake().removeprefix("QEMU (").removesuffix(")")
    finally:
        viewer.close()


@dataclass(frozen=True)
class Failover:
    address_moved: float  # seconds from the kill until the standby holds the address
    first_handshake: float  # seconds from the kill until a new VNC client got a desktop
    desktop: str  # the desktop that client reached


def kill_and_reach(world: World, active: Node, standby: Node) -> Failover:
    """Kill the active HAProxy; time the address moving to `standby` and the first VNC
    handshake through it, from the newcomer's machine."""
    killed = active.haproxy_pid()
    start = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    moved = eventually(
        lambda: world.vip in world.lab.addresses(standby.ns),
        f"the address to move to {standby.name}",
        30,
    )
    reached: list[str] = []

    def handshake() -> bool:
        try:
            reached.append(vnc_handshake(world.vip, timeout=1.0, source=world.newcomer_address))
        except OSError:
            return False
        return True

    eventually(handshake, "a VNC handshake through the moved address", 30)
    return Failover(moved, time.monotonic() - start, reached[-1])
