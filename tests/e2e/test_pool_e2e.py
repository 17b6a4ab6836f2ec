"""End to end, on real components: `imagepipe build tiny` (Packer + QEMU), `imagepipe keep`
(libvirt + QEMU desktops behind HAProxy), `imagepipe status --json`, driven as a user would:
through the CLI, a VNC client on the HAProxy address and the desktops' serial consoles.

One image build and one keeper per start mode (`restore`: instant desktops restored from a
warm parent; `boot`); each test leaves the pool converged for the next.
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

from tests.conftest import libvirt_available, require, require_program
from tests.guest import SerialConsole, VncClient
from tests.host import destroy_domains, domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "e2e"
FREE = 2
MAX = 4
RECYCLE_AFTER = 3  # seconds
PORTS = (5940, 5949)
WAIT = 180.0  # TCG guests on 2 cores: generous, but a hang still fails


@dataclass
class Host:
    """A throwaway imagepipe installation: settings, one pool, and a keeper process."""

    root: Path
    config: Path
    bind_port: int
    start: str = "restore"  # the pool's start mode: restore (instant desktops) or boot
    keeper: subprocess.Popen[bytes] | None = None
    keeper_log: Path | None = None

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"imagepipe {' '.join(args)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", "--json"))
        pools = {p["name"]: p for p in doc["pools"]}
        result: dict[str, Any] = pools[POOL]
        return result

    def start_keeper(self) -> None:
        assert self.keeper is None
        self.keeper_log = self.root / f"keeper-{time.monotonic_ns()}.log"
        with self.keeper_log.open("wb") as out:
            self.keeper = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imagepipe",
                    "--config",
                    str(self.config),
                    "--log-level",
                    "debug",
                    "keep",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop_keeper(self, sig: int = signal.SIGTERM) -> int:
        assert self.keeper is not None
        self.keeper.send_signal(sig)
        code = self.keeper.wait(timeout=120)
        self.keeper = None
        return code

    def haproxy(self, command: str) -> str:
        """Ask the pool's HAProxy directly, for failure messages."""
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
                raise AssertionError(
                    f"keeper exited while waiting for {what}:\n{self.keeper_output()}"
                )
            last = self.status()
            if check(last):
                return last
            time.sleep(1.0)
        raise AssertionError(
            f"timed out waiting for {what}; last status:\n{json.dumps(last, indent=1)[-4000:]}"
            f"\nkeeper log:\n{self.keeper_output()}"
        )

    def console(self, clone: str) -> SerialConsole:
        return SerialConsole(self.root / "state" / "clones" / "sockets" / f"{clone}.console")


def desktop_of(client: VncClient) -> str:
    """The clone a VNC client landed on: QEMU names its desktop "QEMU (<domain>)"."""
    name = client.handshake()
    return name.removeprefix("QEMU (").removesuffix(")")


def free_ready(pool: dict[str, Any]) -> list[dict[str, Any]]:
    """Clones that are free and take new users through the balancer."""
    return [c for c in pool["clones"] if c["state"] == "free" and c["balancer"] == "ready"]


def clone(pool: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pool["clones"] if c["name"] == name)


@pytest.fixture(scope="module", params=["restore", "boot"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    start = str(request.param)
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    repo = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="ipe-e2e-", dir="/tmp"))  # short: unix socket paths
    destroy_domains(f"{POOL}-")
    (root / "pools").mkdir()
    bind_port = free_port()
    config = root / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {root / 'pools'}\n"
        f"packer_dir: {repo / 'packer'}\n"
        f"state_db: {root / 'state' / 'state.db'}\n"
        f"registry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\n"
        f"run_dir: {root / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
        "keeper: {tick: 1s, parallel: 4}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nchannel: latest\nstart: {start}\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 192M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        f"sessions: {{on_logoff: reset, recycle_after: {RECYCLE_AFTER}s}}\n"
        "boot_timeout: 2m\n"
    )
    h = Host(root=root, config=config, bind_port=bind_port, start=start)
    try:
        h.cli("build", "tiny")
        h.start_keeper()
        yield h
    finally:
        if h.keeper is not None:
            h.stop_keeper()
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_pool_fills_and_each_vnc_client_gets_its_own_desktop(host: Host) -> None:
    pool = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    assert pool["total"] <= MAX

    first = VncClient("127.0.0.1", host.bind_port, timeout=30)
    second = VncClient("127.0.0.1", host.bind_port, timeout=30)
    try:
        desktop_a = desktop_of(first)
        desktop_b = desktop_of(second)
        assert desktop_a != desktop_b, (
            f"two concurrent users landed on the same desktop {desktop_a}\n"
            f"haproxy: {host.haproxy('show servers state desktops')}\n"
            f"keeper log:\n{host.keeper_output()}"
        )
        assert {desktop_a, desktop_b} <= {c["name"] for c in pool["clones"]}

        pool = host.wait_for(
            "both desktops in use and drained, and the pool refilled",
            lambda p: (
                all(
                    clone(p, n)["state"] == "in_use" and clone(p, n)["balancer"] != "ready"
                    for n in (desktop_a, desktop_b)
                )
                and len(free_ready(p)) >= FREE
            ),
        )
        assert pool["total"] <= MAX
        assert pool["in_use"] == 2
    finally:
        first.close()
        second.close()


