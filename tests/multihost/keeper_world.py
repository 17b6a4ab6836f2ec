"""A real keeper over the lab's hosts (lab.py): the planner with placement, the multi-host
libvirt adapter, a real registry (whose sha256 gate the uploads), a real HAProxy in the root
namespace and the SQLite state. Used by tests/multihost/test_multihost_keeper.py and
benchmarks/bench_hosts.py.

    with keeper_world(lab, base, pool_hosts=("host1",)) as world:
        world.until("full", lambda: len(world.ready()) == 6)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    StartMode,
)
from imagepipe.stores.sqlite import SQLiteStore
from tests.e2e.harness import write_settings
from tests.guest import SerialConsole
from tests.host import free_port
from tests.multihost.lab import HostLab, NamespacedHost

POOL_IMAGE = "tinyk"
WAIT = 240.0  # six TCG guests booting on a shared 2-core machine


@dataclass
class World:
    lab: HostLab
    hv: MultiHostHypervisor
    balancer: HAProxyBalancer
    keeper: Keeper
    bind: int
    version: int
    registry: Registry
    store: SQLiteStore
    workdir: Path
    base: BaseImage

    def __str__(self) -> str:
        """The pool as the hosts, the balancer and the store have it (for failures)."""
        ready = self.ready()
        records = self.store.load_pool("mhk").clones
        rows = [
            f"{n} {c.host} v{c.version} {c.power.value} "
            f"{'ready' if n in ready else '-'} {records[n].state.value if n in records else '?'}"
            for n, c in sorted(self.mine().items())
        ]
        hosts = [
            f"{h.name} {'up' if h.connected else 'lost'} {h.versions}" for h in self.hv.hosts()
        ]
        return "; ".join(rows + hosts)

    def host(self, name: str) -> NamespacedHost:
        return next(h for h in self.lab.hosts if h.name == name)

    def on(self, host: str) -> set[str]:
        """The pool's desktops the hypervisor sees on `host`."""
        return {n for n, c in self.mine().items() if c.host == host}

    def register(self) -> int:
        """A new version of the pool's image, as a build registers it (`latest` moves to it:
        the pool rolls onto it); its number."""
        n = len(self.registry.versions(POOL_IMAGE))
        record = self.registry.register(
            NewVersion(
                image=POOL_IMAGE,
                fingerprint=f"multihost-keeper-test-{n + 1}",
                builder="test",
                packer_version="none",
                files=built_files(self.base, self.workdir / f"build{n + 1}"),
                disk=self.base.disk,
                kernel=self.base.kernel,
                initrd=self.base.initrd,
                cmdline=self.base.cmdline,
            )
        )
        self.version = record.version
        return record.version

    def settled(self) -> bool:
        """Six free desktops of the current version ready, nothing else left of the pool."""
        mine = self.mine()
        return (
            len(mine) == 6
            and all(c.version == self.version for c in mine.values())
            and self.ready() == set(mine)
        )

    def steer(self, host: str) -> None:
        """Until the next pass, the balancer offers only `host`'s desktops (the others are
        drained there): the next user lands on `host`."""
        for name in self.ready() - self.on(host):
            self.balancer.drain(name)

    def console(self, name: str, host: str | None = None) -> SerialConsole:
        """The serial console of a desktop (on `host`, default where it is seen): its socket
        on the host, reached through the host's private folder, as someone at the host's
        console would (a login there is a user the guest agent reports)."""
        on = host if host is not None else self.mine()[name].host
        path = self.host(on).path(f"/var/lib/libvirt/qemu/imagepipe-{name}.console")
        return SerialConsole(path, timeout=60)

    def settings(self) -> Path:
        """An imagepipe.yml for the CLI: this world's state database and hosts."""
        hosts = "".join(
            f"  - {{name: {h.name}, uri: '{h.uri}', address: {h.address}}}\n"
            for h in self.lab.hosts
        )
        return write_settings(
            self.workdir, bind_port=self.bind, store=self.workdir, settings=f"hosts:\n{hosts}"
        )

    def mine(self) -> dict[str, CloneInfo]:
        return {c.name: c for c in self.hv.list_clones() if c.pool == "mhk"}

    def ready(self) -> set[str]:
        return {b.name for b in self.balancer.list_backends() if b.state is BackendState.READY}

    def until(self, what: str, check: Callable[[], bool], wait: float = WAIT) -> float:
        """Run keeper passes until `check()`; the seconds it took."""
        started = shown = time.monotonic()
        while True:
            self.keeper.run_pass()
            if check():
                return time.monotonic() - started
            if time.monotonic() - shown > 30:  # a slow wait says where it stands
                shown = time.monotonic()
                print(f"still not {what} after {shown - started:.0f} s: {self}")
            assert time.monotonic() - started < wait, f"not {what} after {wait:.0f} s: {self}"
            time.sleep(0.5)


def built_files(base: BaseImage, folder: Path) -> tuple[Path, ...]:
    """Copies of the version's files, as a build leaves them (register moves them away)."""
    folder.mkdir()
    files = [f for f in (base.disk, base.kernel, base.initrd) if f is not None]
    return tuple(Path(shutil.copy(base.directory / f, folder / f)) for f in files)


@contextlib.contextmanager
def keeper_world(
    lab: HostLab, lab_base: BaseImage, pool_hosts: tuple[str, ...] = ()
) -> Iterator[World]:
    """A pool `mhk` of 6 free desktops (start: boot) kept over the lab's hosts (or those
    named), everything removed at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="iphvk-", dir="/tmp"))  # short: unix socket paths
    try:
        with _keeper_world(lab, lab_base, pool_hosts, workdir) as world:
            yield world
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _keeper_world(
    lab: HostLab, lab_base: BaseImage, pool_hosts: tuple[str, ...], workdir: Path
) -> Iterator[World]:
    registry = Registry(workdir / "registry", workdir / "images")
    record = registry.register(
        NewVersion(
            image=POOL_IMAGE,
            fingerprint="multihost-keeper-test",
            builder="test",
            packer_version="none",
            files=built_files(lab_base, workdir / "build"),
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
    # the version on every host first, as a rollout leaves it: the fill's spread does not
    # depend on which upload finishes first
    hv.list_clones()
    deadline = time.monotonic() + WAIT
    base = registry.resolve(POOL_IMAGE, record.version).base_image()
    while not all([hv.ensure_version(h.name, base) for h in hosts]):
        assert time.monotonic() < deadline, "the version did not reach every host"
        time.sleep(0.2)
    bind = free_port()
    balancer = HAProxyBalancer(
        bind=f"127.0.0.1:{bind}",
        admin_socket=workdir / "haproxy.sock",
        config_path=workdir / "haproxy.cfg",
        pid_file=workdir / "haproxy.pid",
        manage=True,
    )
    (workdir / "state").mkdir()
    store = SQLiteStore(workdir / "state" / "state.db")  # where World.settings() says
    pool = PoolSpec(
        name="mhk",
        image=POOL_IMAGE,
        start=StartMode.BOOT,
        initial=6,
        free=6,
        max=6,
        memory=128 * 1024**2,
        recycle_after=5.0,  # a session's end: reset (or deleted) 5 s later, not after 60 s
        port_first=5930,
        port_last=5949,
        hosts=pool_hosts,
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
        yield World(
            lab, hv, balancer, keeper, bind, record.version, registry, store, workdir, lab_base
        )
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
