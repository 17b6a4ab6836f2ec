"""A throwaway imagepipe installation on this host, for benchmarks on real libvirt/QEMU and
HAProxy: one temp workspace with a registry holding the `tiny` image (built once), and any
number of installations in it, each with its own settings, state, HAProxy and one pool.

    with Workspace.create() as ws:
        ws.build_tiny()
        lab = ws.installation("boot", pool_yaml, bind_port=free_port())
        lab.start_keeper()
        lab.wait_ready(1, timeout=300)
        ...
        lab.teardown()          # keeper, domains, HAProxy; the workspace removes the files

Everything a run makes (domains, HAProxy processes, files) is removed by `teardown` /
`Workspace.close`, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.errors import ImagepipeError
from imagepipe.pool.model import Backend, BackendState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root is not on sys.path
from tests.guest import SerialConsole, VncClient  # noqa: E402
from tests.host import URI, destroy_domains, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_MEMORY_MB = 128  # PoolFile's desktops
QEMU_OVERHEAD_MB = 80  # what one TCG QEMU process takes on top of the guest's memory
POLL = 0.2  # seconds between balancer polls: cheap (one admin-socket round trip)


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and shows the keeper's last output."""


def say(text: str) -> None:
    print(text, flush=True)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop a benchmark as Ctrl-C does: its cleanup runs."""

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port_range(count: int, *, low: int = 20000, high: int = 30000) -> tuple[int, int]:
    """`count` consecutive free ports on 127.0.0.1, below the kernel's ephemeral range (so no
    outgoing connection takes one later), for a pool's display port_range."""
    for _ in range(200):
        first = random.randrange(low, high - count)
        if not any(port_in_use(p) for p in range(first, first + count)):
            return first, first + count - 1
    raise BenchError(f"no {count} consecutive free ports between {low} and {high}")


def check_memory(desktops: int) -> int:
    """Exit with one line if `desktops` tiny desktops would not fit in this host's available
    memory; return the available MB."""
    available_mb = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    need_mb = desktops * (GUEST_MEMORY_MB + QEMU_OVERHEAD_MB)
    if need_mb > available_mb * 0.8:
        sys.exit(
            f"{desktops} desktops need about {need_mb} MB, {available_mb} MB are "
            "available: lower --desktops"
        )
    return available_mb


def virsh(*args: str) -> str:
    done = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=False, timeout=120
    )
    return done.stdout


def running_domain_count() -> int:
    return len(virsh("list", "--name").split())


def domain_id(name: str) -> str:
    """libvirt's id of a running domain; it changes every time the domain is started."""
    return virsh("domid", name).strip()


def qemu_reaper() -> str:
    """Who reaps libvirt's QEMUs: they daemonize, so they are orphans of libvirtd's nearest
    subreaper, else of PID 1. scripts/libvirtd.sh runs libvirtd under `tini -s`."""
    for pid in pids_named("libvirtd"):
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if parent != 1:
            return Path(f"/proc/{parent}/comm").read_text().strip() + " (libvirtd's subreaper)"
    return Path("/proc/1/comm").read_text().strip() + " (PID 1)"


def reap_delay() -> float:
    """Seconds this host's PID 1 takes to reap an orphan after it exits. libvirt's destroy
    waits until QEMU is reaped, so where PID 1 reaps QEMU every reset pays this; a normal
    init reaps at once (well under 0.01 s)."""
    started = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(started.stdout.strip())
    begin = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists() and time.monotonic() - begin < 10:
        time.sleep(0.005)
    return time.monotonic() - begin


# -- CPU time from /proc ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    own: float  # user + sys of the process (all threads), seconds
    children: float  # user + sys of its exited, waited-for children, seconds


def proc_stat(pid: int) -> ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)
    utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        comm=comm,
        own=(utime + stime) / CLK_TCK,
        children=(cutime + cstime) / CLK_TCK,
    )


