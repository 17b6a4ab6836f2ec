"""How fast `imagepipe keep` fills and recycles a pool, and what the keeper costs when idle.

    .venv/bin/python benchmarks/bench_keeper.py [--desktops 20] [--overhead-minutes 5]
                                                [--modes boot,restore]

Real libvirt/QEMU (TCG) desktops of the `tiny` image behind a real HAProxy, all measured in
the same run (the image is built once into a temp registry):
  1. boot: keeper start → 1 free desktop READY in the balancer (a pool of 1, alone)
  2. fill: keeper start → 4 free desktops READY (free=4, max=4, keeper.parallel 4), against
     boot; with 2 cores and CPU-bound TCG boots the best possible ratio is about 4 / 2
  3. recycle: a VNC client through HAProxy, console login, `exit` and the client leaves →
     the same desktop reset, free and READY again, minus recycle_after (2 s), against boot
     (median and max of --samples)
  4. overhead: CPU time (user+sys) of the `imagepipe keep` process and its children (QEMU
     excluded) with --desktops idle desktops of 128M, over a window after the pool converged.
     Goal: under 1 % of one core.
Steps 1-3 run once per start mode (`boot`, and `restore`: instant desktops restored from the
version's warm parent), side by side. In restore mode step 1 includes making the warm parent
(the first desktop of a version on a host pays it once); step 2 starts with the parent made
(copied from step 1's installation), as a pool has it after its version's first desktop.
The issue's goals, against one cold boot (boot mode's step 1): recycle - recycle_after
<= 0.3 x boot; fill of 4 <= 1.0 x boot. --overhead-minutes 0 skips step 4.
Readiness is read from HAProxy's admin socket every 0.2 s, so the figures have that resolution.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _host import (
    BenchError,
    Installation,
    Workspace,
    bench_pool,
    check_memory,
    domain_id,
    pid_cpu,
    pids_named,
    qemu_reaper,
    reap_delay,
    running_domain_count,
    say,
    stop_on_signals,
    tree_cpu,
)

from imagepipe.units import parse_duration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.host import free_port, port_in_use

BOOT_PORTS = (6100, 6103)
FILL_PORTS = (6110, 6113)
IDLE_FIRST_PORT = 6120
LAST_PORT = 6199
FILL = 4
RECYCLE_AFTER = 2.0  # seconds


@dataclass(frozen=True)
class Options:
    desktops: int
    overhead_minutes: float
    samples: int
    tick: str
    modes: tuple[str, ...]


@dataclass(frozen=True)
class ModeResult:
    boot: float  # keeper start -> 1 free ready desktop
    fill: list[float]  # keeper start -> k-th free ready desktop
    recycle: list[float]  # logoff -> ready again, minus recycle_after
    parent_s: list[float]  # seconds the keeper logged making warm parents
    restore_s: list[float]  # seconds the keeper logged per restore call


@dataclass(frozen=True)
class CpuUse:
    keeper_s: float
    window_s: float
    haproxy_s: float | None
    libvirtd_s: float | None

    def per_hour(self, seconds: float) -> float:
        return seconds * 3600.0 / self.window_s

    def percent_of_core(self, seconds: float) -> float:
        return seconds * 100.0 / self.window_s


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far: the keeper with its children, and for reference HAProxy and
    libvirtd (None when not found)."""

    at: float  # time.monotonic()
    keeper: float
    haproxy: float | None
    libvirtd: float | None

    @classmethod
    def take(cls, keeper: int, haproxy: int | None, libvirtd: int | None) -> CpuSample:
        return cls(time.monotonic(), tree_cpu(keeper), _cpu(haproxy), _cpu(libvirtd))


def parse_args() -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--desktops", type=int, default=20, help="idle desktops for overhead")
    parser.add_argument("--overhead-minutes", type=float, default=5.0, help="measuring window")
    parser.add_argument("--samples", type=int, default=3, help="recycle samples")
    parser.add_argument("--tick", default="5s", help="keeper.tick (default: the product's 5s)")
    parser.add_argument("--modes", default="boot,restore", help="start modes to measure")
    args = parser.parse_args()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("boot", "restore") for m in modes):
        parser.error("--modes is a comma-separated list of boot and restore")
    options = Options(args.desktops, args.overhead_minutes, args.samples, args.tick, modes)
    last = IDLE_FIRST_PORT + options.desktops - 1
    if options.desktops < 1 or last > LAST_PORT:
        parser.error(f"--desktops must be 1 to {LAST_PORT - IDLE_FIRST_PORT + 1}")
    if options.overhead_minutes < 0 or options.samples < 1:
        parser.error("--overhead-minutes must be >= 0 and --samples >= 1")
    return options


