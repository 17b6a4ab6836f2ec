"""The rollout use cases (`imagepipe rollout …`) on the configured adapters. What a rollout
is and does lives in the core (imagepipe/pool/rollout/): control.py writes and reads it,
driver.py is the keeper's side; this module only opens what they need."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Sequence

from imagepipe.app.bootstrap import Runtime
from imagepipe.app.keeping import select_pools
from imagepipe.app.status import load_records
from imagepipe.errors import EnvironmentMissingError
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.observe import observe
from imagepipe.pool.rollout.control import PoolPlan, Request, RolloutControl, Started, choose, plans


def open_rollouts(runtime: Runtime) -> RolloutControl:
    """The runtime's state store (read-write), registry, channels and clock."""
    channels = runtime.channels
    if channels is None:
        raise EnvironmentMissingError("the image registry cannot move channels")
    return RolloutControl(runtime.store, runtime.images, channels, runtime.clock)


def start(
    control: RolloutControl, specs: Sequence[PoolSpec], request: Request, *, by: str
) -> Started:
    named = select_pools(specs, request.pools) if request.pools else []
    return control.start(specs, named, request, by=by)


def dry_run(
    control: RolloutControl, runtime: Runtime, specs: Sequence[PoolSpec], request: Request
) -> list[PoolPlan]:
    """What the rollout would do, from one live observation; changes nothing (give a runtime
    with `manage_balancer=False`: the balancer is only read, never started or reloaded)."""
    named = select_pools(specs, request.pools) if request.pools else []
    chosen, _channel = choose(specs, request.image, named)
    to = control.target(request)
    host = observe(runtime.hypervisor, runtime.balancer, control.images, chosen)
    now = control.clock.now()
    records, _downs = load_records(control.store, chosen, now)
    return plans(chosen, host.pools, records, to, request, now)


def who() -> str:
    """Who starts a rollout, for the registry's history: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"
