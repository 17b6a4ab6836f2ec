"""What the benchmarks on real libvirt/QEMU and HAProxy share: the E2E tests' harness
(tests/e2e/harness.py: an installation, its keeper, its users) with what a benchmark
measures, a temp workspace with a registry holding the `tiny` image (built once) shared by
any number of installations, each with its own settings, state, HAProxy and one pool, and
CPU and memory figures from /proc.

    with Workspace.create() as ws:
        ws.build_tiny()
        lab = ws.installation("boot", bench_pool(...), free_port(), tick="1s", parallel=4)
        lab.start_keeper()
        lab.wait_ready(1, timeout=300)
        ...
        lab.teardown()          # keeper, domains, HAProxy; the workspace removes the files

Everything a run makes (domains, HAProxy processes, files) is removed by `teardown` /
`Workspace.close`, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root is not on sys.path
from tests.e2e import harness  # noqa: E402
from tests.e2e.harness import PoolFile, run_cli, temp_root, write_settings  # noqa: E402
from tests.host import URI, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_MEMORY_MB = 128  # bench_pool's desktops
QEMU_OVERHEAD_MB = 80  # what one TCG QEMU process takes on top of the guest's memory

# A benchmark step failed; the message says which and shows the keeper's last output.
BenchError = harness.HostError


def say(text: str) -> None:
    print(text, flush=True)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop a benchmark as Ctrl-C does: its cleanup runs."""

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)


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


# -- installations ---------------------------------------------------------------------------


def bench_pool(
    name: str,
    *,
    free: int,
    max: int,
    ports: tuple[int, int],
    start: str = "restore",
    boot_timeout: str = "10m",
) -> PoolFile:
    """A benchmark's pool: tiny desktops of GUEST_MEMORY_MB, recycled 2 s after a logoff."""
    return PoolFile(
        name,
        free,
        max,
        ports,
        memory=f"{GUEST_MEMORY_MB}M",
        recycle_after="2s",
        boot_timeout=boot_timeout,
        start=start,
    )


class Installation(harness.Installation):
    """The E2E tests' installation (tests/e2e/harness.py) with what the benchmarks measure:
    when desktops became ready, the keeper's logged timings, the state database's size."""

    def keeper_tail(self) -> str:
        return self.keeper_output(3000)

    def ready_names(self) -> set[str]:
        """Desktops that take new users: free clones are the only ones the keeper enables.
        None while HAProxy is not up yet."""
        with contextlib.suppress(OSError):
            return {n for n, state in self.backends().items() if state == "ready"}
        return set()

    def wait_ready(self, count: int, timeout: float) -> list[float]:
        """Wait until `count` desktops are ready in the balancer; return, for each, the
        seconds from the keeper's start to the moment it was first seen ready."""
        seen: dict[str, float] = {}

        def enough() -> bool:
            now = time.monotonic()
            for name in self.ready_names():
                seen.setdefault(name, now - self.keeper_started)
            return len(seen) >= count

        self.wait_until(f"{count} ready desktop(s)", enough, timeout)
        return sorted(seen.values())[:count]

    def user_seen(self, clone: str, user: str) -> bool:
        """`imagepipe status` shows `user` logged in on `clone`, which is in use."""
        found = harness.clone(self.status(), clone)
        return found.get("state") == "in_use" and user in found["users"]

    @contextlib.contextmanager
    def session(self, user: str, *, expect: str | None = None) -> Iterator[str]:
        """A user's session as a remote-desktop user has it (harness.session: a VNC client
        through HAProxy lands on a desktop, `expect` when given, the user logs in on its
        serial console) until the keeper sees the user (the desktop is drained); yields the
        desktop's name. On leaving, the user runs `exit` and the client goes away.

        The client is kept on purpose: a console login with no display client is
        `disconnected` to the planner, and a logoff from that state waits for
        disconnect_timeout (8 h) instead of recycle_after."""
        with harness.session(self, user, expect=expect) as arrived:
            landed = arrived.desktop
            self.wait_until(
                f"the keeper to see {user} on {landed}",
                lambda: landed not in self.ready_names() and self.user_seen(landed, user),
                120,
            )
            yield landed

    @property
    def warm_dir(self) -> Path:
        """Where the libvirt adapter keeps this installation's warm parents."""
        return self.clones_dir / "warm"

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

    def state_db_bytes(self) -> tuple[int, int]:
        """The state database's size on disk, and its write-ahead log's."""
        files = (self.state_db, self.state_db.with_name("state.db-wal"))
        db, wal = (f.stat().st_size if f.exists() else 0 for f in files)
        return db, wal

    def records(self) -> list[str]:
        """Names of the clones the state database remembers for this pool."""
        return sorted(self.states())

    def table_rows(self, table: str) -> int:
        rows = self.query(f"SELECT count(*) FROM {table}")
        return int(rows[0][0]) if rows else 0

    def disk_names(self) -> list[str]:
        """Clones whose disk overlay the libvirt adapter holds (finished or half-made)."""
        return [name.split(".")[0] for name in self.disk_files()]


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
        root = temp_root("ipk-")
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

    def build_tiny(self) -> float:
        """`imagepipe build tiny` into this workspace's registry; returns its seconds."""
        home = self.root / "build"
        config = write_settings(home, bind_port=free_port(), store=self.root, tick="5s", parallel=1)
        started = time.monotonic()
        run_cli(config, "build", "tiny", timeout=900)
        return time.monotonic() - started

    def installation(
        self, role: str, pool: PoolFile, bind_port: int, tick: str, parallel: int
    ) -> Installation:
        home = self.root / role
        home.mkdir()
        made = Installation(
            home,
            pool,
            bind_port=bind_port,
            store=self.root,
            tick=tick,
            parallel=parallel,
            keeper_args=(),
        )
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
