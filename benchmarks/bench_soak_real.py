"""Soak on the real host: does a real `imagepipe keep` grow over half an hour of work?

    .venv/bin/python benchmarks/bench_soak_real.py [--minutes 35] [--desktops 20]

A real keeper (`imagepipe keep`, started through the CLI as an administrator runs it) keeps a
pool of --desktops libvirt/QEMU (TCG) desktops of 128M behind a real HAProxy, `start: restore`
(the default), size {initial: N, free: N, max: N}: every desktop is made at start, and from
then on the keeper's work is the users'. Once the pool is full, a simulated user arrives every
--arrive seconds (uniform; 30-60 by default): a VNC client through HAProxy lands on a free
desktop, the user logs in on its serial console, the keeper sees them and drains the desktop;
the user stays --stay seconds (60-240), runs `exit` and the client leaves; the keeper resets
the desktop (restore from the warm parent) and puts it back in the balancer.

Every --sample seconds (30) the benchmark reads, for the keeper process: resident memory
(/proc/PID/status VmRSS), open file descriptors (/proc/PID/fd), threads, CPU time (user+sys,
its waited-for children included); the state database's size and journal rows; the pool's
domains, disk overlays, HAProxy backends and state records; the host's load average. At the
end the users leave, the pool settles, and the benchmark checks that every domain, disk and
backend belongs to a record and the other way round (nothing orphaned), stops the keeper with
SIGTERM, and prints the table and the figures: RSS at warm-up end vs at the end, growth over
the second half (MiB and MiB/hour), fd and thread min/max, keeper CPU as % of one core,
recycles done, logins served, failures.

It asserts no figure (a benchmark), but exits non-zero when the run proves nothing or found
a fault: the keeper died, nothing was recycled, no user logged in, or something was orphaned.
Everything it made (domains, disks, HAProxy, files) is removed at the end, also on Ctrl-C.

--tracemalloc (debugging a growth) runs the keeper under tracemalloc (_traced_keeper.py: a
snapshot every --sample seconds) and prints which lines' allocations grew from the warm-up's
end to the end; the keeper is slower and bigger then, so its figures are not the keeper's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

from _host import (
    BenchError,
    Installation,
    Workspace,
    bench_pool,
    check_memory,
    open_fds,
    pid_cpu,
    proc_status,
    running_domain_count,
    say,
    stop_on_signals,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.host import domains, free_port, free_port_range

MIB = 1024.0
TRACED_KEEPER = Path(__file__).resolve().parent / "_traced_keeper.py"
FAILED = "action failed"  # the keeper's log lines for a failed action, and a failed pass
PASS_FAILED = "pass failed"


@dataclass(frozen=True)
class Options:
    minutes: float
    warmup: float  # minutes after the keeper's start that count as warm-up
    desktops: int
    arrive: tuple[float, float]
    stay: tuple[float, float]
    sample: float
    tick: str
    seed: int
    tracemalloc: bool


@dataclass(frozen=True)
class Sample:
    minute: float  # since the keeper started
    load: float  # 1-minute load average of the host
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float  # keeper user+sys so far, its waited-for children included
    db_kib: float
    wal_kib: float
    journal: int
    domains: int
    disks: int
    backends: int
    ready: int
    records: int
    users: int  # logged in right now
    logins: int
    recycles: int
    failures: int  # users' failed sessions + the keeper's failed actions and passes


@dataclass
class Load:
    """Simulated users: one arrives every `arrive` seconds, logs in (one login at a time, so
    two users never race for the same free desktop), stays `stay` seconds and leaves."""

    inst: Installation
    options: Options
    rng: random.Random
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    logged_in: int = 0
    logins: int = 0
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.arrive(f"soak{n}")
            n += 1
            self.stop.wait(self.rng.uniform(*self.options.arrive))

    def arrive(self, user: str) -> None:
        stack = contextlib.ExitStack()
        try:
            clone = stack.enter_context(self.inst.session(user))
        except (BenchError, OSError, TimeoutError, ConnectionError) as exc:
            stack.close()
            self.failed(f"{user} could not log in: {exc}")
            return
        with self.lock:
            self.logins += 1
            self.logged_in += 1
        stay = self.rng.uniform(*self.options.stay)
        thread = threading.Thread(target=self.leave_later, args=(user, clone, stack, stay))
        thread.start()
        self.threads.append(thread)

    def leave_later(self, user: str, clone: str, stack: contextlib.ExitStack, stay: float) -> None:
        self.stop.wait(stay)
        try:
            stack.close()  # `exit` on the console, then the VNC client leaves
        except (BenchError, OSError, TimeoutError, ConnectionError) as exc:
            self.failed(f"{user} could not log out of {clone}: {exc}")
        finally:
            with self.lock:
                self.logged_in -= 1

    def failed(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
        say(f"  ! {what.splitlines()[0]}")

    def finish(self) -> None:
        """Every user still logged in leaves now."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def parse_args() -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=35.0, help="run length (from start)")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes of warm-up")
    parser.add_argument("--desktops", type=int, default=20)
    parser.add_argument("--arrive", default="30-60", help="seconds between users (range)")
    parser.add_argument("--stay", default="60-240", help="seconds a user stays (range)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--tick", default="5s", help="keeper.tick (default: the product's 5s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="debug a growth: run the keeper under tracemalloc (slower, bigger) and print what "
        "grew between the warm-up's end and the end, by line",
    )
    args = parser.parse_args()

    def seconds_range(text: str, name: str) -> tuple[float, float]:
        low, _, high = text.partition("-")
        try:
            pair = (float(low), float(high or low))
        except ValueError:
            parser.error(f"--{name} is LOW-HIGH in seconds, e.g. 30-60")
        if not 0 < pair[0] <= pair[1]:
            parser.error(f"--{name} needs 0 < LOW <= HIGH")
        return pair

    if args.desktops < 1 or args.minutes <= args.warmup or args.sample <= 0:
        parser.error("--desktops must be >= 1, --minutes > --warmup, --sample > 0")
    return Options(
        minutes=args.minutes,
        warmup=args.warmup,
        desktops=args.desktops,
        arrive=seconds_range(args.arrive, "arrive"),
        stay=seconds_range(args.stay, "stay"),
        sample=args.sample,
        tick=args.tick,
        seed=args.seed,
        tracemalloc=args.tracemalloc,
    )


