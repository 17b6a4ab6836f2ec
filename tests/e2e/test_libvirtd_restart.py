"""libvirtd restarted, and stopped for a while, under a running keeper (issue 14), on real
components: a real `imagepipe keep` keeps a pool of tiny libvirt/QEMU desktops behind a real
HAProxy; alice connects with VNC through HAProxy and logs in on her desktop's console; then
libvirtd is restarted (`scripts/libvirtd.sh restart`), and later stopped, kept down for about
three keeper passes and started again. After each outage, against the real host:

- alice's desktop was never reset or restarted (same QEMU pid, same libvirt domain id), her
  file is there, her VNC connection works, `status` still shows her desktop in use;
- the keeper reconnected and the pool is back at its free target; a free desktop a VNC client
  reached through HAProxy while libvirtd was down is reset before its next user (the
  balancer's session counter tells), and no other free desktop is reset;
- the keeper said it once: one warning at the loss, one info when libvirt answered again, at
  most one failed-pass error per outage (not one per pass).

Then alice logs off: the keeper sees it (its events were subscribed again, exactly once:
one disconnect event, not one per reconnect) and recycles her desktop as usual; the next user
does not find her file.

This is the only test that restarts libvirtd; it needs the libvirtd scripts/libvirtd.sh
started (CI's), and leaves it answering. About 60 s on the 2-core TCG host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import libvirt_available, require, require_program
from tests.guest import SerialConsole, VncClient
from tests.host import URI, destroy_domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "lvr"
FREE = 2
MAX = 4
RECYCLE_AFTER = 2  # seconds
TICK = 1.0  # the keeper's tick, seconds
DOWN = 3 * TICK  # how long libvirtd stays stopped: about three keeper passes
PORTS = (6420, 6429)  # not used by any other test module
CONVERGE = 60.0  # seconds: back at the free target after an outage
WAIT = 180.0  # any other wait (TCG guests on a loaded 2-core host)
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "libvirtd.sh"
SCRIPT_PIDFILE = Path("/run/imagepipe-libvirtd-tini.pid")


def libvirtd(command: str) -> None:
    subprocess.run([str(SCRIPT), command], check=True, timeout=60, capture_output=True)


def started_by_script() -> bool:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(SCRIPT_PIDFILE.read_text().strip()), 0)
        return True
    return False


@dataclass
class Host:
    root: Path
    config: Path
    bind_port: int
    keeper: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "keeper.log"

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"imagepipe {' '.join(args)} exited {done.returncode}\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        return done.stdout

    def start_keeper(self) -> None:
        with self.log_path.open("ab") as out:
            self.keeper = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imagepipe",
                    "--config",
                    str(self.config),
                    "--log-level",
                    "debug",
                    "--log-format",
                    "json",
                    "keep",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop_keeper(self) -> None:
        if self.keeper is not None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(timeout=30)
            self.keeper = None

    def log(self) -> list[dict[str, Any]]:
        """The keeper's log lines (JSON), in order."""
        lines = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
        return lines

    def said(self, message: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.log()[since:] if e.get("message", "").startswith(message)]

    def log_tail(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def states(self) -> dict[str, str]:
        """The pool's clone records: name -> state (read-only, without a `status` process)."""
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(
                f"{(self.root / 'state' / 'state.db').resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=1,
            )
            try:
                rows = db.execute("SELECT name, state FROM clones WHERE pool = ?", (POOL,))
                return {name: state for name, state in rows.fetchall()}
            finally:
                db.close()
        return {}

    def backends(self) -> dict[str, str]:
        """HAProxy's backends of the pool: name -> admin state ("0" ready)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.root / "run" / "haproxy.sock"))
            sock.sendall(b"show servers state desktops\n")
            text = sock.makefile().read()
        found = {}
        for line in text.splitlines()[2:]:
            parts = line.split()
            if len(parts) > 6 and parts[3].startswith(f"{POOL}-"):
                found[parts[3]] = parts[6]
        return found

    def free_ready(self) -> list[str]:
        with contextlib.suppress(OSError):
            ready = {n for n, admin in self.backends().items() if admin == "0"}
            return sorted(n for n, s in self.states().items() if s == "free" and n in ready)
        return []

    def converged(self) -> bool:
        busy = [n for n, s in self.states().items() if s in ("creating", "booting", "deleting")]
        return not busy and len(self.free_ready()) >= FREE

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.keeper is not None and self.keeper.poll() is not None:
                raise AssertionError(f"keeper exited while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {what}; records "
                    f"{self.states()}\nkeeper log:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def status_of(self, clone: str) -> dict[str, Any]:
        doc = json.loads(self.cli("status", "--json"))
        pool = next(p for p in doc["pools"] if p["name"] == POOL)
        return next((c for c in pool["clones"] if c["name"] == clone), {})

    def console(self, clone: str) -> SerialConsole:
        return SerialConsole(self.root / "state" / "clones" / "sockets" / f"{clone}.console")


def identity(domain: str) -> tuple[str, str]:
    """What changes when a desktop is restarted or reset: (libvirt domain id, QEMU pid)."""
    domid = subprocess.run(
        ["virsh", "-c", URI, "domid", domain], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    with contextlib.suppress(FileNotFoundError):
        return domid, Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip()
    return domid, ""


@dataclass
class User:
    name: str
    desktop: str
    viewer: VncClient
    console: SerialConsole

    def alive(self) -> bool:
        """The VNC connection answers (a FramebufferUpdateRequest gets a reply)."""
        try:
            self.viewer.sock.sendall(b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10")
            return bool(self.viewer.sock.recv(1))
        except OSError:
            return False

    def has_file(self) -> bool:
        try:
            return f"{self.name}-was-here" in self.console.run(
                f"cat /home/{self.name}-file", timeout=30
            )
        except (OSError, TimeoutError, ConnectionError):
            return False


def arrive(host: Host, user: str) -> User:
    host.wait_until("a free desktop", lambda: len(host.free_ready()) >= 1)
    viewer = VncClient("127.0.0.1", host.bind_port, timeout=30)
    name = viewer.handshake().removeprefix("QEMU (").removesuffix(")")
    console = host.console(name)
    console.login(user)
    console.run(f"echo {user}-was-here > /home/{user}-file && sync")
    host.wait_until(f"{name} in use", lambda: host.states().get(name) == "in_use")
    return User(user, name, viewer, console)


@dataclass
class Outage:
    kind: str  # "restart" or "down"
    log_from: int  # the keeper log's length when it began
    reconnect_seconds: float = 0.0  # from libvirtd answering again to the keeper's reconnect
    converge_seconds: float = 0.0  # from libvirtd answering again to the free target met
    free_before: list[str] = field(default_factory=list)  # free desktops when it began
    visited: str = ""  # the free desktop a VNC client reached through HAProxy meanwhile
    reset_after: list[str] = field(default_factory=list)  # desktops reset after the reconnect
    problems: list[str] = field(default_factory=list)


@dataclass
class Findings:
    alice: str = ""
    outages: list[Outage] = field(default_factory=list)
    recycled: bool = False
    disconnect_events: int = 0
    next_user_listing: str = ""
    log: list[dict[str, Any]] = field(default_factory=list)


def outage(host: Host, alice: User, kind: str) -> Outage:
    before = identity(alice.desktop)
    seen = Outage(kind, len(host.log()), free_before=host.free_ready())
    try:
        if kind == "restart":
            libvirtd("restart")
        else:
            libvirtd("stop")
            # while nobody can see the desktops' events, a client comes through HAProxy and
            # leaves: only the balancer's session counter can tell afterwards
            visitor = VncClient("127.0.0.1", host.bind_port, timeout=30)
            seen.visited = visitor.handshake().removeprefix("QEMU (").removesuffix(")")
            visitor.close()
            time.sleep(DOWN)  # a libvirtd that stays down: the keeper's passes fail meanwhile
            if not alice.alive():
                seen.problems.append("alice's VNC connection died while libvirtd was down")
            libvirtd("start")
    finally:
        libvirtd("start")  # answering again whatever happened (later tests need it)
    back = time.monotonic()
    host.wait_until(
        "the keeper reconnected",
        lambda: bool(host.said("libvirt connection back", seen.log_from)),
        timeout=CONVERGE,
    )
    seen.reconnect_seconds = time.monotonic() - back

    def reset_since() -> list[str]:
        return sorted({str(e.get("clone")) for e in host.said("clone reset", seen.log_from)})

    # the desktop a client reached meanwhile is reset before its next user (the balancer's
    # counter tells); then the pool is back at its free target
    host.wait_until(
        "the visited desktop reset and the pool converged",
        lambda: (not seen.visited or seen.visited in reset_since()) and host.converged(),
        timeout=CONVERGE,
    )
    time.sleep(3 * TICK)  # a needless reset of another free desktop would show by now
    seen.converge_seconds = time.monotonic() - back
    seen.reset_after = reset_since()

    if identity(alice.desktop) != before:
        seen.problems.append(
            f"alice's desktop was restarted: {before} -> {identity(alice.desktop)}"
        )
    if not alice.alive():
        seen.problems.append("alice's VNC connection was cut")
    if not alice.has_file():
        seen.problems.append("alice's file is gone")
    mine = host.status_of(alice.desktop)
    if mine.get("state") != "in_use" or mine.get("balancer") == "ready":
        seen.problems.append(f"alice's desktop is {mine}")
    return seen


def timeline(log: list[dict[str, Any]]) -> str:
    """The keeper's lines about the outages and resets (printed with -s)."""
    start = log[0]["time"] if log else 0.0
    lines = []
    for e in log:
        if e.get("level") in ("warning", "error") or e.get("message", "").startswith(
            ("libvirt connection", "passes work again", "clone reset")
        ):
            extra = {k: v for k, v in e.items() if k not in ("time", "level", "logger", "message")}
            lines.append(f"  {e['time'] - start:7.2f} {e['level']:7} {e['message']} {extra}")
    return "keeper log:\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def findings() -> Iterator[Findings]:
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    require(os.geteuid() == 0, "restarting libvirtd needs root")
    require(started_by_script(), "libvirtd was not started by scripts/libvirtd.sh")
    root = Path(tempfile.mkdtemp(prefix="ip-lvr-", dir="/tmp"))  # short: unix socket paths
    destroy_domains(f"{POOL}-")
    (root / "pools").mkdir()
    bind_port = free_port()
    config = root / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {root / 'pools'}\n"
        f"packer_dir: {REPO / 'packer'}\n"
        f"state_db: {root / 'state' / 'state.db'}\n"
        f"registry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\n"
        f"run_dir: {root / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
        f"keeper: {{tick: {TICK:g}s, parallel: 4}}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nchannel: latest\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 160M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        f"sessions: {{on_logoff: reset, recycle_after: {RECYCLE_AFTER}s}}\n"
        "boot_timeout: 180s\n"
    )
    host = Host(root=root, config=config, bind_port=bind_port)
    found = Findings()
    try:
        host.cli("build", "tiny")
        host.start_keeper()
        host.wait_until(f"{FREE} free desktops", lambda: len(host.free_ready()) >= FREE)
        alice = arrive(host, "alice")
        found.alice = alice.desktop
        for kind in ("restart", "down"):
            found.outages.append(outage(host, alice, kind))

        logoff_from = len(host.log())
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            alice.console.logout()
        alice.console.close()
        alice.viewer.close()
        host.wait_until(
            f"{alice.desktop} recycled",
            lambda: bool(
                [
                    e
                    for e in host.said("clone reset", logoff_from)
                    if e.get("clone") == alice.desktop
                ]
            ),
            timeout=CONVERGE,
        )
        found.recycled = True
        host.wait_until(f"{alice.desktop} free again", lambda: alice.desktop in host.free_ready())
        found.disconnect_events = len(
            [
                e
                for e in host.said("hypervisor event", logoff_from)
                if e.get("clone") == alice.desktop and e.get("kind") == "session_disconnected"
            ]
        )
        with host.console(alice.desktop) as console:
            console.login("carol")
            found.next_user_listing = console.run("cat /home/alice-file 2>&1 || true")
            console.logout()
        found.log = host.log()
        for seen in found.outages:
            print(
                f"\nlibvirtd {seen.kind}: keeper reconnected {seen.reconnect_seconds:.1f}s and "
                f"the pool was back at its free target {seen.converge_seconds:.1f}s after "
                f"libvirtd answered again; free desktops before {seen.free_before}, reached "
                f"meanwhile {seen.visited or '-'}, reset after {seen.reset_after}"
            )
        print(timeline(found.log))
        yield found
    finally:
        libvirtd("start")
        host.stop_keeper()
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_a_libvirtd_restart_or_outage_never_touches_a_logged_in_users_desktop(
    findings: Findings,
) -> None:
    assert [o.kind for o in findings.outages] == ["restart", "down"]
    assert {o.kind: o.problems for o in findings.outages} == {"restart": [], "down": []}


