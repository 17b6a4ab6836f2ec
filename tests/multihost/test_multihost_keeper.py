"""The keeper over three real libvirt hosts (lab.py): the real planner with placement, the
multi-host libvirt adapter, a real registry (whose sha256 gate the uploads), a real HAProxy
in the root namespace and the SQLite state. A pool of 6 spreads 2/2/2 and a VNC client
through HAProxy reaches a desktop on another host's address."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import SystemClock
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import (
    BackendState,
    BaseImage,
    CloneInfo,
    HostSpec,
    PoolSpec,
    Power,
    StartMode,
)
from imagepipe.stores.sqlite import SQLiteStore
from tests.conftest import require_program
from tests.guest import VncClient
from tests.host import free_port
from tests.multihost.lab import HostLab
from tests.multihost.test_multihost_libvirt import domain_id, rfb_banner

pytestmark = pytest.mark.real

WAIT = 240.0  # six TCG guests booting on a shared 2-core machine


@dataclass
class World:
    lab: HostLab
    hv: MultiHostHypervisor
    balancer: HAProxyBalancer
    keeper: Keeper
    bind: int
    version: int

    def mine(self) -> dict[str, CloneInfo]:
        return {c.name: c for c in self.hv.list_clones() if c.pool == "mhk"}

    def ready(self) -> set[str]:
        return {b.name for b in self.balancer.list_backends() if b.state is BackendState.READY}

    def until(self, what: str, check: Callable[[], bool], wait: float = WAIT) -> float:
        """Run keeper passes until `check()`; the seconds it took."""
        started = time.monotonic()
        while True:
            self.keeper.run_pass()
            if check():
                return time.monotonic() - started
            assert time.monotonic() - started < wait, f"not {what} after {wait:.0f} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def world(lab: HostLab, lab_base: BaseImage) -> Iterator[World]:
    require_program("haproxy")
    workdir = Path(tempfile.mkdtemp(prefix="iphvk-", dir="/tmp"))  # short: unix socket paths
    registry = Registry(workdir / "registry", workdir / "images")
    record = registry.register(
        NewVersion(
            image="tinyk",
            fingerprint="multihost-keeper-test",
            builder="test",
            packer_version="none",
            files=tuple(
                lab_base.directory / f
                for f in (lab_base.disk, lab_base.kernel, lab_base.initrd)
                if f is not None
            ),
            disk=lab_base.disk,
            kernel=lab_base.kernel,
            initrd=lab_base.initrd,
            cmdline=lab_base.cmdline,
        )
    )

    def checksums(base: BaseImage) -> dict[str, str]:
        found = registry.resolve(base.image, base.version)
        return {a.name: a.sha256 for a in found.artifacts}

    hosts = tuple(HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts)
    hv = MultiHostHypervisor(hosts, state_dir=workdir / "clones", checksums=checksums)
    bind = free_port()
    balancer = HAProxyBalancer(
        bind=f"127.0.0.1:{bind}",
        admin_socket=workdir / "haproxy.sock",
        config_path=workdir / "haproxy.cfg",
        pid_file=workdir / "haproxy.pid",
        manage=True,
    )
    store = SQLiteStore(workdir / "state.db")
    pool = PoolSpec(
        name="mhk",
        image="tinyk",
        start=StartMode.BOOT,
        initial=6,
        free=6,
        max=6,
        memory=128 * 1024**2,
        port_first=5930,
        port_last=5949,
    )
    keeper = Keeper(
        hypervisor=hv,
        balancer=balancer,
        store=store,
        images=registry,
        specs=[pool],
        clock=SystemClock(),
        settings=KeeperOptions(tick=1.0),
        hosts=hosts,
    )
    try:
        yield World(lab, hv, balancer, keeper, bind, record.version)
    finally:
        for host in lab.hosts:
            host.mend()
        with contextlib.suppress(Exception):
            for clone in hv.list_clones():
                if clone.pool == "mhk":
                    with contextlib.suppress(Exception):
                        hv.delete(clone.name)
        with contextlib.suppress(Exception):
            balancer.shutdown()
        hv.close()
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)


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
    host2 = world.lab.hosts[1]
    target = sorted(c for c, i in world.mine().items() if i.host == "host2")[0]
    display = world.mine()[target].display
    assert display is not None
    user = VncClient(display.host, display.port)
    user.handshake()
    try:
        world.until("the session seen", lambda: target not in world.ready(), wait=30)
        before = domain_id(host2, target)
        host2.cut()

        def others() -> set[str]:
            on_others = {n for n, c in world.mine().items() if c.host in ("host1", "host3")}
            return on_others & world.ready()

        refill = world.until("refilled on host1 and host3", lambda: len(others()) >= 5)
        lost = next(h for h in world.hv.hosts() if h.name == "host2")
        assert not lost.connected
        host2.mend()
        world.until("host2 seen again", lambda: target in world.mine(), wait=60)
        assert domain_id(host2, target) == before  # the same QEMU: never touched
        assert world.mine()[target].power is Power.RUNNING
        assert world.hv.sessions(target).client is not None  # the user is still on it
        print(f"after the cut the pool was refilled on the other hosts in {refill:.1f} s")
    finally:
        user.close()