def check_host(options: Options) -> None:
    available_mb = check_memory(options.desktops)
    load = os.getloadavg()
    say(
        f"host: {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{running_domain_count()} other running domain(s), {available_mb} MB available"
    )


def count_log(inst: Installation, *needles: str) -> int:
    """Keeper log lines holding every one of `needles`."""
    with contextlib.suppress(FileNotFoundError):
        text = inst.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if all(n in line for n in needles))
    return 0


def recycles(inst: Installation) -> int:
    return count_log(inst, "action done", "action=ResetClone")


def keeper_failure_lines(inst: Installation) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        text = inst.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if FAILED in line or PASS_FAILED in line]
    return []


def keeper_failures(inst: Installation) -> int:
    return count_log(inst, FAILED) + count_log(inst, PASS_FAILED)


def take_sample(inst: Installation, pid: int, began: float, load: Load | None) -> Sample:
    inst.check_keeper("being sampled")
    rss, threads = proc_status(pid, "VmRSS"), proc_status(pid, "Threads")
    fds, cpu = open_fds(pid), pid_cpu(pid)
    if rss is None or threads is None or fds is None or cpu is None:
        raise BenchError(f"the keeper (pid {pid}) is gone:\n{inst.keeper_tail()}")
    backends = inst.backends()
    db, wal = inst.state_db_bytes()
    user_failures = len(load.failures) if load is not None else 0
    return Sample(
        minute=(time.monotonic() - began) / 60.0,
        load=os.getloadavg()[0],
        rss_kib=rss,
        fds=fds,
        threads=threads,
        cpu_s=cpu,
        db_kib=db / 1024.0,
        wal_kib=wal / 1024.0,
        journal=inst.table_rows("journal"),
        domains=len(domains(f"{inst.pool.name}-")),
        disks=len(inst.disk_names()),
        backends=len(backends),
        ready=len(inst.ready_names()),
        records=len(inst.records()),
        users=load.logged_in if load is not None else 0,
        logins=load.logins if load is not None else 0,
        recycles=recycles(inst),
        failures=user_failures + keeper_failures(inst),
    )


HEADER = (
    f"{'min':>5} {'load':>5} {'RSS MiB':>8} {'fds':>4} {'thr':>4} {'CPU s':>7} "
    f"{'db KiB':>7} {'wal KiB':>7} {'journal':>7} {'doms':>4} {'disks':>5} "
    f"{'bknd':>4} {'ready':>5} {'recs':>4} {'users':>5} {'logins':>6} {'recyc':>5} {'fail':>4}"
)


def row(s: Sample) -> str:
    return (
        f"{s.minute:5.1f} {s.load:5.2f} {s.rss_kib / MIB:8.2f} {s.fds:4d} {s.threads:4d} "
        f"{s.cpu_s:7.1f} {s.db_kib:7.0f} {s.wal_kib:7.0f} {s.journal:7d} {s.domains:4d} "
        f"{s.disks:5d} {s.backends:4d} {s.ready:5d} {s.records:4d} {s.users:5d} {s.logins:6d} "
        f"{s.recycles:5d} {s.failures:4d}"
    )


