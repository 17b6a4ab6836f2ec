"""The one harness of the E2E tests and the benchmarks on real components: a throwaway
imagepipe installation on this host (settings, pools folder, registry, state, its HAProxy),
`imagepipe keep` as a subprocess (start, stop, kill -9, reload), polling what it did (`status
--json`, the state database read-only, HAProxy's admin socket) and users who come through
HAProxy with a VNC client and log in on a desktop's serial console.

    host = Installation(temp_root("ipe-e2e-"), PoolFile("e2e", free=2, max=4, ports=(5940, 5949)))
    try:
        host.cli("build", "tiny")
        host.start_keeper()
        host.wait_for("2 free desktops", lambda p: len(free_ready(p)) >= 2)
        with session(host, "alice") as alice:
            alice.console.run("echo hello")
    finally:
        host.close()  # keeper, domains, HAProxy, files

A new E2E scenario starts here: one Installation per module (its own pool name, display ports
and bind port), the users below, and `wait_for` / `wait_until` for what the keeper does.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.guest import SerialConsole, VncClient
from tests.host import URI, destroy_domains, domains, free_port

REPO = Path(__file__).resolve().parents[2]
WAIT = 180.0  # seconds: TCG guests on 2 shared cores are slow, but a hang still fails
LIBVIRT = f"{{driver: libvirt, uri: '{URI}'}}"
VIRTUALBOX = "{driver: virtualbox}"
MAINT_BITS = 0x27  # srv_admin_state: forced, inherited, configured, resolution maintenance
DRAIN_BITS = 0x18  # srv_admin_state: forced or inherited drain (management.txt)
RELOADED = "configuration reloaded"  # what the keeper logs once a reload is applied
UPDATE_REQUEST = b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10"  # RFB FramebufferUpdateRequest

Pool = dict[str, Any]  # one pool of `imagepipe status --json`


class HostError(AssertionError):
    """A step on the test host failed: a command exited non-zero, the keeper exited; the
    message shows the command's or the keeper's last output."""


class WaitTimeout(HostError, TimeoutError):
    """A wait ran out of time; the message's first line says what it waited for."""


def require_real_host(*programs: str, libvirt: bool = True) -> None:
    """Skip (locally) or fail (under IMAGEPIPE_REQUIRE_REAL=1) when a program or libvirtd is
    missing."""
    from tests.conftest import libvirt_available, require, require_program

    for program in programs:
        require_program(program)
    if libvirt:
        require(libvirt_available(), f"libvirtd does not answer on {URI} (run ./install.sh)")


def temp_root(prefix: str) -> Path:
    """A fresh folder under /tmp: short, since QEMU's unix socket paths must stay under 108
    characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass(frozen=True)
class PoolFile:
    """The one pool of an installation, as its pools/NAME.yml says it."""

    name: str
    free: int
    max: int
    ports: tuple[int, int]  # the display port range
    memory: str = "192M"
    recycle_after: str = "3s"
    boot_timeout: str | None = "2m"  # None: the default
    start: str | None = None  # restore or boot; None: the default
    channel: str = "latest"
    extra: str = ""  # further YAML lines, e.g. "failures: {max: 2}\n"

    def text(self, channel: str | None = None) -> str:
        start = "" if self.start is None else f"start: {self.start}\n"
        boot = "" if self.boot_timeout is None else f"boot_timeout: {self.boot_timeout}\n"
        return (
            f"name: {self.name}\nimage: tiny\nchannel: {channel or self.channel}\n{start}"
            f"size: {{initial: {self.free}, free: {self.free}, max: {self.max}}}\n"
            f"machine: {{cpus: 1, memory: {self.memory}}}\n"
            f"display: {{port_range: {self.ports[0]}-{self.ports[1]}, address: 127.0.0.1}}\n"
            f"sessions: {{on_logoff: reset, recycle_after: {self.recycle_after}}}\n"
            f"{boot}{self.extra}"
        )


def write_settings(
    home: Path,
    *,
    bind_port: int,
    store: Path | None = None,
    hypervisor: str = LIBVIRT,
    balancer: str = "",
    tick: str = "1s",
    parallel: int = 4,
    settings: str = "",
) -> Path:
    """HOME/imagepipe.yml and HOME/pools/: state and run folder in HOME, the registry and the
    image store in `store` (default HOME; several installations may share one), a managed
    HAProxy on 127.0.0.1:`bind_port` (`balancer`: more of its settings, e.g. ", persist:
    source"); `settings`: further YAML lines. Returns the settings file."""
    store = home if store is None else store
    (home / "pools").mkdir(parents=True, exist_ok=True)
    config = home / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {home / 'pools'}\n"
        f"packer_dir: {REPO / 'packer'}\n"
        f"state_db: {home / 'state' / 'state.db'}\n"
        f"registry: {store / 'registry'}\n"
        f"image_store: {store / 'images'}\n"
        f"run_dir: {home / 'run'}\n"
        f"hypervisor: {hypervisor}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true{balancer}}}\n"
        f"keeper: {{tick: {tick}, parallel: {parallel}}}\n"
        f"{settings}"
    )
    return config


