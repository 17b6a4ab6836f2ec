"""A balancer pair failing over for real: keepalived (VRRP, the shipped example file) moves
the users' address between two HAProxy in two network namespaces; the keeper keeps both
HAProxy in step over real tiny libvirt desktops on this host (tests/balancer_pair.py).

Killing the active HAProxy: keepalived's check fails, the address moves to lb2, and a new
VNC client (another machine) reaches a free desktop through the same address; the desktop
the first user was on keeps running with her login session and her files (the keeper does
not reset it); her VNC client, whose TCP connection went through the dead HAProxy,
reconnects through the address and reaches her own desktop: the two HAProxy share their
stick table (`persist: source`, HAProxy peers). The pass after the kill reports lb1
unreachable. The failover time is printed;
benchmarks/bench_balancer_failover.py measures it over several failovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from imagepipe.balancers.group import BalancerGroup
from imagepipe.pool.model import BackendState, CloneState, Power
from tests.balancer_pair import (
    FAILOVER_LIMIT,
    POOL,
    PORT,
    WAIT,
    World,
    balancer_pair,
    eventually,
    kill_and_reach,
    vnc_handshake,
)
from tests.guest import SerialConsole, VncClient

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with balancer_pair() as made:
        yield made


def test_killing_the_active_haproxy_moves_the_address_and_users_still_reach_a_desktop(
    world: World,
) -> None:
    runtime, spec, vip = world.runtime, world.spec, world.vip
    lb1, lb2 = world.nodes
    keeper = runtime.keeper([spec])
    group = runtime.balancer
    assert isinstance(group, BalancerGroup)

    def passes_until(what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            keeper.run_pass()
            if check():
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1.0)

    def ready() -> list[str]:
        return sorted(b.name for b in group.list_backends() if b.state is BackendState.READY)

    def states() -> dict[str, CloneState]:
        return {n: r.state for n, r in runtime.store.load_pool(POOL).clones.items()}

    passes_until("two free desktops in both HAProxy", lambda: len(ready()) == 2)
    for node in (lb1, lb2):
        backends = node.adapter(manage=False).list_backends()
        assert sorted(b.name for b in backends if b.state is BackendState.READY) == ready()
    assert vip in world.lab.addresses(lb1.ns) and vip not in world.lab.addresses(lb2.ns)

    user = VncClient(vip, PORT, timeout=30, source=world.user_address)  # through lb1
    taken = user.handshake().removeprefix("QEMU (").removesuffix(")")
    lb2_table = lb2.adapter(manage=False).admin
    eventually(
        lambda: f"key={world.user_address} " in lb2_table.command("show table desktops"),
        "lb2 to learn from lb1 which desktop she is on",
        10,
    )
    passes_until(
        f"{taken} in use and drained in both HAProxy",
        lambda: (
            states().get(taken) is CloneState.IN_USE
            and all(
                {b.name: b.state for b in n.adapter(manage=False).list_backends()}.get(taken)
                is BackendState.DRAIN
                for n in (lb1, lb2)
            )
        ),
    )
    passes_until("a free desktop besides", lambda: len([n for n in ready() if n != taken]) >= 1)
    console = SerialConsole(world.root / "state" / "clones" / "sockets" / f"{taken}.console")
    console.login("alice")  # a session on the desktop, besides the VNC connection
    console.run("echo alice-was-here > /tmp/work && sync")

    failover = kill_and_reach(world, lb1, lb2)
    print(
        f"\nfailover: address moved {failover.address_moved:.2f} s, "
        f"first VNC handshake {failover.first_handshake:.2f} s"
    )
    assert failover.first_handshake < FAILOVER_LIMIT, f"{failover.first_handshake:.1f} s"
    assert failover.desktop != taken, "the new user got a free desktop, not the one in use"
    assert vip not in world.lab.addresses(lb1.ns)

    # the user's desktop is untouched: still running, still theirs (not reset, not freed)
    report = keeper.run_pass()
    health = {h.name: h.reachable for h in report.observation.balancer_instances}
    assert health == {"lb1": False, "lb2": True}, "the pass reports the dead instance"
    clones = {c.name: c for c in runtime.hypervisor.list_clones()}
    assert clones[taken].power is Power.RUNNING
    assert states()[taken] in (CloneState.IN_USE, CloneState.DISCONNECTED)
    assert "alice-was-here" in console.run("cat /tmp/work"), "her session is untouched"
    user.close()  # its TCP connection went through the dead HAProxy: it reconnects
    again = vnc_handshake(vip, timeout=10.0, source=world.user_address)
    assert again == taken, "she is back on her own desktop through lb2"
    keeper.run_pass()
    assert states()[taken] in (CloneState.IN_USE, CloneState.DISCONNECTED)
    assert "alice-was-here" in console.run("cat /tmp/work")
    console.logout()
    console.close()
    keeper.stop()