def orphans(inst: Installation) -> list[str]:
    """What the host holds that no record accounts for, and records the host does not hold."""
    records = set(inst.records())
    found = {
        "domain": set(domains(f"{inst.pool.name}-")),
        "disk": set(inst.disk_names()),
        "balancer backend": set(inst.backends()),
    }
    problems = []
    for kind, names in found.items():
        problems += [f"{kind} {n} has no record" for n in sorted(names - records)]
        problems += [f"record {n} has no {kind}" for n in sorted(records - names)]
    return problems


def settle(inst: Installation, desktops: int, timeout: float) -> bool:
    """Wait until every desktop is free and ready again; False if not within `timeout`."""
    try:
        inst.wait_until(
            f"the pool to settle at {desktops} ready",
            lambda: len(inst.ready_names()) >= desktops,
            timeout,
        )
    except BenchError as exc:
        if inst.keeper is not None and inst.keeper.poll() is not None:
            raise
        say(f"WARNING: {str(exc).splitlines()[0]}")
        return False
    return True


def report(
    inst: Installation, options: Options, samples: list[Sample], problems: list[str], load: Load
) -> int:
    """Print the figures; return the exit status (non-zero: the run proves nothing)."""
    say("")
    say(HEADER)
    for s in samples:
        say(row(s))
    last = samples[-1]
    warm = next((s for s in samples if s.minute >= options.warmup), samples[0])
    half_minute = warm.minute + (last.minute - warm.minute) / 2
    middle = next(s for s in samples if s.minute >= half_minute)
    second_half_h = max(last.minute - middle.minute, 1e-9) / 60.0
    after_warm = [s for s in samples if s.minute >= warm.minute]
    cpu_pct = (last.cpu_s - warm.cpu_s) / max((last.minute - warm.minute) * 60.0, 1e-9) * 100
    loads = [s.load for s in samples]
    say("")
    say(
        f"== {last.minute:.1f} min, {options.desktops} desktops (start: restore, 128M, TCG), "
        f"keeper.tick {options.tick}; host load average {min(loads):.2f}-{max(loads):.2f} "
        f"(mean {sum(loads) / len(loads):.2f}) on {os.cpu_count()} cores"
    )
    say(
        f"RSS at warm-up end (min {warm.minute:.1f}) {warm.rss_kib / MIB:.2f} MiB -> end "
        f"{last.rss_kib / MIB:.2f} MiB ({(last.rss_kib - warm.rss_kib) / MIB:+.2f} MiB); "
        f"max {max(s.rss_kib for s in after_warm) / MIB:.2f} MiB"
    )
    growth = (last.rss_kib - middle.rss_kib) / MIB
    say(
        f"RSS over the second half (min {middle.minute:.1f} -> {last.minute:.1f}): "
        f"{growth:+.2f} MiB = {growth / second_half_h:+.2f} MiB/hour"
    )
    say(
        f"open fds {min(s.fds for s in after_warm)}-{max(s.fds for s in after_warm)} "
        f"(all samples {min(s.fds for s in samples)}-{max(s.fds for s in samples)}); "
        f"threads {min(s.threads for s in samples)}-{max(s.threads for s in samples)}"
    )
    say(
        f"keeper CPU after warm-up {cpu_pct:.2f} % of one core "
        f"({last.cpu_s - warm.cpu_s:.1f} s in {(last.minute - warm.minute) * 60:.0f} s; "
        f"{last.cpu_s:.1f} s in all, the fill included)"
    )
    say(
        f"state database {warm.db_kib:.0f} -> {last.db_kib:.0f} KiB (its write-ahead log "
        f"{warm.wal_kib:.0f} -> {last.wal_kib:.0f} KiB, max "
        f"{max(s.wal_kib for s in samples):.0f}), journal rows {warm.journal} -> {last.journal}"
    )
    say(
        f"logins served {load.logins}, recycles (resets) done {last.recycles}, failures: "
        f"{len(load.failures)} user session(s), {last.failures - len(load.failures)} keeper "
        "action(s)/pass(es)"
    )
    for failure in load.failures[:10]:
        say(f"  ! {failure.splitlines()[0]}")
    for line in keeper_failure_lines(inst)[:10]:
        say(f"  ! keeper: {line}")
    say(
        f"at the end: {last.domains} domains, {last.disks} disks, {last.backends} backends, "
        f"{last.records} records; orphans: {len(problems)}"
    )
    for problem in problems:
        say(f"  ! {problem}")
    status = 0
    if last.recycles == 0 or load.logins == 0:
        say("FAILED: nothing was recycled or nobody logged in; this run proves nothing")
        status = 1
    if problems:
        say("FAILED: something is orphaned")
        status = 1
    return status


