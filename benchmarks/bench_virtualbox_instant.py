"""Instant desktops on the VirtualBox adapter: boot vs restore, measured in one run.

    .venv/bin/python benchmarks/bench_virtualbox_instant.py [--samples 3]

On the simulated VirtualBox (tests/vboxsim: pyvbox's own code over a simulated VBoxSVC whose
machines are real QEMU guests of the `tiny` image under TCG), through the adapter, one
desktop at a time:
  1. boot: create_clone (start: boot) + start → ready (the Guest Additions reported)
  2. warm parent: the first create_clone of the version (start: restore) makes it
  3. restore: create_clone + start → ready, with the parent made (median of --samples clones)
  4. reset in each mode: reset → ready again (median and max of --samples)
The figures are the simulator's: QEMU under TCG on this host saving and loading its
migration stream, not VirtualBox's VBoxHeadless restoring a .sav. Readiness is polled every
0.1 s, so the figures have that resolution.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import CloneMode, CloneSpec, StartMode
from tests import vboxsim
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import tiny_vm, vnc_display
from tests.vboxsim.process import QemuProcess

TIMEOUT = 180.0


def until_ready(hv: VirtualBoxHypervisor, name: str, since: float) -> float:
    deadline = since + TIMEOUT
    while time.monotonic() < deadline:
        if any(c.name == name and c.ready for c in hv.list_clones()):
            return time.monotonic() - since
        time.sleep(0.1)
    raise SystemExit(f"{name} was not ready within {TIMEOUT:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bvi-", dir="/tmp"))
    host: Host | None = None
    hv: VirtualBoxHypervisor | None = None
    try:
        host = vboxsim.start(work / "vbox", version="7.0.14", process_factory=QemuProcess)
        base = tiny_vm(host, work / "tiny-v1")
        hv = VirtualBoxHypervisor()
        slots = iter(range(100))

        def clone(start: StartMode) -> tuple[str, float]:
            slot = next(slots)
            spec = CloneSpec(f"bvi-{slot}", "bvi", slot, base, CloneMode.LINKED, 1,
                             128 * 1024**2, vnc_display(), start=start)  # fmt: skip
            began = time.monotonic()
            hv.create_clone(spec)
            hv.start(spec.name)
            seconds = until_ready(hv, spec.name, began)
            hv.stop(spec.name, 10.0)  # one guest at a time: TCG is CPU-bound
            return spec.name, seconds

        def resets(name: str) -> list[float]:
            seconds = []
            for _ in range(options.samples):
                began = time.monotonic()
                hv.reset(name)
                seconds.append(until_ready(hv, name, began))
            return seconds

        booted, boot_s = clone(StartMode.BOOT)
        _, first_s = clone(StartMode.RESTORE)  # makes the version's warm parent
        restored = [clone(StartMode.RESTORE) for _ in range(options.samples)]
        restore_s = statistics.median(s for _, s in restored)
        boot_resets = resets(booted)
        infos = {c.name: c.started_by for c in hv.list_clones()}
        hv.stop(booted, 10.0)
        restore_resets = resets(restored[0][0])
        infos |= {c.name: c.started_by for c in hv.list_clones() if c.name != booted}
        print("simulated VirtualBox 7.0 (QEMU TCG guests of tiny, 128 MiB, 1 cpu), one run:")
        print(f"  boot:    create + start -> ready          {boot_s:6.2f} s")
        print(f"  restore: first clone (makes the parent)   {first_s:6.2f} s")
        print(
            f"  restore: create + start -> ready, median  {restore_s:6.2f} s "
            f"= {restore_s / boot_s:.2f} x boot  ({', '.join(f'{s:.2f}' for _, s in restored)})"
        )
        b_med, r_med = statistics.median(boot_resets), statistics.median(restore_resets)
        print(
            f"  reset -> ready, boot mode:    median {b_med:5.2f} s (max {max(boot_resets):.2f})"
            f" = {b_med / boot_s:.2f} x boot"
        )
        print(
            f"  reset -> ready, restore mode: median {r_med:5.2f} s "
            f"(max {max(restore_resets):.2f}) = {r_med / boot_s:.2f} x boot, "
            f"{r_med / b_med:.2f} x a boot-mode reset"
        )
        print(f"  started_by after the resets: {infos[booted]} / {infos[restored[0][0]]}")
    finally:
        if hv is not None:
            for c in hv.list_clones():
                hv.delete(c.name)
            hv.close()
        if host is not None:
            vboxsim.stop(host)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
