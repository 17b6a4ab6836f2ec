"""The keeper over three real libvirt hosts (keeper_world.py): a pool of 6 spreads 2/2/2 and
a VNC client through HAProxy reaches a desktop on a host's address; a cut host with a user on
it is refilled on the others, its desktop left running with the user on it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from imagepipe.pool.model import BaseImage, Power
from tests.conftest import require_program
from tests.guest import VncClient
from tests.multihost.keeper_world import World, keeper_world
from tests.multihost.lab import HostLab
from tests.multihost.test_multihost_libvirt import domain_id, rfb_banner

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def world(lab: HostLab, lab_base: BaseImage) -> Iterator[World]:
    require_program("haproxy")
    with keeper_world(lab, lab_base) as made:
        yield made


def test_a_pool_of_six_fills_two_two_two_over_three_hosts_behind_one_haproxy(
    world: World,
) -> None:
    fill = world.until("full", lambda: len(world.ready()) == 6)
    clones = world.mine()
    assert Counter(c.host for c in clones.values()) == {"host1": 2, "host2": 2, "host3": 2}
    assert all(c.power is Power.RUNNING for c in clones.values())
    addresses = {h.name: h.address for h in world.lab.hosts}
    for info in clones.values():  # each listens on its host's address, for the balancer
        assert info.display is not None and info.display.host == addresses[info.host]
    assert rfb_banner("127.0.0.1", world.bind).startswith(b"RFB 003.")  # through HAProxy
    assert all(("tinyk", world.version) in h.versions for h in world.hv.hosts())
    print(f"pool of 6 over 3 hosts ready behind HAProxy after {fill:.1f} s")


def test_a_cut_host_with_a_user_on_it_is_refilled_elsewhere_and_its_desktop_left_alone(
    world: World,
) -> None:
    world.until("full", lambda: len(world.ready()) == 6)
    # a user arrives through HAProxy; the desktop it got leaves the balancer's offer
    user = VncClient("127.0.0.1", world.bind)
    user.handshake()
    try:
        offered = world.ready()
        world.until("the session seen", lambda: len(world.ready() & offered) == 5, wait=30)
        target = next(iter(offered - world.ready()))
        cut_name = world.mine()[target].host
        host2 = next(h for h in world.lab.hosts if h.name == cut_name)
        rest = tuple(h.name for h in world.lab.hosts if h.name != cut_name)
        before = domain_id(host2, target)
        host2.cut()

        def others() -> set[str]:
            on_others = {n for n, c in world.mine().items() if c.host in rest}
            return on_others & world.ready()

        refill = world.until("refilled on the other hosts", lambda: len(others()) >= 5)
        lost = next(h for h in world.hv.hosts() if h.name == cut_name)
        assert not lost.connected
        host2.mend()
        world.until("the cut host seen again", lambda: target in world.mine(), wait=60)
        assert domain_id(host2, target) == before  # the same QEMU: never touched
        assert world.mine()[target].power is Power.RUNNING
        assert world.hv.sessions(target).client is not None  # the user is still on it
        print(f"after the cut the pool was refilled on the other hosts in {refill:.1f} s")
    finally:
        user.close()
