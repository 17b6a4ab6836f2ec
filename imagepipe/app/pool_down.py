"""Taking a pool down (`imagepipe pools down`, `imagepipe demo --down`) and keeping it again.

The intent is written to the state store; the keeper carries it out with the take-down rule
(imagepipe/pool/teardown.py): no new desktops, drain, remove the free ones at once and the
others as their sessions end (`now`: at once), remove the balancer entries. `status` shows
how far it got. `drive_down` runs keeper passes itself until nothing is left (the demo,
where no service keeps the pool).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from imagepipe.app.bootstrap import open_store, open_store_readonly
from imagepipe.app.status import PoolStatus
from imagepipe.config import Settings
from imagepipe.errors import OperationFailedError
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import PoolDown


@dataclass(frozen=True)
class DownRequest:
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


def mark_down(settings: Settings, pool: str, *, now: bool, at: float) -> None:
    """Remember in the state store that the pool is to be taken down."""
    store = open_store(settings)
    try:
        store.mark_down(pool, PoolDown(since=at, now=now))
    finally:
        store.close()


def known_pools(settings: Settings) -> list[str]:
    """Pools the state store has records of (configured now or not)."""
    store = open_store_readonly(settings)
    try:
        return store.pools()
    finally:
        store.close()


def mark_up(settings: Settings, pool: str) -> bool:
    """Keep the pool again; False when it was not going down."""
    store = open_store(settings)
    try:
        return store.clear_down(pool)
    finally:
        store.close()


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