def soak(ws: Workspace, options: Options) -> int:
    n = options.desktops
    pool = bench_pool(
        ws.pool_name("pool"),
        free=n,
        max=n,
        ports=free_port_range(n),
        boot_timeout="2m",  # a guest that hangs while booting is reset, not waited for
        start="restore",
    )
    inst = ws.installation("pool", pool, free_port(), options.tick, parallel=4)
    say(f"workspace {ws.root}, pool {pool.name}, displays {pool.ports[0]}-{pool.ports[1]}")
    snapshots = inst.root / "tracemalloc"
    if options.tracemalloc:
        inst.start_keeper((str(TRACED_KEEPER), str(snapshots), str(options.sample)))
    else:
        inst.start_keeper()
    keeper = inst.keeper
    if keeper is None:
        raise BenchError("the keeper did not start")
    began = inst.keeper_started
    load = Load(inst, options, random.Random(options.seed))
    samples: list[Sample] = []
    say(HEADER)

    def sample() -> None:
        samples.append(take_sample(inst, keeper.pid, began, load))
        say(row(samples[-1]))

    next_sample = began + options.sample
    loader: threading.Thread | None = None
    end = began + options.minutes * 60.0
    try:
        while time.monotonic() < end:
            if time.monotonic() >= next_sample:
                sample()
                next_sample += options.sample
            if loader is None and len(inst.ready_names()) >= n:
                filled = (time.monotonic() - began) / 60.0
                say(f"pool full ({n} ready) at min {filled:.1f}; users start arriving")
                loader = threading.Thread(target=load.run, daemon=True)
                loader.start()
            inst.check_keeper("keeping the pool under load")
            time.sleep(min(1.0, max(next_sample - time.monotonic(), 0.0)))
    finally:
        load.finish()
        if loader is not None:
            loader.join(timeout=180)
    if loader is None:
        raise BenchError(
            f"the pool never had {n} ready desktops; keeper log:\n{inst.keeper_tail()}"
        )
    say("users left; waiting for the pool to settle…")
    settle(inst, n, timeout=300)
    time.sleep(3 * 5.0)  # let the last passes record what they did
    sample()
    problems = orphans(inst)
    inst.stop_keeper()
    say(f"keeper stopped (SIGTERM), exit status {keeper.returncode}")
    if keeper.returncode != 0:
        problems.append(f"the keeper exited {keeper.returncode} on SIGTERM")
    status = report(inst, options, samples, problems, load)
    if options.tracemalloc:
        report_growth(snapshots, options, started=time.time() - (time.monotonic() - began))
    return status


def report_growth(directory: Path, options: Options, started: float) -> None:
    """What the keeper's Python heap gained from the warm-up's end to its last snapshot: the
    lines that allocated most, and the call stacks of the top three. `started` is the
    keeper's start in epoch seconds (snapshots are placed in time by their files' mtime)."""
    files = sorted(directory.glob("*.snap"))
    minutes = [(f.stat().st_mtime - started) / 60.0 for f in files]
    first = next((i for i, m in enumerate(minutes) if m >= options.warmup), len(files))
    if len(files) <= first + 1:
        say(f"tracemalloc: {len(files)} snapshot(s), too few after the warm-up; run longer")
        return
    warm = tracemalloc.Snapshot.load(str(files[first]))
    last = tracemalloc.Snapshot.load(str(files[-1]))
    total = sum(t.size for t in last.traces) - sum(t.size for t in warm.traces)
    say(
        f"\n== tracemalloc: Python heap {total / 1024:+.1f} KiB from min {minutes[first]:.1f} "
        f"to min {minutes[-1]:.1f} ({len(files)} snapshots); top lines:"
    )
    for stat in last.compare_to(warm, "lineno")[:15]:
        say(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {stat.traceback}")
    for stat in last.compare_to(warm, "traceback")[:3]:
        say(f"  {stat.size_diff / 1024:+.1f} KiB allocated from:")
        for line in stat.traceback.format(limit=6):
            say(f"    {line}")


def main() -> None:
    options = parse_args()
    stop_on_signals()
    check_host(options)
    try:
        with Workspace.create(prefix="soak") as ws:
            build_s = ws.build_tiny()
            say(f"built tiny in {build_s:.1f} s")
            status = soak(ws, options)
            say("cleaning up…")
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
    except (subprocess.SubprocessError, OSError) as exc:
        sys.exit(f"benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; everything the benchmark made was removed")
    sys.exit(status)


if __name__ == "__main__":
    main()
