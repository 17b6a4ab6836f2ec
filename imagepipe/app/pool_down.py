"""Taking a pool down (`imagepipe pools down`, `imagepipe demo --down`) and keeping it again.

The intent is written to the state store; the keeper carries it out with the take-down rule
(imagepipe/pool/teardown.py): no new desktops, drain, remove the free ones at once and the
others as their sessions end (`now`: at once), remove the balancer entries. `status` shows
how far it got. `drive_down` runs keeper passes itself until nothing is left (the demo,
where no service keeps the pool).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from imagepipe.app.bootstrap import Runtime
from imagepipe.app.status import PoolStatus
from imagepipe.errors import OperationFailedError
from imagepipe.pool.model import PoolDown
from imagepipe.record import Record

if TYPE_CHECKING:
    from imagepipe.pool.keeper import Keeper


class DownRequest(Record, kw_only=False):
    pool: str
    now: bool
    free: int  # desktops removed at once
    in_use: int  # desktops with a session: removed when it ends (or at once with `now`)
    users: tuple[str, ...]  # who is on them (for the --now warning)


def request_down(pool: PoolStatus, now: bool) -> DownRequest:
    in_use = [c for c in pool.clones if c.client is not None or c.users]
    users = tuple(sorted({u for c in in_use for u in c.users} | {c.client or "" for c in in_use}))
    return DownRequest(
        pool=pool.name,
        now=now,
        free=pool.total - len(in_use),
        in_use=len(in_use),
        users=tuple(u for u in users if u),
    )


def mark_down(runtime: Runtime, pool: str, *, now: bool, at: float) -> None:
    """Remember in the state store that the pool is to be taken down."""
    runtime.store.mark_down(pool, PoolDown(since=at, now=now))


def known_pools(runtime: Runtime) -> list[str]:
    """Pools the state store has records of (configured now or not)."""
    return runtime.store_reader.pools()


def mark_up(runtime: Runtime, pool: str) -> bool:
    """Keep the pool again; False when it was not going down."""
    return runtime.store.clear_down(pool)


def progress(pool: PoolStatus) -> str | None:
    """One line on how far taking the pool down got, or None when the pool is kept."""
    if pool.going_down is None:
        return None
    entries = sum(1 for c in pool.clones if c.balancer is not None)
    if pool.total == 0 and entries == 0:
        return (
            f"{pool.name} is down: no desktop and no balancer entry left; remove its pool file, "
            f"or `imagepipe pools up {pool.name}` to keep it again"
        )
    waiting = sum(1 for c in pool.clones if c.power is not None and (c.client or c.users))
    text = f"{pool.name} going down ({pool.going_down}): {pool.total} desktop(s) left"
    if waiting:
        text += f", {waiting} waiting for their session to end"
    return text + f", {entries} balancer entr{'y' if entries == 1 else 'ies'}"


def drive_down(keeper: Keeper, pool: str, *, timeout: float, poll: float = 0.5) -> int:
    """Run keeper passes until the pool has no desktop and no balancer entry; returns how
    many passes it took. OperationFailedError when it is not down after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    passes = 0
    while True:
        report = keeper.run_pass()
        passes += 1
        observed = report.observation.pools.get(pool)
        # a desktop's balancer entry outlives it as an orphan backend until removed
        left = 1 if observed is None else len(observed.clones) + len(observed.orphan_backends)
        if left == 0 and not report.actions:
            return passes
        if time.monotonic() > deadline:
            raise OperationFailedError(
                f"pool {pool} still has {len(observed.clones) if observed else '?'} desktop(s) "
                f"after {timeout:.0f}s; see `imagepipe status {pool}`"
            )
        if not report.actions:
            time.sleep(poll)