def test_after_libvirtd_comes_back_only_a_desktop_a_client_reached_meanwhile_is_reset(
    findings: Findings,
) -> None:
    restart, down = findings.outages
    assert restart.converge_seconds < CONVERGE and down.converge_seconds < CONVERGE
    # a restart nobody used the desktops through costs no desktop
    assert restart.free_before and not set(restart.reset_after) & set(restart.free_before)
    # the desktop a VNC client reached through HAProxy while libvirtd was down is reset
    # before its next user; the other free desktops are not
    assert down.visited in down.free_before
    assert set(down.reset_after) & set(down.free_before) == {down.visited}
    assert findings.alice not in restart.reset_after + down.reset_after


def test_the_keeper_says_each_outage_once_not_once_per_pass(findings: Findings) -> None:
    def said(message: str, level: str) -> list[dict[str, Any]]:
        return [
            e
            for e in findings.log
            if e.get("message", "").startswith(message) and e.get("level") == level
        ]

    assert len(said("libvirt connection lost", "warning")) == 2
    assert len(said("libvirt connection back", "info")) == 2
    # the restart is over before the next pass; the outage fails passes: said once
    assert len(said("pass failed", "error")) <= 2
    assert len(said("passes work again", "info")) == len(said("pass failed", "error"))


def test_a_logoff_after_the_outages_is_seen_once_and_the_desktop_recycled(
    findings: Findings,
) -> None:
    assert findings.recycled
    assert findings.disconnect_events == 1
    assert "alice-was-here" not in findings.next_user_listing
