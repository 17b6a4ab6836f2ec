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
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import SystemClock
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import BackendState, BaseImage, HostSpec, PoolSpec, Power, StartMode
from imagepipe.stores.sqlite import SQLiteStore
from tests.conftest import require_program
from tests.host import free_port
from tests.multihost.lab import HostLab
from tests.multihost.test_multihost_libvirt import rfb_banner

pytestmark = pytest.mark.real

WAIT = 240.0  # six TCG guests booting on a shared 2-core machine


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="iphvk-", dir="/tmp"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_pool_of_six_fills_two_two_two_over_three_hosts_behind_one_haproxy(
    lab: HostLab, lab_base: BaseImage, workdir: Path
) -> None:
    require_program("haproxy")
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
    started = time.monotonic()
    try:
        ready: list[str] = []
        while True:
            keeper.run_pass()
            clones = [c for c in hv.list_clones() if c.pool == "mhk"]
            ready = [b.name for b in balancer.list_backends() if b.state is BackendState.READY]
            if len(ready) == 6:
                break
            assert time.monotonic() - started < WAIT, (
                f"pool not full after {WAIT:.0f} s: {len(ready)} ready, "
                f"{Counter(c.host for c in clones)}"
            )
            time.sleep(1.0)
        fill = time.monotonic() - started
        assert Counter(c.host for c in clones) == {"host1": 2, "host2": 2, "host3": 2}
        assert all(c.power is Power.RUNNING for c in clones)
        by_host = {c.name: c for c in clones}
        for name in ready:  # each desktop listens on its host's address, for the balancer
            info = by_host[name]
            address = next(h.address for h in hosts if h.name == info.host)
            assert info.display is not None and info.display.host == address
        assert rfb_banner("127.0.0.1", bind).startswith(b"RFB 003.")  # through HAProxy
        assert all(("tinyk", record.version) in h.versions for h in hv.hosts())
        print(f"pool of 6 over 3 hosts full (ready behind HAProxy) after {fill:.1f} s")
    finally:
        for clone in hv.list_clones():
            if clone.pool == "mhk":
                with contextlib.suppress(Exception):
                    hv.delete(clone.name)
        with contextlib.suppress(Exception):
            balancer.shutdown()
        hv.close()
        store.close()
