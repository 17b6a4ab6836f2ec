"""Instant desktops on a remote libvirt host, real: boot vs restore from a warm parent.

    sudo IMAGEPIPE_LAB_SLOT=N .venv/bin/python benchmarks/bench_hosts_instant.py

On host3 of the tests/multihost lab (a libvirtd in a network namespace, reached over
qemu+tls://), with the multi-host adapter and the tiny guest under TCG, each figure is
create/reset → ready (guest agent up):
  1. start: boot — one desktop created and started; then reset
  2. start: restore — the first desktop (makes host3's warm parent), a second one (restored
     from it), then a reset of the second (restored again)
Ratios are against the booted desktop of the same run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, HostSpec, StartMode
from tests.guest import tiny_base_image
from tests.multihost.conftest import registry_checksums
from tests.multihost.lab import HostLab, NamespacedHost

TIMEOUT = 240.0


def spec_of(base: BaseImage, host: NamespacedHost, slot: int, start: StartMode) -> CloneSpec:
    return CloneSpec(
        name=f"bench-{slot}",
        pool="bench",
        slot=slot,
        base=base,
        mode=CloneMode.LINKED,
        cpus=1,
        memory=128 * 1024**2,
        display=Endpoint(host.address, 5980 + slot),
        host=host.name,
        start=start,
    )


def ready(hv: MultiHostHypervisor, name: str, started: float) -> float:
    while True:
        found = [c for c in hv.list_clones() if c.name == name and c.ready]
        if found:
            return time.monotonic() - started
        if time.monotonic() - started > TIMEOUT:
            raise SystemExit(f"{name} not ready after {TIMEOUT:.0f} s")
        time.sleep(0.05)


def created(hv: MultiHostHypervisor, spec: CloneSpec) -> float:
    started = time.monotonic()
    hv.create_clone(spec)
    hv.start(spec.name)
    return ready(hv, spec.name, started)


def reset(hv: MultiHostHypervisor, name: str) -> float:
    started = time.monotonic()
    hv.reset(name)
    return ready(hv, name, started)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="iphb-", dir="/tmp"))
    try:
        base = tiny_base_image(root / "tiny-v1", image="benchi", version=1)
        with HostLab(root / "lab", count=3, tls=frozenset({3})) as lab:
            host = lab.hosts[2]
            specs = [HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts]
            hv = MultiHostHypervisor(specs, state_dir=root / "state", checksums=registry_checksums)
            try:
                hv.list_clones()
                while not hv.ensure_version(host.name, base):
                    time.sleep(0.1)
                boot = created(hv, spec_of(base, host, 1, StartMode.BOOT))
                boot_reset = reset(hv, "bench-1")
                hv.delete("bench-1")
                first = created(hv, spec_of(base, host, 2, StartMode.RESTORE))
                second = created(hv, spec_of(base, host, 3, StartMode.RESTORE))
                again = reset(hv, "bench-3")
                modes = {c.name: c.started_by for c in hv.list_clones() if c.pool == "bench"}
            finally:
                for clone in hv.list_clones():
                    if clone.pool == "bench":
                        hv.delete(clone.name)
                hv.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"host3 (qemu+tls), tiny guest under TCG; started by: {modes}")
    print(f"boot:    create+start → ready {boot:6.2f} s; reset → ready {boot_reset:6.2f} s")
    print(f"restore: first desktop (makes the warm parent) → ready {first:6.2f} s")
    print(f"restore: next desktop → ready {second:6.2f} s = {second / boot:.2f} x boot")
    print(f"restore: reset → ready {again:6.2f} s = {again / boot_reset:.2f} x boot's reset")


if __name__ == "__main__":
    main()
