"""End to end on the VirtualBox adapter: `imagepipe keep` with `hypervisor.driver:
virtualbox` through pyvbox and the simulated VirtualBox (its VBoxSVC in its own process,
machines as real QEMU guests of the tiny image, VNC on the VRDE port, users from the guest
agent) behind real HAProxy, driven as a user would: `images import --from-vm`, a VNC client
on the HAProxy address, the desktops' serial consoles, `status --json`.

One simulated VirtualBox and one keeper per module; each test leaves the pool converged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import vboxsim
from tests.conftest import require_program
from tests.guest import SerialConsole, VncClient, tiny_base_image
from tests.host import free_port
from tests.vboxsim.api import Boot

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "vbe2e"
FREE = 2
MAX = 4
RECYCLE_AFTER = 3  # seconds
PORTS = (5970, 5979)
WAIT = 180.0


@dataclass
class Site:
    root: Path
    config: Path
    bind_port: int
    server: vboxsim.Server
    keeper: subprocess.Popen[bytes] | None = None
    keeper_log: Path | None = None

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=self.server.env(),
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"imagepipe {' '.join(args)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", "--json"))
        return next(p for p in doc["pools"] if p["name"] == POOL)

    def start_keeper(self) -> None:
        assert self.keeper is None
        self.keeper_log = self.root / f"keeper-{time.monotonic_ns()}.log"
        with self.keeper_log.open("wb") as out:
            self.keeper = subprocess.Popen(
                [sys.executable, "-m", "imagepipe", "--config", str(self.config),
                 "--log-level", "debug", "keep"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.server.env(),
            )  # fmt: skip

    def stop_keeper(self, sig: int = signal.SIGTERM) -> int:
        assert self.keeper is not None
        self.keeper.send_signal(sig)
        code = self.keeper.wait(timeout=120)
        self.keeper = None
        return code

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.root / "run" / "haproxy.sock"))
            sock.sendall(command.encode() + b"\n")
            return sock.makefile().read()

    def keeper_output(self) -> str:
        return self.keeper_log.read_text(errors="replace")[-6000:] if self.keeper_log else ""

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.keeper is not None and self.keeper.poll() is not None:
                raise AssertionError(f"keeper exited waiting for {what}:\n{self.keeper_output()}")
            last = self.status()
            if check(last):
                return last
            time.sleep(1.0)
        raise AssertionError(
            f"timed out waiting for {what}; last status:\n{json.dumps(last, indent=1)[-4000:]}"
            f"\nkeeper log:\n{self.keeper_output()}"
        )

    def console(self, clone: str) -> SerialConsole:
        return SerialConsole(self.server.console(clone), timeout=120)

    def add_version(self, version: int) -> None:
        """What `build win10` + import does for VirtualBox: a base VM with a snapshot,
        registered with `imagepipe images import tiny --from-vm`."""
        tiny = tiny_base_image(self.root / f"tiny-v{version}")
        d = tiny.directory
        boot = Boot(d / (tiny.kernel or ""), d / (tiny.initrd or ""), tiny.cmdline or "")
        vm = f"imagepipe-tiny-v{version}"
        self.server.host.create_base_vm(vm, d / (tiny.disk or ""), boot=boot, snapshot="clean")
        self.cli("images", "import", "tiny", "--from-vm", vm)


def desktop_of(client: VncClient) -> str:
    return client.handshake().removeprefix("QEMU (").removesuffix(")")


def machine_folders(site: Site) -> list[str]:
    """The pool's machine folders in the simulated VirtualBox (settings and disks)."""
    folder = site.root / "vbox" / "imagepipe" / POOL
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def free_ready(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pool["clones"] if c["state"] == "free" and c["balancer"] == "ready"]


def clone(pool: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pool["clones"] if c["name"] == name)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_program("haproxy")
    require_program("qemu-system-x86_64")
    root = Path(tempfile.mkdtemp(prefix="ipv-e2e-", dir="/tmp"))
    (root / "pools").mkdir()
    bind_port = free_port()
    config = root / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {root / 'pools'}\n"
        f"state_db: {root / 'state' / 'state.db'}\n"
        f"registry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\n"
        f"run_dir: {root / 'run'}\n"
        "hypervisor: {driver: virtualbox}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
        "keeper: {tick: 1s, parallel: 4}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nchannel: latest\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 192M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        f"sessions: {{on_logoff: reset, recycle_after: {RECYCLE_AFTER}s}}\n"
        "boot_timeout: 2m\n"
    )
    server = vboxsim.Server(root / "vbox", version="7.0.14", qemu=True)
    s = Site(root=root, config=config, bind_port=bind_port, server=server)
    try:
        s.add_version(1)
        s.start_keeper()
        yield s
    finally:
        if s.keeper is not None:
            s.stop_keeper()
        server.close()
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_pool_fills_and_each_vnc_client_gets_its_own_desktop(site: Site) -> None:
    pool = site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    assert pool["total"] <= MAX
    first = VncClient("127.0.0.1", site.bind_port, timeout=30)
    second = VncClient("127.0.0.1", site.bind_port, timeout=30)
    try:
        a, b = desktop_of(first), desktop_of(second)
        assert a != b, f"two users on one desktop {a}: {site.haproxy('show servers state')}"
        pool = site.wait_for(
            "both desktops in use and drained, and the pool refilled",
            lambda p: (
                all(
                    clone(p, n)["state"] == "in_use" and clone(p, n)["balancer"] != "ready"
                    for n in (a, b)
                )
                and len(free_ready(p)) >= FREE
            ),
        )
        assert pool["total"] <= MAX
    finally:
        first.close()
        second.close()


