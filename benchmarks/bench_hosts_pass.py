"""A keeper pass over many hosts, on the fakes with a latency per call: 10 hosts x 100
desktops, 30 % in use. Counts the calls one steady pass makes to the hypervisor and the
balancer, and times the pass with 2 ms per call.

    .venv/bin/python benchmarks/bench_hosts_pass.py

Goal (docs/hosts.md): at most one call per host plus one per desktop that has or just had a
client, and ≤ 0.25 s per pass at 2 ms per call. For comparison it also runs the same pool as
one host (no `hosts:`), where every running desktop's session is read one after another.
This kernel has no netem: the latency is a sleep in a wrapper around each port.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fakes live in tests/

from imagepipe.pool.keeper import Keeper, KeeperOptions
from imagepipe.pool.model import HostSpec, PoolSpec
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHosts, FakeHypervisor, FakeImages

HOSTS = 10
PER_HOST = 100
IN_USE = 0.3
LATENCY = 0.002


class Slow:
    """Any port, with `latency` seconds per call and a count of calls by method."""

    def __init__(self, inner: Any, latency: float) -> None:
        self._inner = inner
        self.latency = latency
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target) or name in ("subscribe", "close"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            time.sleep(self.latency)
            return target(*args, **kwargs)

        return call


def run(hosts: int, folder: Path) -> tuple[Counter[str], Counter[str], float, int]:
    total = HOSTS * PER_HOST
    spec = PoolSpec(
        name="big",
        image="tiny",
        initial=total,
        free=int(total * (1 - IN_USE)),
        max=total,
        port_first=10000,
        port_last=10000 + total,
    )
    names = tuple(f"h{i:02d}" for i in range(hosts))
    host_specs = tuple(
        HostSpec(n, f"qemu+tcp://{n}/system", "10.9.0.1", None, None, ()) for n in names
    )
    clock = FakeClock()
    images = FakeImages()
    hv = FakeHosts(clock=clock.now, host_names=names) if hosts > 1 else FakeHypervisor(clock.now)
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    store = SQLiteStore(folder / f"state-{hosts}.db")
    keeper = Keeper(
        hypervisor=hv,
        balancer=lb,
        store=store,
        images=images,
        specs=[spec],
        clock=clock,
        settings=KeeperOptions(tick=5.0),
        hosts=host_specs if hosts > 1 else (),
    )
    for _ in range(4):
        keeper.run_pass()
    users = sorted(hv.clones)[: int(total * IN_USE)]
    for i, name in enumerate(users):
        lb.connect(name)
        hv.connect(name, f"192.0.2.{i % 250}")
    for _ in range(3):
        clock.advance(1)
        keeper.run_pass()
    slow_hv, slow_lb = Slow(hv, LATENCY), Slow(lb, LATENCY)
    keeper.hypervisor, keeper.balancer = slow_hv, slow_lb  # type: ignore[assignment]
    clock.advance(1)
    start = time.perf_counter()
    report = keeper.run_pass()
    seconds = time.perf_counter() - start
    store.close()
    return slow_hv.calls, slow_lb.calls, seconds, len(report.actions)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for hosts, label in ((HOSTS, f"{HOSTS} hosts"), (1, "1 host (no hosts:)")):
            hv_calls, lb_calls, seconds, actions = run(hosts, Path(tmp))
            calls = sum(hv_calls.values()) + sum(lb_calls.values())
            goal = HOSTS + int(HOSTS * PER_HOST * IN_USE)
            print(
                f"{label:>20}: {HOSTS * PER_HOST} desktops, {calls} calls per steady pass "
                f"(goal ≤ {goal}), {seconds:.3f} s at {LATENCY * 1000:.0f} ms per call, "
                f"{actions} actions"
            )
            print(f"{'':>22}hypervisor {dict(hv_calls)}, balancer {dict(lb_calls)}")


if __name__ == "__main__":
    main()
