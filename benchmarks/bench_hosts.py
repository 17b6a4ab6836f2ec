"""Several libvirt hosts, real: fill of 6 desktops over 3 hosts vs over 1 host, and the time
from a host cut to the pool back at its free target, as a ratio of one desktop's start.

    sudo .venv/bin/python benchmarks/bench_hosts.py

On the lab of tests/multihost (three libvirtd daemons in network namespaces on this machine,
one over TLS), a real keeper (planner with placement, the multi-host libvirt adapter, HAProxy,
SQLite state) keeps a pool of 6 free desktops (start: boot, tiny guest under TCG):
  1. one desktop: create + start → ready (guest agent up), on host1
  2. fill over 1 host (the pool limited to host1): keeper start → 6 ready behind HAProxy
  3. fill over 3 hosts: the same, spread 2/2/2
  4. host2's link cut: → 6 free desktops ready behind HAProxy on host1 and host3
All hosts share this machine's 2 cores, so spreading does not add CPU here: the fill ratio
shows the keeper's overhead across hosts, not the speed-up separate machines would give.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, HostSpec
from tests.guest import tiny_base_image
from tests.multihost.conftest import registry_checksums
from tests.multihost.keeper_world import keeper_world
from tests.multihost.lab import HostLab

TIMEOUT = 240.0


def one_start(lab: HostLab, base_dir: Path, base: BaseImage) -> float:
    host = lab.hosts[0]
    hosts = [HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts]
    hv = MultiHostHypervisor(hosts, state_dir=base_dir / "one", checksums=registry_checksums)
    spec = CloneSpec(
        name="bench-1",
        pool="bench",
        slot=1,
        base=base,
        mode=CloneMode.LINKED,
        cpus=1,
        memory=128 * 1024**2,
        display=Endpoint(host.address, 5990),
        host=host.name,
    )
    try:
        hv.list_clones()
        hv.ensure_version(host.name, spec.base)
        while not hv.ensure_version(host.name, spec.base):
            time.sleep(0.1)
        started = time.monotonic()
        hv.create_clone(spec)
        hv.start(spec.name)
        while not any(c.name == spec.name and c.ready for c in hv.list_clones()):
            if time.monotonic() - started > TIMEOUT:
                raise SystemExit("one desktop was not ready in time")
            time.sleep(0.1)
        return time.monotonic() - started
    finally:
        hv.delete(spec.name)
        hv.close()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="iphvb-", dir="/tmp"))
    try:
        base = tiny_base_image(root / "tiny-v1", image="tinymh", version=1)
        started = time.monotonic()
        with HostLab(root / "lab", count=3, tls=frozenset({3})) as lab:
            print(f"3-host lab up in {time.monotonic() - started:.1f} s")
            single = one_start(lab, root, base)
            print(f"one desktop create+start → ready: {single:.1f} s")
            fills = {}
            for label, hosts in (("1 host", ("host1",)), ("3 hosts", ())):
                with keeper_world(lab, base, pool_hosts=hosts) as world:
                    fills[label] = world.until("full", lambda w=world: len(w.ready()) == 6)
                    if label == "3 hosts":
                        lab.hosts[1].cut()
                        cut = world.until(
                            "back at its free target",
                            lambda w=world: (
                                len(
                                    {n for n, c in w.mine().items() if c.host != "host2"}
                                    & w.ready()
                                )
                                >= 6
                            ),
                        )
                        lab.hosts[1].mend()
                print(f"fill of 6 over {label}: {fills[label]:.1f} s")
            print(f"fill over 3 hosts / over 1 host: {fills['3 hosts'] / fills['1 host']:.2f}")
            print(
                f"host cut → 6 free ready on the other hosts: {cut:.1f} s "
                f"({cut / single:.1f} x one desktop's start)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