@contextlib.contextmanager
def user_session(host: Host, user: str) -> Iterator[tuple[str, VncClient, SerialConsole]]:
    """What a user does: connect a viewer to the pool's address, land on a free desktop, and
    log in on it. Yields the desktop's name, the viewer and the desktop's console."""
    host.wait_for("a free desktop", lambda p: len(free_ready(p)) >= 1)
    viewer = VncClient("127.0.0.1", host.bind_port, timeout=30)
    try:
        name = desktop_of(viewer)
        with host.console(name) as console:
            console.login(user)
            host.wait_for(f"{name} in use", lambda p: clone(p, name)["state"] == "in_use")
            yield name, viewer, console
    finally:
        viewer.close()


def test_logoff_resets_the_desktop_and_the_next_user_gets_a_clean_disk(host: Host) -> None:
    with user_session(host, "alice") as (name, viewer, console):
        console.run("echo alice-was-here > /home/secret && sync")
        assert "alice-was-here" in console.run("cat /home/secret")
        console.logout()
        viewer.close()
        logged_off = time.monotonic()

    host.wait_for(
        f"{name} recycled and back in the balancer",
        lambda p: clone(p, name)["state"] == "free" and clone(p, name)["balancer"] == "ready",
    )
    assert time.monotonic() - logged_off >= RECYCLE_AFTER, "reset before recycle_after"
    assert clone(host.status(), name)["started_by"] == host.start
    with host.console(name) as console:
        console.login("bob")
        listing = console.run("ls -a /home; cat /home/secret 2>&1 || true")
        assert "alice-was-here" not in listing
        console.logout()


def test_poweroff_inside_the_guest_is_treated_like_logoff(host: Host) -> None:
    with user_session(host, "carol") as (name, _viewer, console):
        console.send_line("poweroff")
        host.wait_for(f"{name} powered off", lambda p: clone(p, name)["power"] != "running")
    host.wait_for(
        f"{name} powered on again, clean and ready",
        lambda p: (
            clone(p, name)["power"] == "running"
            and clone(p, name)["state"] == "free"
            and clone(p, name)["balancer"] == "ready"
        ),
    )


def test_keeper_killed_during_a_session_keeps_it_after_restart(host: Host) -> None:
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    client = VncClient("127.0.0.1", host.bind_port, timeout=30)
    try:
        desktop = desktop_of(client)
        host.wait_for(f"{desktop} in use", lambda p: clone(p, desktop)["state"] == "in_use")
        assert host.stop_keeper(signal.SIGKILL) == -signal.SIGKILL
        host.start_keeper()

        pool = host.wait_for(
            "the restarted keeper converged",
            lambda p: len(free_ready(p)) >= FREE and clone(p, desktop)["state"] == "in_use",
        )
        in_use = clone(pool, desktop)
        assert in_use["balancer"] != "ready", "a desktop in use takes new users"
        assert in_use["client"] is not None
        names = [c["name"] for c in pool["clones"]]
        assert len(names) == len(set(names))
        assert domains(f"{POOL}-") == sorted(names), "orphan or missing domains"
        disks = sorted(p.stem for p in (host.root / "state" / "clones" / "disks").glob("*.qcow2"))
        assert disks == sorted(names), "orphan or missing clone disks"
        backends = host.haproxy("show servers state desktops")
        listed = {line.split()[3] for line in backends.splitlines()[2:] if len(line.split()) > 3}
        assert listed == set(names), "orphan or missing balancer entries"
        assert pool["total"] == len(names) <= MAX
        # the VNC session is still alive through HAProxy: the server answers a client message
        client.sock.sendall(b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10")  # update request
        assert client.sock.recv(1), "the session was cut"
    finally:
        client.close()

    status = json.loads(host.cli("status", "--json"))
    assert status["stray_clones"] == []


def test_a_new_image_version_rolls_out_without_kicking_anybody_off(host: Host) -> None:
    """Blue/green: while a user works on a v1 desktop, `imagepipe build tiny --force`
    registers v2. Free desktops are replaced by v2 ones at once; the user's desktop gets no
    new users, keeps its session, and is removed only after the user logs off."""
    before = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    old = before["version"]
    with user_session(host, "dave") as (name, viewer, console):
        host.cli("build", "tiny", "--force")
        pool = host.wait_for(
            "the pool's free desktops all on the new version",
            lambda p: (
                p["version"] == old + 1
                and len(free_ready(p)) >= FREE
                and all(c["version"] == old + 1 for c in free_ready(p))
            ),
        )
        mine = clone(pool, name)
        assert mine["version"] == old, "the user's desktop was replaced under them"
        assert mine["state"] == "retiring" and mine["balancer"] != "ready"
        assert "still-here" in console.run("echo still-here"), "the session was cut"
        console.logout()
        viewer.close()

    pool = host.wait_for(
        f"{name} removed after its user left",
        lambda p: all(c["version"] == old + 1 for c in p["clones"]) and len(free_ready(p)) >= FREE,
    )
    assert pool["total"] <= MAX