def all_procs() -> list[ProcStat]:
    found = (proc_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [s for s in found if s is not None]


def tree_cpu(pid: int, *, exclude_prefix: str = "qemu-system") -> float:
    """CPU seconds of a process, its exited children, and its live descendants (except those
    whose command starts with `exclude_prefix`)."""
    procs = all_procs()
    by_parent: dict[int, list[ProcStat]] = {}
    for p in procs:
        by_parent.setdefault(p.ppid, []).append(p)
    top = next((p for p in procs if p.pid == pid), None)
    if top is None:
        raise BenchError(f"process {pid} is gone")
    total = 0.0
    todo = [top]
    while todo:
        p = todo.pop()
        if p.comm.startswith(exclude_prefix):
            continue
        total += p.own + p.children
        todo.extend(by_parent.get(p.pid, []))
    return total


def pid_cpu(pid: int) -> float | None:
    stat = proc_stat(pid)
    return None if stat is None else stat.own + stat.children


def proc_status(pid: int, key: str) -> int | None:
    """An integer field of /proc/PID/status (VmRSS in KiB, Threads, …); None when the
    process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def pids_named(name: str) -> list[int]:
    return [p.pid for p in all_procs() if p.comm == name]


def run_cli(config: Path, *args: str, timeout: float = 900) -> str:
    """Run `imagepipe --config CONFIG ARGS…`; return its output, raise BenchError on failure."""
    done = subprocess.run(
        [sys.executable, "-m", "imagepipe", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise BenchError(
            f"imagepipe {' '.join(args)} exited {done.returncode}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return done.stdout


# -- installations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolFile:
    name: str
    free: int
    max: int
    ports: tuple[int, int]
    memory: str = "128M"
    recycle_after: str = "2s"
    boot_timeout: str = "10m"
    start: str = "restore"  # boot, or restore from the version's warm parent

    def text(self) -> str:
        return (
            f"name: {self.name}\nimage: tiny\nchannel: latest\nstart: {self.start}\n"
            f"size: {{initial: {self.free}, free: {self.free}, max: {self.max}}}\n"
            f"machine: {{cpus: 1, memory: {self.memory}}}\n"
            f"display: {{port_range: {self.ports[0]}-{self.ports[1]}, address: 127.0.0.1}}\n"
            f"sessions: {{on_logoff: reset, recycle_after: {self.recycle_after}}}\n"
            f"boot_timeout: {self.boot_timeout}\n"
        )


@dataclass
class Installation:
    """Settings, state, run dir and one pool; `imagepipe keep` runs as a subprocess."""

    root: Path
    config: Path
    pool: PoolFile
    bind_port: int
    keeper: subprocess.Popen[bytes] | None = None
    keeper_started: float = 0.0  # time.monotonic() just before the keeper was started
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "keeper.log"
        self.balancer = HAProxyBalancer(
            bind=f"127.0.0.1:{self.bind_port}",
            admin_socket=self.root / "run" / "haproxy.sock",
            config_path=self.root / "run" / "haproxy.cfg",
            pid_file=self.root / "run" / "haproxy.pid",
            manage=False,
            timeout=2.0,
        )

    def cli(self, *args: str, timeout: float = 900) -> str:
        return run_cli(self.config, *args, timeout=timeout)

    def status(self) -> dict[str, Any]:
        doc = json.loads(self.cli("status", "--json"))
        pool: dict[str, Any] = next(p for p in doc["pools"] if p["name"] == self.pool.name)
        return pool

    def start_keeper(self, launcher: tuple[str, ...] = ("-m", "imagepipe")) -> None:
        """Start `imagepipe keep`; `launcher` is what Python runs with imagepipe's arguments
        (a wrapper script instead of `-m imagepipe`, e.g. bench_soak_real's traced keeper)."""
        if self.keeper is not None:
            raise BenchError("the keeper is already running")
        with self.log_path.open("ab") as out:
            self.keeper_started = time.monotonic()
            self.keeper = subprocess.Popen(
                [sys.executable, *launcher, "--config", str(self.config), "keep"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            )

    def stop_keeper(self) -> None:
        if self.keeper is None:
            return
        if self.keeper.poll() is None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(timeout=30)
        self.keeper = None

    def keeper_tail(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def check_keeper(self, doing: str) -> None:
        if self.keeper is not None and self.keeper.poll() is not None:
            raise BenchError(f"the keeper exited while {doing}:\n{self.keeper_tail()}")

    def backends(self) -> list[Backend]:
        """This pool's backends in HAProxy; none while HAProxy is not up yet."""
        try:
            found = self.balancer.list_backends()
        except ImagepipeError:
            return []
        return [b for b in found if b.name.startswith(f"{self.pool.name}-")]

    def ready_names(self) -> set[str]:
        """Desktops that take new users: free clones are the only ones the keeper enables."""
        return {b.name for b in self.backends() if b.state is BackendState.READY}

    def wait_until(self, doing: str, done: Any, timeout: float) -> float:
        """Poll `done()` every POLL s until true; return time.monotonic() when it was."""
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return time.monotonic()
            self.check_keeper(doing)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"timed out after {timeout:.0f} s {doing}; keeper log:\n{self.keeper_tail()}"
                )
            time.sleep(POLL)

    def wait_ready(self, count: int, timeout: float) -> list[float]:
        """Wait until `count` desktops are ready in the balancer; return, for each, the
        seconds from the keeper's start to the moment it was first seen ready."""
        seen: dict[str, float] = {}

        def enough() -> bool:
            now = time.monotonic()
            for name in self.ready_names():
                seen.setdefault(name, now - self.keeper_started)
            return len(seen) >= count

        self.wait_until(f"waiting for {count} ready desktop(s)", enough, timeout)
        return sorted(seen.values())[:count]

    def user_seen(self, clone: str, user: str) -> bool:
        """`imagepipe status` shows `user` logged in on `clone`, which is in use."""
        found = [c for c in self.status()["clones"] if c["name"] == clone]
        return bool(found) and found[0]["state"] == "in_use" and user in found[0]["users"]

    @contextlib.contextmanager
    def session(self, user: str, *, expect: str | None = None) -> Iterator[str]:
        """A user's session as a remote-desktop user has it: a VNC client through HAProxy
        lands on a desktop (`expect`, when given, must be the one), the user logs in on its
        serial console and the keeper sees them (the desktop is drained); yields the
        desktop's name. On leaving, the user runs `exit` and the client goes away.

        The client is kept on purpose: a console login with no display client is
        `disconnected` to the planner, and a logoff from that state waits for
        disconnect_timeout (8 h) instead of recycle_after."""
        client = VncClient("127.0.0.1", self.bind_port, timeout=30)
        try:
            landed = client.handshake().removeprefix("QEMU (").removesuffix(")")
            if expect is not None and landed != expect:
                raise BenchError(f"the VNC client landed on {landed}, not {expect}")
            with SerialConsole(self.console_path(landed), timeout=60) as console:
                console.login(user)
                try:
                    self.wait_until(
                        f"waiting for the keeper to see {user} on {landed}",
                        lambda: landed not in self.ready_names() and self.user_seen(landed, user),
                        120,
                    )
                    yield landed
                finally:
                    console.logout()
        finally:
            client.close()

    def console_path(self, clone: str) -> Path:
        return self.root / "state" / "clones" / "sockets" / f"{clone}.console"

    @property
    def warm_dir(self) -> Path:
        """Where the libvirt adapter keeps this installation's warm parents."""
        return self.root / "state" / "clones" / "warm"

    def logged_seconds(self, event: str) -> list[float]:
        """The `seconds=` field of every keeper log line with this event text."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if event in line:
                for part in line.split():
                    if part.startswith("seconds="):
                        with contextlib.suppress(ValueError):
                            found.append(float(part.removeprefix("seconds=")))
        return found

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.db"

    def state_db_bytes(self) -> tuple[int, int]:
        """The state database's size on disk, and its write-ahead log's."""
        files = (self.state_db, self.state_db.with_name("state.db-wal"))
        db, wal = (f.stat().st_size if f.exists() else 0 for f in files)
        return db, wal

    def records(self) -> list[str]:
        """Names of the clones the state database remembers for this pool (read-only);
        none before the keeper made the database."""
        if not self.state_db.exists():
            return []
        db = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("SELECT name FROM clones WHERE pool = ?", (self.pool.name,))
            return sorted(str(r[0]) for r in rows)
        finally:
            db.close()

    def table_rows(self, table: str) -> int:
        if not self.state_db.exists():
            return 0
        db = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=10)
        try:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            db.close()

    def disk_names(self) -> list[str]:
        """Clones whose disk overlay the libvirt adapter holds (finished or half-made)."""
        disks = self.root / "state" / "clones" / "disks"
        return sorted(p.name.split(".")[0] for p in disks.glob("*.qcow2*"))

    def haproxy_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int((self.root / "run" / "haproxy.pid").read_text().split()[0])
        return None

    def teardown(self) -> None:
        """Stop the keeper, remove the pool's domains and stop its HAProxy."""
        self.stop_keeper()
        destroy_domains(f"{self.pool.name}-")
        pid = self.haproxy_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@dataclass
class Workspace:
    """A short temp dir under /tmp (QEMU's unix socket paths must stay under 108 chars)
    holding the shared registry and image store, and every installation made in it."""

    root: Path
    token: str
    prefix: str = "bench"  # pools are named PREFIX-TOKEN-ROLE
    installations: list[Installation] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str = "bench") -> Workspace:
        root = Path(tempfile.mkdtemp(prefix="ipk-", dir="/tmp"))
        return cls(root=root, token=secrets.token_hex(2), prefix=prefix)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def pool_name(self, role: str) -> str:
        return f"{self.prefix}-{self.token}-{role}"

    def settings_text(self, home: Path, bind_port: int, tick: str, parallel: int) -> str:
        return (
            f"pools_dir: {home / 'pools'}\n"
            f"packer_dir: {ROOT / 'packer'}\n"
            f"state_db: {home / 'state' / 'state.db'}\n"
            f"registry: {self.root / 'registry'}\n"
            f"image_store: {self.root / 'images'}\n"
            f"run_dir: {home / 'run'}\n"
            f"hypervisor: {{driver: libvirt, uri: '{URI}'}}\n"
            f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
            f"keeper: {{tick: {tick}, parallel: {parallel}}}\n"
        )

    def build_tiny(self) -> float:
        """`imagepipe build tiny` into this workspace's registry; returns its seconds."""
        home = self.root / "build"
        (home / "pools").mkdir(parents=True)
        config = home / "imagepipe.yml"
        config.write_text(self.settings_text(home, free_port(), "5s", 1))
        started = time.monotonic()
        run_cli(config, "build", "tiny")
        return time.monotonic() - started

    def installation(
        self, role: str, pool: PoolFile, bind_port: int, tick: str, parallel: int
    ) -> Installation:
        home = self.root / role
        (home / "pools").mkdir(parents=True)
        config = home / "imagepipe.yml"
        config.write_text(self.settings_text(home, bind_port, tick, parallel))
        (home / "pools" / f"{pool.name}.yml").write_text(pool.text())
        made = Installation(root=home, config=config, pool=pool, bind_port=bind_port)
        self.installations.append(made)
        return made

    def close(self) -> None:
        for inst in reversed(self.installations):
            try:
                inst.teardown()
            except (OSError, subprocess.SubprocessError, BenchError) as exc:
                print(f"cleanup of {inst.pool.name} failed: {exc}", file=sys.stderr)
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.chmod(0o755)
        shutil.rmtree(self.root, ignore_errors=True)
