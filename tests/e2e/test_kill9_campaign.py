"""The kill -9 campaign on real components (issue 14): a real `imagepipe keep` keeps a pool of
tiny libvirt/QEMU desktops behind a real HAProxy; users connect with VNC through HAProxy and
log in on the desktops' serial consoles; the keeper is killed with SIGKILL at seeded moments
(while a used desktop is being recycled, while a clone is being created, while one boots, at
a random moment) and restarted at once or after a pause. After every restart, against the
real host:

- alice, logged in since before the first kill, keeps her desktop, her files and her VNC
  connection (never reset, deleted or handed to anybody else);
- within CONVERGE seconds the pool is back at its free target with nothing still being
  created, booted or deleted;
- every libvirt domain, clone disk and HAProxy backend of the pool is one `status` accounts
  for, with no duplicates, no `.partial` disk left over, never more than `max`;
- the state database passes `PRAGMA integrity_check`;
- a desktop somebody used is reset before the next user gets it (bob's file is gone).

Then parts die under a running keeper: HAProxy is killed (restarted, every backend back) and a
desktop's QEMU is killed under its user (the session is over, the desktop is recycled).

CI profile: KILLS keeper kills (default 2) and the two component kills, about a minute
(55 s on the 2-core TCG host).
Long profile by hand:

    IMAGEPIPE_KILL9_KILLS=40 IMAGEPIPE_KILL9_SEED=7 pytest tests/e2e/test_kill9_campaign.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
import random
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
from tests.host import destroy_domains, domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "k9"
FREE = 2
MAX = 4
RECYCLE_AFTER = 2  # seconds
PORTS = (6250, 6259)
BOOT_TIMEOUT = 180  # seconds: far above CONVERGE, so waiting for it is told apart
CONVERGE = 60.0  # seconds: a restarted keeper must have the pool back at its free target
WAIT = 240.0  # any other wait (TCG guests on a loaded 2-core host)
KILLS = int(os.environ.get("IMAGEPIPE_KILL9_KILLS", "2"))
SEED = int(os.environ.get("IMAGEPIPE_KILL9_SEED", "14"))
MOMENTS = ("recycle", "create", "boot", "random")


@dataclass
class Violation:
    kill: int
    moment: str
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"kill {self.kill} ({self.moment}): {self.invariant}: {self.detail}"


@dataclass
class Result:
    kills: list[str] = field(default_factory=list)
    converge_seconds: list[float] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)

    def of(self, *invariants: str) -> list[str]:
        return [str(v) for v in self.violations if v.invariant in invariants]

    def summary(self) -> str:
        s = sorted(self.converge_seconds) or [0.0]
        return (
            f"kills {len(self.kills)} ({', '.join(self.kills)}); back at free target after "
            f"median {s[len(s) // 2]:.1f}s max {s[-1]:.1f}s; checks {self.checks}; "
            f"violations {len(self.violations)}"
        )


@dataclass
class Host:
    """A throwaway installation with one pool and a keeper subprocess."""

    root: Path
    config: Path
    bind_port: int
    keeper: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.root / "state" / "state.db"

    @property
    def clones_dir(self) -> Path:
        return self.root / "state" / "clones"

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

    def status(self) -> dict[str, Any]:
        doc = json.loads(self.cli("status", "--json"))
        pool: dict[str, Any] = next(p for p in doc["pools"] if p["name"] == POOL)
        return pool

    def start_keeper(self) -> None:
        assert self.keeper is None
        with (self.root / "keeper.log").open("ab") as out:
            self.keeper = subprocess.Popen(
                [sys.executable, "-m", "imagepipe", "--config", str(self.config), "keep"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill_keeper(self) -> None:
        assert self.keeper is not None
        self.keeper.send_signal(signal.SIGKILL)
        self.keeper.wait(timeout=60)
        self.keeper = None

    def stop_keeper(self) -> None:
        if self.keeper is not None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(timeout=30)
            self.keeper = None

    def log_tail(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / "keeper.log").read_text(errors="replace")[-4000:]
        return ""

    def records(self, state: str) -> list[str]:
        return sorted(n for n, s in self.states().items() if s == state)

    def states(self) -> dict[str, str]:
        """Every clone record of the pool: name -> state, read directly (fast, read-only)."""
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                rows = db.execute("SELECT name, state FROM clones WHERE pool = ?", (POOL,))
                return {name: state for name, state in rows.fetchall()}
            finally:
                db.close()
        return {}

    def free_ready(self) -> list[str]:
        """Free desktops that take new users through HAProxy, without starting a `status`
        process (polled often while the keeper works)."""
        with contextlib.suppress(OSError):
            ready = {n for n, admin in self.backends().items() if admin == "0"}
            return sorted(n for n, s in self.states().items() if s == "free" and n in ready)
        return []

    def converged(self) -> bool:
        """The free target is met and nothing the kill interrupted is still under way (no
        clone being created, booted or deleted)."""
        busy = [n for n, s in self.states().items() if s in ("creating", "booting", "deleting")]
        return not busy and len(self.free_ready()) >= FREE

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.keeper is not None and self.keeper.poll() is not None:
                raise AssertionError(f"keeper exited while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {what}; records {self.states()}, "
                    f"backends {self.backends()}\nkeeper log:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def integrity(self) -> str:
        db = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            db.close()

    def backends(self) -> dict[str, str]:
        """HAProxy's backends of the pool: name -> admin state ("0" ready, "1" maint, ...)."""
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

    def console(self, clone: str) -> SerialConsole:
        return SerialConsole(self.clones_dir / "sockets" / f"{clone}.console")

    def disks(self) -> list[str]:
        return sorted(p.name for p in (self.clones_dir / "disks").glob(f"{POOL}-*"))