def check_host(options: Options) -> None:
    """Refuse what would fail later (ports taken, not enough memory); warn about load."""
    ports = [*range(BOOT_PORTS[0], BOOT_PORTS[1] + 1), *range(FILL_PORTS[0], FILL_PORTS[1] + 1)]
    ports += range(IDLE_FIRST_PORT, IDLE_FIRST_PORT + options.desktops)
    taken = [p for p in ports if port_in_use(p)]
    if taken:
        sys.exit(f"ports {taken} on 127.0.0.1 are in use; the benchmark needs 6100-6199 free")
    available_mb = check_memory(options.desktops)
    others = subprocess.run(
        ["pgrep", "-af", "pytest"], capture_output=True, text=True, check=False
    ).stdout.strip()
    load = os.getloadavg()[0]
    print(
        f"host: {os.cpu_count()} cores, load {load:.2f}, {running_domain_count()} other "
        f"running domain(s), {available_mb} MB available"
    )
    print(
        f"host: QEMU is reaped by {qemu_reaper()}; PID 1 reaps an orphan after "
        f"{reap_delay():.2f} s (libvirt's destroy waits for the reaping: where PID 1 reaps "
        "QEMU, every reset pays it, in both start modes)"
    )
    if others:
        print(f"WARNING: test runs are going, figures may be disturbed:\n{others}")


def measure_boot(ws: Workspace, options: Options, mode: str) -> tuple[Installation, float]:
    pool = bench_pool(ws.pool_name(f"one-{mode}"), free=1, max=1, ports=BOOT_PORTS, start=mode)
    inst = ws.installation(f"one-{mode}", pool, free_port(), options.tick, parallel=4)
    inst.start_keeper()
    (boot,) = inst.wait_ready(1, timeout=300)
    clone = inst.status()["clones"][0]
    if clone["state"] != "free":
        raise BenchError(f"the ready desktop is {clone['state']}, not free")
    if clone.get("started_by") != mode:
        raise BenchError(f"the desktop started by {clone.get('started_by')}, not {mode}")
    say(f"[{mode}] one: keeper start -> 1 free ready desktop    {boot:7.2f} s")
    return inst, boot


def recycle_once(inst: Installation, clone: str, user: str) -> float:
    """A user's session on `clone` (Installation.session: VNC through HAProxy, console
    login, `exit`, the client leaves). Returns the seconds from the logoff until the desktop
    is reset, free and READY again, minus recycle_after."""
    inst.wait_until(f"{clone} ready", lambda: clone in inst.ready_names(), 300)
    started_as = domain_id(clone)
    with inst.session(user, expect=clone):
        pass
    logged_off = time.monotonic()
    back = inst.wait_until(f"{clone} to be recycled", lambda: clone in inst.ready_names(), 300)
    if domain_id(clone) == started_as:
        raise BenchError(f"{clone} came back without a reset (same libvirt domain id)")
    return back - logged_off - RECYCLE_AFTER


def measure_recycle(inst: Installation, options: Options) -> list[float]:
    clone = f"{inst.pool.name}-0"
    samples = []
    for i in range(options.samples):
        latency = recycle_once(inst, clone, f"user{i}")
        say(
            f"[{inst.pool.start}] recycle sample {i + 1}: logoff -> ready again - "
            f"recycle_after {latency:7.2f} s"
        )
        samples.append(latency)
    return samples


def measure_fill(
    ws: Workspace, options: Options, mode: str, warm: Path | None
) -> tuple[list[float], list[float]]:
    """Fill times, and the restore call times the keeper logged."""
    pool = bench_pool(
        ws.pool_name(f"fill-{mode}"), free=FILL, max=FILL, ports=FILL_PORTS, start=mode
    )
    inst = ws.installation(f"fill-{mode}", pool, free_port(), options.tick, parallel=4)
    if warm is not None and warm.is_dir():
        # the version's warm parent, as the pool has it after its first desktop
        shutil.copytree(warm, inst.warm_dir, ignore=shutil.ignore_patterns("*.lock", "*.partial"))
    inst.start_keeper()
    times = inst.wait_ready(FILL, timeout=600)
    say(
        f"[{mode}] fill: keeper start -> k-th free ready desktop "
        + "  ".join(f"{t:.2f}" for t in times)
    )
    restores = inst.logged_seconds("clone restored")
    inst.teardown()
    return times, restores