def run_cli(
    config: Path,
    *args: str,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> str:
    """`imagepipe --config CONFIG ARGS…`; its output. A non-zero exit raises HostError with
    the tails of its output (unless check=False)."""
    done = subprocess.run(
        [sys.executable, "-m", "imagepipe", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
        env=env,
    )
    if check and done.returncode != 0:
        raise HostError(
            f"imagepipe {' '.join(args)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
    return done.stdout


class Installation:
    """Settings, state, run folder and one pool in `root`; `imagepipe keep` runs as a
    subprocess whose output goes to ROOT/keeper.log (every start appends)."""

    def __init__(
        self,
        root: Path,
        pool: PoolFile,
        *,
        bind_port: int | None = None,
        store: Path | None = None,
        hypervisor: str = LIBVIRT,
        balancer: str = "",
        tick: str = "1s",
        parallel: int = 4,
        settings: str = "",
        keeper_args: tuple[str, ...] = ("--log-level", "debug"),
        env: dict[str, str] | None = None,
        wait: float = WAIT,
    ) -> None:
        self.root = root
        self.pool = pool
        self.bind_port = free_port() if bind_port is None else bind_port
        self.keeper_args = keeper_args  # imagepipe's options before `keep`
        self.env = env
        self.wait = wait  # seconds: how long a wait lasts unless told
        self.libvirt = hypervisor == LIBVIRT
        self.keeper: subprocess.Popen[bytes] | None = None
        self.keeper_started = 0.0  # time.monotonic() just before the keeper was started
        self.followers: list[subprocess.Popen[str]] = []
        self.log_path = root / "keeper.log"
        if self.libvirt:
            destroy_domains(f"{pool.name}-")  # left by an earlier run that was killed
        self.config = write_settings(
            root,
            bind_port=self.bind_port,
            store=store,
            hypervisor=hypervisor,
            balancer=balancer,
            tick=tick,
            parallel=parallel,
            settings=settings,
        )
        self.write_pool()

    def write_pool(self, channel: str | None = None) -> None:
        """(Re)write the pool file; a running keeper applies it on `reload_keeper`."""
        (self.root / "pools" / f"{self.pool.name}.yml").write_text(self.pool.text(channel))

    # -- the CLI ----------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args]

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return run_cli(self.config, *args, check=check, timeout=timeout, env=self.env)

    def status_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", "--json"))
        return doc

    def status(self) -> Pool:
        """This installation's pool as `imagepipe status --json` shows it."""
        pool: Pool = next(p for p in self.status_doc()["pools"] if p["name"] == self.pool.name)
        return pool

    def rollout(self, *args: str) -> subprocess.Popen[str]:
        """`imagepipe rollout … --wait --json` in the background, as CI runs it; `finished`
        collects it (and `close` kills one a failed test left following)."""
        follower = subprocess.Popen(
            self.command("rollout", *args, "--wait", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=self.env,
        )
        self.followers.append(follower)
        return follower

    # -- the keeper -------------------------------------------------------------------------

    def start_keeper(self, launcher: tuple[str, ...] = ("-m", "imagepipe")) -> None:
        """Start `imagepipe keep`; `launcher` is what Python runs with imagepipe's arguments
        (a wrapper script instead of `-m imagepipe`, e.g. bench_soak_real's traced keeper)."""
        if self.keeper is not None:
            raise HostError("the keeper is already running")
        with self.log_path.open("ab") as out:
            self.keeper_started = time.monotonic()
            self.keeper = subprocess.Popen(
                [
                    sys.executable,
                    *launcher,
                    "--config",
                    str(self.config),
                    *self.keeper_args,
                    "keep",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the test only; it stops the keeper
            )

    def stop_keeper(self, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig` to the keeper and wait for it (SIGKILL after 120 s); its exit code, or
        None when no keeper ran."""
        if self.keeper is None:
            return None
        if self.keeper.poll() is None:
            self.keeper.send_signal(sig)
        try:
            code = self.keeper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.keeper.kill()
            code = self.keeper.wait(timeout=30)
        self.keeper = None
        return code

    def kill_keeper(self) -> int | None:
        """kill -9 the keeper: it gets no chance to finish anything."""
        return self.stop_keeper(signal.SIGKILL)

    def reload_keeper(self) -> None:
        """SIGHUP: the keeper reads its settings and pool files again; returns once its log
        says the new configuration is the one it works with."""
        assert self.keeper is not None, "no keeper to reload"
        said = self.keeper_output(chars=10**9).count(RELOADED)
        self.keeper.send_signal(signal.SIGHUP)
        self.wait_until(
            "the keeper to reload", lambda: self.keeper_output(chars=10**9).count(RELOADED) > said
        )

    def keeper_output(self, chars: int = 6000) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def check_keeper(self, doing: str) -> None:
        """HostError when the keeper this installation started has exited."""
        if self.keeper is not None and self.keeper.poll() is not None:
            raise HostError(f"the keeper exited while {doing}:\n{self.keeper_output()}")

    # -- waiting ----------------------------------------------------------------------------

    def wait_for(
        self,
        what: str,
        check: Callable[[Pool], bool],
        *,
        also: Callable[[Pool], None] | None = None,
        timeout: float | None = None,
    ) -> Pool:
        """Poll `status --json` every second until `check(pool)`; return that pool. `also`
        asserts an invariant on every status seen."""
        deadline = time.monotonic() + (self.wait if timeout is None else timeout)
        last: Pool = {}
        while time.monotonic() < deadline:
            self.check_keeper(f"waiting for {what}")
            last = self.status()
            if also is not None:
                also(last)
            if check(last):
                return last
            time.sleep(1.0)
        raise WaitTimeout(
            f"timed out waiting for {what}; last status:\n{json.dumps(last, indent=1)[-4000:]}"
            f"\nkeeper log:\n{self.keeper_output()}"
        )

    def wait_until(
        self, what: str, check: Callable[[], bool], timeout: float | None = None
    ) -> float:
        """Poll `check()` every 0.2 s (make it cheap: the state database, HAProxy's socket)
        until true; return time.monotonic() when it was."""
        timeout = self.wait if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return time.monotonic()
            self.check_keeper(f"waiting for {what}")
            if time.monotonic() > deadline:
                backends: object = "unreadable"
                with contextlib.suppress(OSError):
                    backends = self.backends()
                raise WaitTimeout(
                    f"timed out after {timeout:.0f}s waiting for {what}; records "
                    f"{self.states()}, backends {backends}"
                    f"\nkeeper log:\n{self.keeper_output(4000)}"
                )
            time.sleep(0.2)

    # -- what the keeper did: the state database, HAProxy, the disks ------------------------

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.db"

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of a read-only query of the state database (none before the keeper made it,
        or while it is locked)."""
        if not self.state_db.exists():
            return []
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"{self.state_db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        return []

    def states(self) -> dict[str, str]:
        """Every clone record of the pool: name -> state."""
        rows = self.query("SELECT name, state FROM clones WHERE pool = ?", self.pool.name)
        return {str(name): str(state) for name, state in rows}

    def clones_in(self, state: str) -> list[str]:
        return sorted(n for n, s in self.states().items() if s == state)

    def integrity(self) -> str:
        db = sqlite3.connect(f"{self.state_db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            db.close()

    def haproxy(self, command: str) -> str:
        """Ask the installation's HAProxy directly (its admin socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.root / "run" / "haproxy.sock"))
            sock.sendall(command.encode() + b"\n")
            return sock.makefile().read()

    def backends(self) -> dict[str, str]:
        """HAProxy's servers of the pool: name -> "ready", "drain" or "maint"."""
        found = {}
        for line in self.haproxy("show servers state desktops").splitlines()[2:]:
            parts = line.split()
            if len(parts) > 7 and parts[3].startswith(f"{self.pool.name}-"):
                admin, weight = int(parts[6]), parts[7]
                found[parts[3]] = (
                    "maint"
                    if admin & 0x27
                    else "drain"
                    if admin & 0x18 or weight == "0"
                    else "ready"
                )
        return found

    def offered(self) -> list[str]:
        """Desktops HAProxy gives a new user: ready servers whose record says free (read
        without starting a `status` process, so it can be polled often)."""
        with contextlib.suppress(OSError):
            ready = {n for n, state in self.backends().items() if state == "ready"}
            return sorted(n for n, s in self.states().items() if s == "free" and n in ready)
        return []

    def converged(self) -> bool:
        """The free target is met and nothing is being created, booted or deleted."""
        busy = [n for n, s in self.states().items() if s in ("creating", "booting", "deleting")]
        return not busy and len(self.offered()) >= self.pool.free

    @property
    def clones_dir(self) -> Path:
        """Where the libvirt adapter keeps the pool's disks, consoles and warm parents."""
        return self.root / "state" / "clones"

    def disk_files(self) -> list[str]:
        """The pool's clone disk files (finished or half-made), sorted."""
        return sorted(p.name for p in (self.clones_dir / "disks").glob(f"{self.pool.name}-*"))

    def console_path(self, clone: str) -> Path:
        return self.clones_dir / "sockets" / f"{clone}.console"

    def console(self, clone: str, timeout: float = 60.0) -> SerialConsole:
        return SerialConsole(self.console_path(clone), timeout=timeout)

    def haproxy_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int((self.root / "run" / "haproxy.pid").read_text().split()[0])
        return None

    # -- the end ----------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop rollout followers and the keeper, remove the pool's domains (and warm parents
        of its image store a cut run left), stop HAProxy."""
        for follower in self.followers:  # a failed test may leave one following
            if follower.poll() is None:
                follower.kill()
                follower.wait(timeout=30)
        self.stop_keeper()
        if self.libvirt:
            destroy_domains(f"{self.pool.name}-")
            destroy_warm_parents(self.root)
        pid = self.haproxy_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def close(self) -> None:
        """`teardown`, then remove every file of the installation."""
        try:
            self.teardown()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def destroy_warm_parents(root: Path) -> None:
    """The warm parents (libvirt domains ipw-<fingerprint>) of the image store in `root`, if
    a run was cut while one was being made."""
    for name in domains("ipw-"):
        xml = subprocess.run(
            ["virsh", "-c", URI, "dumpxml", name], capture_output=True, text=True, check=False
        ).stdout
        if str(root) in xml:
            for args in (["destroy", name], ["undefine", name, "--nvram"]):
                subprocess.run(["virsh", "-c", URI, *args], capture_output=True, check=False)


# -- what status says ------------------------------------------------------------------------


def free_ready(pool: Pool) -> list[dict[str, Any]]:
    """Clones that are free and take new users through the balancer."""
    return [c for c in pool["clones"] if c["state"] == "free" and c["balancer"] == "ready"]


def clone(pool: Pool, name: str) -> dict[str, Any]:
    """The clone `name` of a status pool; {} when there is none."""
    return next((c for c in pool["clones"] if c["name"] == name), {})


def serving(pool: Pool) -> list[dict[str, Any]]:
    """Desktops a new user can get now: ready in HAProxy, nobody on them."""
    return [
        c
        for c in pool["clones"]
        if c["balancer"] == "ready" and c["connections"] == 0 and not c["users"]
    ]


def never_below(free: int) -> Callable[[Pool], None]:
    """An invariant for `wait_for(also=...)`: never fewer than `free` desktops serving."""

    def check(pool: Pool) -> None:
        assert len(serving(pool)) >= free, f"free desktops fell below {free}: {pool['clones']}"

    return check


def finished(process: subprocess.Popen[str], timeout: float = WAIT) -> tuple[int, list[Pool]]:
    """A background `rollout … --wait --json`'s exit code and JSON lines."""
    out, err = process.communicate(timeout=timeout)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {err}"
    return process.returncode, lines


def qemu_pid(domain: str) -> int | None:
    """The pid of a libvirt domain's QEMU; None while it does not run."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    return None


# -- users -----------------------------------------------------------------------------------


def viewer(host: Installation, source: str | None = None) -> VncClient:
    """A VNC viewer on the pool's HAProxy address, from a user's own (loopback) `source`
    address when given."""
    return VncClient("127.0.0.1", host.bind_port, timeout=30, source=source)


def desktop_of(client: VncClient) -> str:
    """The desktop a VNC client landed on: QEMU names its desktop "QEMU (<domain>)"."""
    return client.handshake().removeprefix("QEMU (").removesuffix(")")


def alive(client: VncClient) -> bool:
    """The VNC connection answers: a FramebufferUpdateRequest gets a reply."""
    try:
        client.sock.sendall(UPDATE_REQUEST)
        return bool(client.sock.recv(1))
    except OSError:
        return False


@dataclass
class User:
    """A VNC viewer on the pool's address plus a console login on the desktop it reached."""

    name: str
    desktop: str
    viewer: VncClient
    console: SerialConsole
    logged_in: bool = True

    @property
    def file(self) -> str:
        return f"/home/{self.name}-file"

    def alive(self) -> bool:
        return alive(self.viewer)

    def has_file(self) -> bool:
        """The file `arrive(..., mark=True)` wrote is still there."""
        try:
            return f"{self.name}-was-here" in self.console.run(f"cat {self.file}", timeout=30)
        except (OSError, TimeoutError, ConnectionError):
            return False

    def logout(self) -> None:
        self.console.logout()
        self.logged_in = False

    def leave(self) -> None:
        """Log out (if still logged in and the console answers) and disconnect."""
        if self.logged_in:
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                self.logout()
        self.console.close()
        self.viewer.close()


def arrive(
    host: Installation,
    user: str,
    *,
    source: str | None = None,
    expect: str | None = None,
    mark: bool = False,
    console_timeout: float = 60.0,
) -> User:
    """What a user does: wait for a free desktop, connect a viewer to the pool's address,
    land on a desktop (`expect`, when given, must be the one), log in on its console (and,
    with `mark`, write USER-was-here into /home/USER-file), until the keeper has the desktop
    in use."""
    host.wait_until("a free desktop", lambda: len(host.offered()) >= 1)
    client = viewer(host, source)
    try:
        name = desktop_of(client)
        if expect is not None and name != expect:
            raise HostError(f"the VNC client landed on {name}, not {expect}")
        console = host.console(name, timeout=console_timeout)
    except BaseException:
        client.close()
        raise
    arrived = User(user, name, client, console, logged_in=False)
    try:
        console.login(user)
        arrived.logged_in = True
        if mark:
            console.run(f"echo {user}-was-here > {arrived.file} && sync")
        host.wait_until(f"{name} in use", lambda: host.states().get(name) == "in_use")
    except BaseException:
        arrived.leave()
        raise
    return arrived


@contextlib.contextmanager
def session(host: Installation, user: str, **how: Any) -> Iterator[User]:
    """`arrive` (same options), and `leave` at the end whatever happened."""
    arrived = arrive(host, user, **how)
    try:
        yield arrived
    finally:
        arrived.leave()
