"""End to end on IPVS: the keeper's real tiny desktops (libvirt + QEMU, VNC on this host's
loopback) are the real servers of a real IPVS kernel (the director test machine), and a
VNC client connecting to the VIP reaches a desktop.

The keeper runs in this process with the IPVS adapter's runner inside the director (a real
director would run the keeper itself). The director reaches this host's loopback at
10.0.3.2, so the only test-side piece is `ViaDirector`: it hands IPVS each desktop's VNC
port at that address, as a separate director would reach a hypervisor host by its address.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.config import HypervisorSettings, Settings
from imagepipe.pool.model import Backend, BackendState, BaseImage, CloneState, Endpoint, PoolSpec
from tests.conftest import libvirt_available, require, require_program
from tests.guest import VncClient, tiny_base_image
from tests.host import destroy_domains, free_port_range
from tests.ipvs_director import Director, build_director

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "ipvse2e"
WAIT = 240.0  # TCG desktops on a shared 2-core host


@dataclass(frozen=True)
class OneVersion:
    base: BaseImage

    @property
    def version(self) -> int:
        return self.base.version

    def base_image(self) -> BaseImage:
        return self.base


@dataclass(frozen=True)
class OneImage:
    """The registry's resolve() for the one tiny version this test made."""

    base: BaseImage

    def resolve(self, image: str, ref: str | int | None = None) -> OneVersion:
        return OneVersion(self.base)


class ViaDirector:
    """The IPVS balancer, reaching this host's desktops the way the director does."""

    def __init__(self, inner: IPVSBalancer, host: str) -> None:
        self.inner = inner
        self.host = host

    def ensure_frontend(self) -> None:
        self.inner.ensure_frontend()

    def list_backends(self) -> list[Backend]:
        return self.inner.list_backends()

    def enable(self, name: str, address: Endpoint) -> None:
        self.inner.enable(name, Endpoint(self.host, address.port))

    def drain(self, name: str) -> None:
        self.inner.drain(name)

    def remove(self, name: str) -> None:
        self.inner.remove(name)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Runtime, Director, PoolSpec]]:
    require_program("qemu-system-x86_64")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    root = Path(tempfile.mkdtemp(prefix="ipv-e2e-", dir="/tmp"))  # short: socket paths
    destroy_domains(f"{POOL}-")
    director = Director.boot(build_director(root / "director"), root / "run")
    runtime: Runtime | None = None
    try:
        base = tiny_base_image(root / "tiny-v1")
        settings = Settings(
            state_db=root / "state" / "state.db",
            run_dir=root / "run",
            registry=root / "registry",
            image_store=root / "images",
            hypervisor=HypervisorSettings(driver="libvirt", uri="qemu:///system"),
        )
        balancer = IPVSBalancer(
            vip=director.vip.host,
            port=director.vip.port,
            names_file="/var/lib/imagepipe/ipvs-e2e.names",
            runner=director.runner,
        )
        runtime = bootstrap(
            settings,
            Adapters(balancer=ViaDirector(balancer, director.desktop_host), images=OneImage(base)),
        )
        first, last = free_port_range(2)
        spec = PoolSpec(
            name=POOL,
            image="tiny",
            initial=1,
            free=1,
            max=2,
            memory=192 * 1024**2,
            port_first=first,
            port_last=last,
            display_address="127.0.0.1",
            recycle_after=3.0,
            boot_timeout=180.0,
        )
        yield runtime, director, spec
    finally:
        if runtime is not None:
            runtime.close()
        destroy_domains(f"{POOL}-")
        director.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_vnc_client_through_the_vip_reaches_a_desktop_the_keeper_put_in_ipvs(
    world: tuple[Runtime, Director, PoolSpec],
) -> None:
    runtime, director, spec = world
    keeper = runtime.keeper([spec])
    balancer = runtime.balancer

    def passes_until(what: str, check: object) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            keeper.run_pass()
            if check():  # type: ignore[operator]
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1.0)

    def states() -> dict[str, CloneState]:
        return {n: r.state for n, r in runtime.store.load_pool(POOL).clones.items()}

    def ready_in_ipvs() -> list[str]:
        return [b.name for b in balancer.list_backends() if b.state is BackendState.READY]

    passes_until("a free desktop in IPVS", lambda: bool(ready_in_ipvs()))
    (free,) = ready_in_ipvs()

    viewer = VncClient(director.frontend.host, director.frontend.port, timeout=30)
    try:
        name = viewer.handshake().removeprefix("QEMU (").removesuffix(")")
        assert name == free
        assert {b.name: b.connections for b in balancer.list_backends()}[name] == 1
        passes_until(
            f"{name} in use, drained in IPVS, and a new free desktop",
            lambda: (
                states().get(name) is CloneState.IN_USE
                and {b.name: b.state for b in balancer.list_backends()}.get(name)
                is BackendState.DRAIN
                and len(ready_in_ipvs()) == 1
            ),
        )
    finally:
        viewer.close()
    keeper.stop()