def clone(pool: dict[str, Any], name: str) -> dict[str, Any]:
    return next((c for c in pool["clones"] if c["name"] == name), {})


@dataclass
class User:
    """A VNC viewer on the pool's address plus a console login on the desktop it reached."""

    name: str
    desktop: str
    viewer: VncClient
    console: SerialConsole

    def alive(self) -> bool:
        try:
            self.viewer.sock.sendall(b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10")
            return bool(self.viewer.sock.recv(1))
        except OSError:
            return False

    def leave(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            self.console.logout()
        self.console.close()
        self.viewer.close()


def arrive(host: Host, user: str) -> User:
    host.wait_until("a free desktop", lambda: len(host.free_ready()) >= 1)
    viewer = VncClient("127.0.0.1", host.bind_port, timeout=30)
    name = viewer.handshake().removeprefix("QEMU (").removesuffix(")")
    console = host.console(name)
    console.login(user)
    console.run(f"echo {user}-was-here > /home/{user}-file && sync")
    host.wait_until(f"{name} in use", lambda: host.states().get(name) == "in_use")
    return User(user, name, viewer, console)


class Campaign:
    def __init__(self, host: Host, seed: int) -> None:
        self.host = host
        self.rng = random.Random(seed)
        self.result = Result()
        self.kill = 0
        self.moment = ""

    def check(self, invariant: str, ok: bool, detail: str) -> None:
        self.result.checks[invariant] = self.result.checks.get(invariant, 0) + 1
        if not ok:
            self.result.violations.append(Violation(self.kill, self.moment, invariant, detail))

    def run(self, kills: int) -> Result:
        host = self.host
        host.wait_until(f"{FREE} free desktops", lambda: len(host.free_ready()) >= FREE)
        alice = arrive(host, "alice")
        try:
            moments = [MOMENTS[i % len(MOMENTS)] for i in range(kills)]
            self.rng.shuffle(moments)
            for self.kill, self.moment in enumerate(moments, start=1):
                self.one_kill(alice)
        finally:
            alice.leave()
        self.component_crashes()
        return self.result

    def component_crashes(self) -> None:
        """Parts dying under a running keeper: HAProxy (the keeper restarts it and puts every
        backend back), a desktop's QEMU under its user (the session is over: the desktop is
        recycled). The keeper itself keeps running."""
        host = self.host
        self.kill += 1
        self.moment = "haproxy killed"
        pid = int((host.root / "run" / "haproxy.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        self.result.kills.append(self.moment)
        self.healed()

        self.kill += 1
        self.moment = "qemu killed"
        dave = arrive(host, "dave")
        qemu = int(Path(f"/run/libvirt/qemu/{dave.desktop}.pid").read_text().strip())
        os.kill(qemu, signal.SIGKILL)
        self.result.kills.append(self.moment)
        try:
            host.wait_until(
                f"{dave.desktop}'s session reported over",
                lambda: host.states().get(dave.desktop) not in ("in_use", "disconnected"),
                timeout=CONVERGE,
            )
            over = True
        except TimeoutError:
            over = False
        self.check(
            "component_crash_healed", over, f"{dave.desktop} still in use after its QEMU died"
        )
        dave.leave()
        self.healed()

    def healed(self) -> None:
        host = self.host
        started = time.monotonic()
        try:
            host.wait_until("the pool converged", host.converged, timeout=CONVERGE)
            ok, detail = True, ""
        except TimeoutError as exc:
            ok, detail = False, str(exc).splitlines()[0]
            host.wait_until("the pool converged (late)", host.converged)
        self.check("component_crash_healed", ok, detail)
        self.result.converge_seconds.append(time.monotonic() - started)
        self.check_accounts()
        self.check("store_integrity", host.integrity() == "ok", f"integrity: {host.integrity()}")

    def one_kill(self, alice: User) -> None:
        host = self.host
        visitor: User | None = None
        if self.moment == "recycle":
            visitor = arrive(host, "bob")
            visitor.leave()  # logs off: after recycle_after, removed from HAProxy and reset
            time.sleep(RECYCLE_AFTER + self.rng.uniform(-0.5, 1.5))
        elif self.moment in ("create", "boot"):
            visitor = arrive(host, "dave")  # takes a free desktop: the keeper makes another
            state = "creating" if self.moment == "create" else "booting"
            deadline = time.monotonic() + 30
            while not host.records(state) and time.monotonic() < deadline:
                time.sleep(0.005)
            # at once (before libvirt has it, with luck), or a little later (while it works)
            time.sleep(self.rng.choice((0.0, self.rng.uniform(0.0, 0.3))))
        else:
            time.sleep(self.rng.uniform(0.0, 3.0))
        host.kill_keeper()
        self.result.kills.append(self.moment)
        if self.rng.random() < 0.3:
            time.sleep(self.rng.uniform(1.0, 5.0))  # restarted after a pause
        host.start_keeper()
        self.after_restart(alice)
        if visitor is not None and visitor.name == "bob":
            self.bob_left_nothing_behind(visitor.desktop)
        elif visitor is not None:
            visitor.leave()

    def after_restart(self, alice: User) -> None:
        host = self.host
        started = time.monotonic()
        detail = ""
        try:
            host.wait_until("the pool converged", host.converged, timeout=CONVERGE)
            converged = True
        except TimeoutError as exc:
            converged = False
            detail = str(exc).splitlines()[0]
        self.check(
            "converges_after_crash",
            converged,
            ""
            if converged
            else f"{detail}; records creating {host.records('creating')} "
            f"booting {host.records('booting')}",
        )
        if not converged:
            host.wait_until("the pool converged (late)", host.converged)
        self.result.converge_seconds.append(time.monotonic() - started)

        pool = host.status()
        mine = clone(pool, alice.desktop)
        self.check(
            "live_session_untouched",
            mine.get("state") == "in_use" and mine.get("balancer") != "ready",
            f"alice's {alice.desktop} is {mine}",
        )
        self.check("live_session_untouched", alice.alive(), "alice's VNC connection was cut")
        try:
            kept = "alice-was-here" in alice.console.run("cat /home/alice-file", timeout=30)
            why = "her file is gone"
        except (OSError, TimeoutError, ConnectionError) as exc:
            kept, why = False, str(exc)
        self.check("live_session_untouched", kept, f"alice on {alice.desktop}: {why}")
        self.check_accounts()
        self.check("store_integrity", host.integrity() == "ok", f"integrity: {host.integrity()}")

    def check_accounts(self) -> None:
        """Domains, disks and backends all accounted for; retried while the keeper is still
        finishing what the kill interrupted (a delete in flight is not an orphan)."""
        host = self.host
        deadline = time.monotonic() + 30
        while True:
            pool = host.status()
            names = [c["name"] for c in pool["clones"]]
            problems = []
            if len(names) != len(set(names)):
                problems.append(f"duplicate clones {names}")
            if len(names) > MAX:
                problems.append(f"{len(names)} clones, max {MAX}")
            if domains(f"{POOL}-") != sorted(set(names)):
                problems.append(f"domains {domains(f'{POOL}-')} vs clones {sorted(names)}")
            disks = host.disks()
            if disks != sorted(f"{n}.qcow2" for n in set(names)):
                problems.append(f"disks {disks} vs clones {sorted(names)}")
            backends = host.backends()
            if not set(backends) <= set(names):
                problems.append(f"backends of no clone {sorted(set(backends) - set(names))}")
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self.check("nothing_orphaned", not problems, "; ".join(problems))
        self.check("max_respected", len(names) <= MAX, f"{len(names)} clones")

    def bob_left_nothing_behind(self, desktop: str) -> None:
        """When bob's desktop is free again, the next user must not find bob's file."""
        host = self.host
        try:
            host.wait_until(
                f"{desktop} free again or gone",
                lambda: host.states().get(desktop) in ("free", None),
            )
        except TimeoutError as exc:
            self.check("used_desktop_reset_first", False, str(exc).splitlines()[0])
            return
        if desktop not in host.states():
            return  # replaced rather than reset: nobody can read bob's disk
        with host.console(desktop) as console:
            console.login("carol")
            listing = console.run("cat /home/bob-file 2>&1 || true")
            console.logout()
        self.check(
            "used_desktop_reset_first",
            "bob-was-here" not in listing,
            f"carol read bob's file on {desktop}: the desktop was not reset",
        )


@pytest.fixture(scope="module")
def campaign() -> Iterator[Result]:
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    repo = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="ip-k9-", dir="/tmp"))  # short: unix socket paths
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
        f"name: {POOL}\nimage: tiny\nchannel: latest\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 160M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        f"sessions: {{on_logoff: reset, recycle_after: {RECYCLE_AFTER}s}}\n"
        f"boot_timeout: {BOOT_TIMEOUT}s\n"
    )
    host = Host(root=root, config=config, bind_port=bind_port)
    try:
        host.cli("build", "tiny")
        host.start_keeper()
        result = Campaign(host, SEED).run(KILLS)
        print(f"\nkill -9 campaign, seed {SEED}: {result.summary()}")
        for violation in result.violations:
            print(f"  ! {violation}")
        yield result
    finally:
        host.stop_keeper()
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_kill9_never_cuts_a_session_orphans_anything_or_corrupts_the_state(
    campaign: Result,
) -> None:
    assert len(campaign.kills) == KILLS + 2
    safety = ("live_session_untouched", "nothing_orphaned", "max_respected", "store_integrity")
    assert all(campaign.checks.get(i, 0) > 0 for i in safety)
    assert campaign.of(*safety) == []


def test_haproxy_or_a_desktops_qemu_killed_under_the_keeper_is_healed_within_a_minute(
    campaign: Result,
) -> None:
    assert campaign.checks.get("component_crash_healed", 0) >= 2
    assert campaign.of("component_crash_healed") == []


def test_kill9_pool_is_back_at_its_free_target_within_a_minute(campaign: Result) -> None:
    assert campaign.checks.get("converges_after_crash", 0) > 0
    assert campaign.of("converges_after_crash") == []


def test_kill9_next_user_never_reads_the_previous_users_files(campaign: Result) -> None:
    assert campaign.checks.get("used_desktop_reset_first", 0) > 0
    assert campaign.of("used_desktop_reset_first") == []