def measure_overhead(ws: Workspace, options: Options) -> CpuUse:
    n = options.desktops
    pool = bench_pool(
        ws.pool_name("idle"),
        free=n,
        max=n,
        ports=(IDLE_FIRST_PORT, IDLE_FIRST_PORT + n - 1),
        boot_timeout="2m",  # a guest that hangs while booting is reset, not waited for
        start=options.modes[-1],
    )
    inst = ws.installation("idle", pool, free_port(), options.tick, parallel=4)
    inst.start_keeper()
    deadline = time.monotonic() + 60 + 10 * n
    while len(ready := inst.ready_names()) < n and time.monotonic() < deadline:
        inst.check_keeper("filling the idle pool")
        time.sleep(1.0)
    took = time.monotonic() - inst.keeper_started
    say(f"idle pool: {len(ready)} of {n} desktops ready {took:.1f} s after keeper start")
    if len(ready) < n:
        say(
            "WARNING: measuring anyway; the keeper keeps retrying the others "
            f"(boot_timeout {pool.boot_timeout}), which is part of what it costs"
        )
    time.sleep(3 * parse_duration(options.tick))  # let the last actions' passes finish
    keeper = inst.keeper
    if keeper is None:
        raise BenchError("the keeper is not running")
    haproxy = inst.haproxy_pid()
    libvirtd = next(iter(pids_named("libvirtd")), None)
    window = options.overhead_minutes * 60.0
    say(f"measuring keeper CPU for {window:.0f} s with {n} idle desktops…")
    start = CpuSample.take(keeper.pid, haproxy, libvirtd)
    while (left := window - (time.monotonic() - start.at)) > 0:
        time.sleep(min(5.0, left) + 0.01)
        inst.check_keeper("measuring its CPU time")
    end = CpuSample.take(keeper.pid, haproxy, libvirtd)
    still = len(inst.ready_names())
    if still != n:
        say(f"WARNING: {still} of {n} desktops ready at the end of the window")
    return CpuUse(
        keeper_s=end.keeper - start.keeper,
        window_s=end.at - start.at,
        haproxy_s=_delta(start.haproxy, end.haproxy),
        libvirtd_s=_delta(start.libvirtd, end.libvirtd),
    )


def _cpu(pid: int | None) -> float | None:
    return None if pid is None else pid_cpu(pid)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def report(options: Options, build_s: float, results: dict[str, ModeResult]) -> None:
    cores = os.cpu_count() or 1
    modes = list(results)
    say("")
    say(f"== results (keeper.tick {options.tick}, TCG, {cores} cores; tiny build {build_s:.0f} s)")
    say(f"{'':52}" + "".join(f"{m:>12}" for m in modes))

    def row(label: str, values: list[float | None], unit: str = " s") -> None:
        cells = "".join(
            f"{'-':>12}" if v is None else f"{v:>{12 - len(unit)}.2f}{unit}" for v in values
        )
        say(f"{label:52}{cells}")

    row("one desktop (keeper start -> 1 free ready)", [results[m].boot for m in modes])
    row(f"fill {FILL} free ready (parallel 4)", [results[m].fill[-1] for m in modes])
    row("recycle - recycle_after, median", [statistics.median(results[m].recycle) for m in modes])
    row("recycle - recycle_after, max", [max(results[m].recycle) for m in modes])
    row(
        "  making the warm parent (keeper log)",
        [max(results[m].parent_s) if results[m].parent_s else None for m in modes],
    )
    row(
        "  one restore call, median (keeper log)",
        [statistics.median(results[m].restore_s) if results[m].restore_s else None for m in modes],
    )
    if "boot" not in results:
        return
    cold = results["boot"].boot
    say(f"ratios against one cold boot ({cold:.2f} s):")
    row(f"  fill of {FILL} / boot (goal <= 1.0)", [results[m].fill[-1] / cold for m in modes], "")
    row(
        "  recycle median / boot (goal <= 0.3)",
        [statistics.median(results[m].recycle) / cold for m in modes],
        "",
    )
    row("  recycle max / boot", [max(results[m].recycle) / cold for m in modes], "")
    say(
        f"  (boot mode: ideal fill ratio on {cores} cores with CPU-bound boots "
        f"{max(1.0, FILL / cores):.2f}; 1 sequential: {FILL:.2f})"
    )


def report_cpu(options: Options, cpu: CpuUse) -> None:
    say(
        f"keeper CPU, {options.desktops} idle desktops, {cpu.window_s:.0f} s window      "
        f"{cpu.per_hour(cpu.keeper_s):7.1f} CPU s/h = "
        f"{cpu.percent_of_core(cpu.keeper_s):.3f} % of one core (goal < 1 %)"
    )
    for name, used in (("haproxy", cpu.haproxy_s), ("libvirtd (whole host)", cpu.libvirtd_s)):
        if used is not None:
            say(
                f"  for reference, not counted: {name:22} {cpu.per_hour(used):7.1f} CPU s/h = "
                f"{cpu.percent_of_core(used):.3f} %"
            )


def main() -> None:
    options = parse_args()
    stop_on_signals()
    check_host(options)
    try:
        with Workspace.create() as ws:
            say(f"workspace {ws.root}, pools bench-{ws.token}-*")
            build_s = ws.build_tiny()
            say(f"built tiny in {build_s:.1f} s")
            results: dict[str, ModeResult] = {}
            for mode in options.modes:
                one, boot = measure_boot(ws, options, mode)
                recycle = measure_recycle(one, options)
                parents = one.logged_seconds("warm parent made")
                restores = one.logged_seconds("clone restored")
                one.teardown()
                warm = one.warm_dir if mode == "restore" else None
                fill, fill_restores = measure_fill(ws, options, mode, warm)
                results[mode] = ModeResult(boot, fill, recycle, parents, restores + fill_restores)
            cpu = measure_overhead(ws, options) if options.overhead_minutes > 0 else None
            report(options, build_s, results)
            if cpu is not None:
                report_cpu(options, cpu)
            say("cleaning up…")
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; everything the benchmark made was removed")


if __name__ == "__main__":
    main()
