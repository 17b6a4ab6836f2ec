"""Failover of the standby keeper on real components: two `imagepipe keep` processes on one
PostgreSQL state (started here, as the tests start it), one pool of tiny libvirt/QEMU desktops
behind a real HAProxy.

Each run: the pool is at its free target with one keeper leading; the leader is killed -9 and
at once a user connects a VNC viewer through HAProxy, taking one of the free desktops, so the
pool is below its free target until a keeper makes another. Measured from the kill:

- first pass: until the standby's log says it takes over (its first pass as leader begins);
- free target: until `imagepipe status` shows the free target of ready free desktops again.

Then the user leaves, the killed keeper starts again (now the standby) and the pool settles
before the next run. Prints each run, then the median and the worst.

    python benchmarks/bench_failover.py [--runs 5] [--lease 10s --loop 3s --retry 3s]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time

from _host import say, stop_on_signals  # puts the repository root on sys.path

from tests.e2e.harness import Installation, PoolFile, desktop_of, serving, temp_root, viewer
from tests.e2e.standby import Pair, state_settings
from tests.postgres import PostgresServer

POOL = PoolFile("bfo", free=2, max=4, ports=(6491, 6499))
TAKING_OVER = "taking over: observing the host and the journal first"


def free_besides(host: Installation, taken: str) -> bool:
    """The free target of desktops a new user can get, not counting the one taken."""
    pool = host.status()
    free = [c for c in serving(pool) if c["state"] == "free" and c["name"] != taken]
    return len(free) >= host.pool.free


def one_run(pair: Pair) -> tuple[float, float]:
    """Kill the leader, take a desktop; seconds until the standby's first pass and until
    the free target is met again. Then the pool settles with both keepers running."""
    host = pair.host
    leader = pair.wait_leader()
    standby = pair.standby(leader)
    time.sleep(3)  # the standby has tried the lease at least once
    said = standby.output().count(TAKING_OVER)
    killed = time.monotonic()
    leader.send(signal.SIGKILL)
    assert leader.process is not None
    leader.process.wait(timeout=30)
    leader.process = None
    user = viewer(host)
    taken = desktop_of(user)  # the handshake: HAProxy counts the connection
    host.wait_until("the standby's first pass", lambda: standby.output().count(TAKING_OVER) > said)
    took_over = time.monotonic() - killed
    host.wait_until("the free target again", lambda: free_besides(host, taken), timeout=600)
    back = time.monotonic() - killed
    user.close()
    leader.start()
    host.wait_until("the pool settled", pair.at_free_target, timeout=600)
    time.sleep(2)
    return took_over, back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lease", default="10s")
    parser.add_argument("--loop", default="3s")
    parser.add_argument("--retry", default="3s")
    args = parser.parse_args()
    stop_on_signals()
    lease = f"lease: {args.lease}, lease_loop: {args.loop}, lease_retry: {args.retry}"
    server = PostgresServer.start(durable=True)
    host = Installation(temp_root("ipe-bfo-"), POOL)
    pair = Pair(host, server, state_settings(host, server, lease))
    first: list[float] = []
    target: list[float] = []
    try:
        host.cli("build", "tiny")
        pair.keepers["a"].start()
        pair.wait_leader()
        pair.keepers["b"].start()
        host.wait_until("the pool at its free target", pair.at_free_target, timeout=600)
        say(f"keeper.{lease}; pool free {POOL.free}, max {POOL.max}")
        for run in range(1, args.runs + 1):
            took_over, back = one_run(pair)
            first.append(took_over)
            target.append(back)
            say(f"run {run}: first pass {took_over:.1f} s, free target {back:.1f} s")
        say(
            f"leader killed -> standby's first pass: median {statistics.median(first):.1f} s, "
            f"worst {max(first):.1f} s"
        )
        say(
            f"leader killed -> pool back at its free target: median "
            f"{statistics.median(target):.1f} s, worst {max(target):.1f} s"
        )
    finally:
        for keeper in pair.keepers.values():
            keeper.stop()
        host.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
