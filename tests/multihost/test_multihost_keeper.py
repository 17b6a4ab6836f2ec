"""The keeper over three real libvirt hosts (keeper_world.py), one scenario a test, in one
keeper world: a pool of 6 spreads 2/2/2 behind one HAProxy; a rollout across hosts holds a
user on the old version; `imagepipe hosts drain` with a user on the host; a cut host with a
user on it is refilled elsewhere and reconciled when the link returns; a killed libvirtd;
a host that cannot take the new version. Each prints its time."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from imagepipe.hypervisors.libvirt.volumes import POOL_DIR, file_volume
from imagepipe.pool.model import BaseImage, CloneState, Power
from imagepipe.record import replace
from tests.conftest import require_program
from tests.e2e.harness import desktop_of, run_cli
from tests.guest import SerialConsole, VncClient
from tests.multihost.keeper_world import POOL_IMAGE, World, keeper_world
from tests.multihost.lab import HostLab
from tests.multihost.test_multihost_libvirt import domain_id, rfb_banner

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def world(lab: HostLab, lab_base: BaseImage) -> Iterator[World]:
    require_program("haproxy")
    with keeper_world(lab, lab_base) as made:
        yield made


@dataclass
class User:
    """A VNC viewer through HAProxy on `desktop` (and maybe a console login on it)."""

    desktop: str
    viewer: VncClient
    console: SerialConsole | None = None

    def login(self, world: World, name: str) -> None:
        """Log in on the desktop's serial console and leave a file in the user's home."""
        self.console = world.console(self.desktop)
        self.console.login(name)
        self.console.run(f"echo {name}-was-here > /home/{name}-file && sync")

    def leave(self) -> None:
        if self.console is not None:
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                self.console.logout()
            self.console.close()
        self.viewer.close()


def arrive_on(world: World, host: str) -> User:
    """A user connects through HAProxy and lands on a free desktop of `host`; returns once
    the keeper has that desktop in use."""
    world.until("settled", world.settled)
    world.steer(host)
    viewer = VncClient("127.0.0.1", world.bind, timeout=30)
    try:
        name = desktop_of(viewer)
        assert world.mine()[name].host == host
        world.until(f"{name} in use", lambda: state(world, name) is CloneState.IN_USE, wait=30)
    except BaseException:
        viewer.close()
        raise
    return User(name, viewer)


def state(world: World, name: str) -> CloneState | None:
    record = world.store.load_pool("mhk").clones.get(name)
    return None if record is None else record.state


def ready_on(world: World, hosts: set[str]) -> set[str]:
    return {n for n, c in world.mine().items() if c.host in hosts} & world.ready()


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
    assert all((POOL_IMAGE, world.version) in h.versions for h in world.hv.hosts())
    print(f"pool of 6 over 3 hosts ready behind HAProxy after {fill:.1f} s")


def test_a_rollout_uploads_to_every_host_first_and_holds_a_user_on_the_old_version_until_logoff(
    world: World,
) -> None:
    user = arrive_on(world, "host2")
    started = time.monotonic()
    try:
        before = domain_id(world.host("host2"), user.desktop)
        new = world.register()
        world.keeper.run_pass()
        # the first pass after the move sends the version to every host of the pool
        for host in world.hv.hosts():
            up = host.upload
            sending = up is not None and (up.image, up.version) == (POOL_IMAGE, new)
            assert (POOL_IMAGE, new) in host.versions or sending, host

        def rolled() -> bool:
            mine = world.mine()
            holding = {h.name for h in world.hv.hosts() if (POOL_IMAGE, new) in h.versions}
            for name, info in mine.items():  # no new desktop on a host without the version
                assert info.version != new or info.host in holding, (name, info.host, holding)
            old = {n for n, c in mine.items() if c.version != new}
            fresh = {n for n, c in mine.items() if c.version == new}
            return old == {user.desktop} and len(fresh & world.ready()) >= 5

        world.until("the free old desktops replaced", rolled)
        # the held desktop: the same QEMU, the user still on it, never offered
        assert domain_id(world.host("host2"), user.desktop) == before
        assert world.hv.sessions(user.desktop).client is not None
        assert user.desktop not in world.ready()
        # every host gets the version; which hosts the new desktops went to depends on which
        # uploads had finished when they were made (a pool does not wait for an upload)
        world.until(
            "the new version on every host",
            lambda: all((POOL_IMAGE, new) in h.versions for h in world.hv.hosts()),
        )
    finally:
        user.leave()
    world.until("the held desktop replaced after logoff", world.settled)
    assert user.desktop not in world.mine()
    took = time.monotonic() - started
    print(f"rollout across 3 hosts with a user held on the old version: {took:.1f} s")


def test_hosts_drain_moves_free_desktops_elsewhere_and_keeps_the_user_until_logoff(
    world: World,
) -> None:
    user = arrive_on(world, "host1")
    started = time.monotonic()
    config = world.settings()
    try:
        on_host1 = world.on("host1")
        out = run_cli(config, "hosts", "drain", "host1")
        assert "host1 is draining" in out

        def moved() -> bool:
            assert world.on("host1") <= on_host1  # no new desktop there
            return world.on("host1") == {user.desktop} and len(world.ready()) >= 5

        took = world.until("free desktops moved off host1", moved)
        print(f"drain: the free desktops moved off host1 in {took:.1f} s")
        assert world.hv.sessions(user.desktop).client is not None
        assert state(world, user.desktop) is CloneState.IN_USE
    finally:
        user.leave()
    took = world.until("host1 empty after logoff", lambda: not world.on("host1"))
    print(f"drain: host1 empty {took:.1f} s after the logoff")
    took = world.until("settled", world.settled)
    print(f"drain: pool back at 6 free {took:.1f} s later")
    assert "host1 takes new desktops again" in run_cli(config, "hosts", "undrain", "host1")
    assert world.store.draining_hosts() == {}
    print(f"drain of a host with a user on it: {time.monotonic() - started:.1f} s")


def test_a_cut_host_is_refilled_elsewhere_and_reconciled_when_its_link_returns(
    world: World,
) -> None:
    user = arrive_on(world, "host2")
    started = time.monotonic()
    host2 = world.host("host2")
    try:
        user.login(world, "ada")
        free = world.on("host2") - {user.desktop}
        assert free, "host2 has a free desktop besides the user's"
        before = domain_id(host2, user.desktop)
        host2.cut()
        others = {"host1", "host3"}
        refill = world.until(
            "refilled on the other hosts", lambda: len(ready_on(world, others)) >= 6
        )
        assert not next(h for h in world.hv.hosts() if h.name == "host2").connected
        # meanwhile somebody uses a free desktop of the cut host (at its console)
        for name in free:
            with world.console(name, "host2") as console:
                console.login("eve")
                console.run("echo eve-was-here > /home/eve-file && sync")
                console.logout()
        host2.mend()
        world.until("the cut host seen again", lambda: user.desktop in world.mine(), wait=60)
        # the desktop with a session: the same QEMU, tracked again as in use, not offered
        assert domain_id(host2, user.desktop) == before
        assert world.hv.sessions(user.desktop).client is not None
        world.until("reconciled", lambda: not (world.on("host2") & free))  # replaced: deleted
        assert state(world, user.desktop) is CloneState.IN_USE
        assert user.desktop not in world.ready()
    finally:
        user.leave()

    def reset_or_gone() -> bool:
        """The user's desktop serves nobody as the user left it: it is deleted, or reset
        before it is ready again."""
        if user.desktop in world.ready():
            with world.console(user.desktop) as console:
                console.login("next")
                assert "ada-was-here" not in console.run("cat /home/ada-file 2>&1")
                console.logout()
            return True
        return user.desktop not in world.mine()

    world.until("the user's desktop reset or deleted", reset_or_gone)
    world.until("settled", world.settled)
    took = time.monotonic() - started
    print(f"cut host with a user: refilled in {refill:.1f} s, all reconciled in {took:.1f} s")


def test_a_killed_libvirtd_marks_its_host_lost_and_is_reconciled_after_its_restart(
    world: World,
) -> None:
    world.until("settled", world.settled)
    started = time.monotonic()
    host3 = world.host("host3")
    on_host3 = world.on("host3")
    assert on_host3, "host3 has desktops"
    ids = {name: domain_id(host3, name) for name in on_host3}
    host3.kill_daemon()
    try:
        others = {"host1", "host2"}
        world.until("refilled on the other hosts", lambda: len(ready_on(world, others)) >= 6)
        assert not next(h for h in world.hv.hosts() if h.name == "host3").connected
        assert all(state(world, n) is not None for n in on_host3)  # remembered, not forgotten
    finally:
        host3.start_daemon()
    world.until(
        "host3 seen again", lambda: next(h for h in world.hv.hosts() if h.name == "host3").connected
    )
    for name in on_host3 & set(world.mine()):  # its guests ran on: the same QEMUs
        assert domain_id(host3, name) == ids[name]
    world.until("reconciled", world.settled)
    print(f"libvirtd of host3 killed and restarted: {time.monotonic() - started:.1f} s")


def test_a_host_without_a_copy_of_the_new_version_gets_no_desktops_of_it(world: World) -> None:
    world.until("settled", world.settled)
    started = time.monotonic()
    host3 = world.host("host3")
    coming = world.version + 1
    # a dangling link where host3's storage pool would write the next version's disk: libvirt
    # lists no volume of that name, yet cannot create one; the upload fails every time
    next_base = replace(world.base, image=POOL_IMAGE, version=coming)
    assert next_base.disk is not None
    blocker = host3.path(POOL_DIR) / file_volume(next_base, next_base.disk)
    blocker.symlink_to("/nonexistent/imagepipe-test-blocker")
    try:
        assert world.register() == coming

        def rolled() -> bool:
            mine = world.mine()
            assert not any(c.version == coming for c in mine.values() if c.host == "host3")
            return world.settled()

        world.until("rolled out on the hosts that hold it", rolled)
        assert Counter(c.host for c in world.mine().values()) == {"host1": 3, "host2": 3}
        host = next(h for h in world.hv.hosts() if h.name == "host3")
        assert (POOL_IMAGE, coming) not in host.versions and host.connected
    finally:
        blocker.unlink()
    world.until(
        "host3 holds the version once its storage takes it",
        lambda: (
            (POOL_IMAGE, coming) in next(h for h in world.hv.hosts() if h.name == "host3").versions
        ),
        wait=60,
    )
    print(f"rollout with a host that cannot take the version: {time.monotonic() - started:.1f} s")
