"""IPVS across hosts: the IPVS director test machine (tests/ipvs_director.py, a real IPVS
kernel under QEMU) in front of desktops on two of the lab's hosts (lab.py), NAT (masq).

What this machine allows, and what it does not show (docs/ipvs.md "Several hosts"): the
director reaches each host's address through QEMU's user network, which proxies the TCP
connection from this machine's root namespace over the lab's veths; so the NAT return
path (the hosts' replies to clients going back through the director) is QEMU's, not a
route the test sets. Real: IPVS's scheduling, threshold, drain and NAT to real servers on
two hosts at addresses of their own, reached by a client through the VIP.
"""

from __future__ import annotations

import ctypes
import socket
import threading
from collections.abc import Iterator

import pytest

from imagepipe.pool.model import Endpoint
from tests.integration.balancers import Desktop, IPVSHarness, director, ipvs_harness
from tests.ipvs_director import DESKTOP_HOST
from tests.multihost.lab import SUBNET, HostLab, NamespacedHost

pytestmark = pytest.mark.real
__all__ = ["director", "ipvs_harness"]  # the director machine's fixtures, as integration's

CLONE_NEWNET = 0x40000000


def listener_in(host: NamespacedHost) -> socket.socket:
    """A TCP listener on the host's address, made inside its network namespace (a thread
    joins it with setns; the socket stays there)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open(f"/run/netns/{host.netns}") as handle:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {host.netns}")
            made.append(socket.create_server((host.address, 0)))
        except BaseException as exc:  # handed to the caller
            made.append(exc)

    thread = threading.Thread(target=make)  # its namespace dies with it
    thread.start()
    thread.join()
    [result] = made
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.fixture
def desktops(
    lab: HostLab, ipvs_harness: IPVSHarness
) -> Iterator[list[tuple[NamespacedHost, Desktop]]]:
    """A desktop on host1 and one on host2; the director routes the lab's addresses out of
    its desktops' side (eth1), as a director's route to the hosts' network."""
    route = f"{SUBNET}.0.0/16"
    ipvs_harness.director.run("ip", "route", "replace", route, "via", DESKTOP_HOST, "dev", "eth1")
    made = [(host, Desktop(listener_in(host))) for host in lab.hosts[:2]]
    try:
        yield made
    finally:
        for _, desktop in made:
            desktop.stop()
        ipvs_harness.director.runner.run(["ip", "route", "del", route])


def test_ipvs_nat_puts_one_user_on_each_hosts_desktop_through_the_vip(
    ipvs_harness: IPVSHarness, desktops: list[tuple[NamespacedHost, Desktop]]
) -> None:
    """Two desktops, on host1 and host2 (each at its host's address): two users through the
    VIP land one on each (threshold 1), a third gets none, a drained one takes no new user
    while its user stays connected."""
    harness = ipvs_harness
    balancer = harness.new_adapter()
    balancer.ensure_frontend()
    where = {}
    for index, (host, desktop) in enumerate(desktops, start=1):
        endpoint = Endpoint(host.address, desktop.port)
        balancer.enable(f"mh-{index}", endpoint)
        where[desktop.port] = host.name
    first, second = harness.connect(), harness.connect()
    try:
        landed = {c.landed_on.port for c in (first, second) if c.landed_on is not None}
        assert {where[p] for p in landed} == {"host1", "host2"}, landed
        third = harness.connect()
        assert third.landed_on is None  # every desktop has its user
        third.close()

        on_host2 = first if where[first.landed_on.port] == "host2" else second  # type: ignore[union-attr]
        balancer.drain("mh-2")
        on_host2.close()
        harness.eventually(lambda: desktops[1][1].open == 0, "host2's user gone")
        again = harness.connect()
        assert again.landed_on is None  # host1 is busy, host2 drained
        again.close()
        assert (first if on_host2 is second else second).alive()
    finally:
        for client in (first, second):
            client.close()