@contextlib.contextmanager
def user_session(site: Site, user: str) -> Iterator[tuple[str, VncClient, SerialConsole]]:
    site.wait_for("a free desktop", lambda p: len(free_ready(p)) >= 1)
    viewer = VncClient("127.0.0.1", site.bind_port, timeout=30)
    try:
        name = desktop_of(viewer)
        with site.console(name) as console:
            console.login(user)
            site.wait_for(f"{name} in use", lambda p: clone(p, name)["state"] == "in_use")
            yield name, viewer, console
    finally:
        viewer.close()


def test_logoff_resets_the_desktop_and_the_next_user_gets_a_clean_disk(site: Site) -> None:
    with user_session(site, "alice") as (name, viewer, console):
        console.run("echo alice-was-here > /home/secret && sync")
        console.logout()
        viewer.close()
        logged_off = time.monotonic()
    pool = site.wait_for(
        f"{name} recycled and back in the balancer",
        lambda p: clone(p, name)["state"] == "free" and clone(p, name)["balancer"] == "ready",
    )
    assert time.monotonic() - logged_off >= RECYCLE_AFTER, "reset before recycle_after"
    # instant desktops (the pool's default start: restore): the reset resumed the clean
    # snapshot's saved state, the warm parent's memory, and the guest took its own name
    assert clone(pool, name)["started_by"] == "restore"
    with site.console(name) as console:
        console.login("bob")
        assert "alice-was-here" not in console.run("cat /home/secret 2>&1 || true")
        assert console.run("hostname") == name
        console.logout()


def test_keeper_killed_during_a_session_keeps_it_after_restart(site: Site) -> None:
    site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    client = VncClient("127.0.0.1", site.bind_port, timeout=30)
    try:
        desktop = desktop_of(client)
        site.wait_for(f"{desktop} in use", lambda p: clone(p, desktop)["state"] == "in_use")
        assert site.stop_keeper(signal.SIGKILL) == -signal.SIGKILL
        site.start_keeper()
        pool = site.wait_for(
            "the restarted keeper converged, with no orphan or missing VirtualBox machine",
            lambda p: (
                len(free_ready(p)) >= FREE
                and clone(p, desktop)["state"] == "in_use"
                and machine_folders(site) == sorted(c["name"] for c in p["clones"])
                # a desktop the killed keeper was making is finished (or removed) too
                and all(c["balancer"] is not None for c in p["clones"])
            ),
        )
        names = sorted(c["name"] for c in pool["clones"])
        assert clone(pool, desktop)["client"] is not None
        backends = site.haproxy("show servers state desktops")
        listed = {line.split()[3] for line in backends.splitlines()[2:] if len(line.split()) > 3}
        assert listed == set(names), "orphan or missing balancer entries"
        client.sock.sendall(b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10")
        assert client.sock.recv(1), "the session was cut"
    finally:
        client.close()


def test_a_new_image_version_rolls_out_without_kicking_anybody_off(site: Site) -> None:
    before = site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    old = before["version"]
    with user_session(site, "dave") as (name, viewer, console):
        site.add_version(old + 1)
        pool = site.wait_for(
            "the pool's free desktops all on the new version",
            lambda p: (
                p["version"] == old + 1
                and len(free_ready(p)) >= FREE
                and all(c["version"] == old + 1 for c in free_ready(p))
            ),
        )
        mine = clone(pool, name)
        assert mine["version"] == old and mine["state"] == "retiring"
        assert mine["balancer"] != "ready"
        assert "still-here" in console.run("echo still-here"), "the session was cut"
        console.logout()
        viewer.close()
    site.wait_for(
        f"{name} removed after its user left",
        lambda p: all(c["version"] == old + 1 for c in p["clones"]) and len(free_ready(p)) >= FREE,
    )
    left = sorted(p.name for p in (site.root / "vbox" / "imagepipe" / POOL).iterdir())
    assert name not in left, "the retired desktop's machine folder is still there"
