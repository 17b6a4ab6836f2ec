"""Failover time of a balancer pair: keepalived moving the users' address between two HAProxy.

    python benchmarks/bench_balancer_failover.py [--rounds 6]

One pair as in tests/e2e/test_balancer_failover.py (tests/balancer_pair.py): two network
namespaces with an HAProxy and keepalived each, running examples/keepalived with its timings
(a check every second, two failures to give the address up, adverts every second), the keeper
keeping both HAProxy in step over two real tiny libvirt desktops. Each round kills the HAProxy
holding the address and measures, from the kill: the address on the other machine, and the
first VNC handshake through the address. Then the killed HAProxy is started again, the keeper
puts it back in step, and once its check passes again it is the standby of the next round
(the address stays where it is: nopreempt), so rounds alternate between the machines.

It prints each round and the median and worst of both figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagepipe.pool.model import BackendState
from tests.balancer_pair import balancer_pair, kill_and_reach

RISE = 4.0  # seconds for a restarted HAProxy's check to pass twice (rise 2, interval 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with balancer_pair() as world:
        keeper = world.runtime.keeper([world.spec])
        deadline = time.monotonic() + 300
        while True:
            keeper.run_pass()
            ready = [
                b for b in world.runtime.balancer.list_backends() if b.state is BackendState.READY
            ]
            if len(ready) >= 2:
                break
            if time.monotonic() > deadline:
                print("the desktops did not get ready in 300 s", file=sys.stderr)
                return 1
            time.sleep(1.0)
        active, standby = world.nodes
        moved, reached = [], []
        for round_ in range(1, args.rounds + 1):
            failover = kill_and_reach(world, active, standby)
            moved.append(failover.address_moved)
            reached.append(failover.first_handshake)
            print(
                f"round {round_}: {active.name} killed; address on {standby.name} after "
                f"{failover.address_moved:.2f} s, first VNC handshake after "
                f"{failover.first_handshake:.2f} s ({failover.desktop})",
                flush=True,
            )
            active.adapter(manage=True).ensure_frontend()  # its HAProxy again, empty
            keeper.run_pass()  # the keeper puts it back in step
            time.sleep(RISE)
            active, standby = standby, active
        keeper.stop()
    print(
        f"address moved: median {statistics.median(moved):.2f} s, worst {max(moved):.2f} s; "
        f"first VNC handshake: median {statistics.median(reached):.2f} s, worst "
        f"{max(reached):.2f} s ({args.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
