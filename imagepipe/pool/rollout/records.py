"""What the store remembers of a rollout (`imagepipe rollout`): its intent, its state and
its progress per pool, and the keeper's heartbeat. The keeper executes rollouts
(driver.py); the CLI writes and reads them (control.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from imagepipe.pool.model import PoolSpec, RolloutPolicy


class RolloutState(StrEnum):
    PENDING = "pending"  # written by the CLI; the keeper has not taken it up yet
    WAITING_FOR_BASE = "waiting_for_base"  # the new version's base is not ready to clone
    CANARY = "canary"  # only the canary desktops, until resume or the bake time passed
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    # the new version's desktops failed: the channel goes back to the old version; stays
    # here (the keeper retries the move every pass) until the channel really moved
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"  # the channel was moved back to the old version
    FAILED = "failed"  # could not go on (the channel was moved by someone else)

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


_ACTIVE = frozenset(
    {
        RolloutState.PENDING,
        RolloutState.WAITING_FOR_BASE,
        RolloutState.CANARY,
        RolloutState.IN_PROGRESS,
        RolloutState.PAUSED,
        RolloutState.ROLLING_BACK,
    }
)


@dataclass(frozen=True)
class PoolProgress:
    """One pool of a rollout, as the keeper last saw it."""

    pool: str
    new_ready: int = 0  # free desktops of the new version
    new_booting: int = 0  # being made or booting
    new_in_use: int = 0
    old_free: int = 0  # old desktops still serving until new ones take their place
    old_in_use: int = 0  # old desktops with a session: drained, removed at logoff
    old_leaving: int = 0  # old desktops being removed
    old_at_start: int = 0  # old desktops when the keeper took the rollout up
    failures: int = 0  # consecutive failed creates/boots in the pool
    waiting: str | None = None  # why this pool waits, in words

    @property
    def old_left(self) -> int:
        return self.old_free + self.old_in_use + self.old_leaving

    @property
    def old_removed(self) -> int:
        return max(0, self.old_at_start - self.old_left)


@dataclass(frozen=True)
class Rollout:
    """One rollout: which pools of which image move from which version to which, how."""

    id: int
    image: str
    channel: str  # the channel the rollout moved (pools follow it)
    pools: tuple[str, ...]
    from_version: int
    to_version: int
    state: RolloutState
    created_at: float
    created_by: str = ""
    deadline_at: float | None = None  # None: --drain, nobody is kicked off
    message: str | None = None  # shown inside the desktops before the deadline
    warn_before: tuple[float, ...] = (600.0, 60.0)  # seconds before the deadline
    warned: tuple[float, ...] = ()  # warnings already given
    canary: int | None = None
    bake: float | None = None
    canary_ready_at: float | None = None
    canary_passed: bool = False
    canary_failed: bool = False
    surge: int | None = None  # None: each pool's size.free
    paused: bool = False
    reason: str | None = None  # why it waits, or how it ended
    updated_at: float | None = None
    finished_at: float | None = None
    undo_of: int | None = None  # the rollout this one undoes
    progress: tuple[PoolProgress, ...] = ()

    @property
    def active(self) -> bool:
        return self.state.active

    def pool_progress(self, pool: str) -> PoolProgress | None:
        return next((p for p in self.progress if p.pool == pool), None)

    def policy(self, spec: PoolSpec) -> RolloutPolicy:
        """What the planner needs of this rollout for one of its pools. Rolling back holds
        the pool as it is (no new desktop of the failed version, no old free one goes)
        until the channel moved back."""
        canary = None if self.canary is None or self.canary_passed else self.canary
        return RolloutPolicy(
            rollout=self.id,
            to_version=self.to_version,
            surge=self.surge if self.surge is not None else max(spec.free, 1),
            canary=canary,
            paused=self.paused or self.state is RolloutState.ROLLING_BACK,
            deadline_at=None if self.state is RolloutState.ROLLING_BACK else self.deadline_at,
        )


@dataclass(frozen=True)
class Heartbeat:
    """The running keeper's last pass (written every pass)."""

    at: float
    pid: int
    host: str
    tick: float
    # several hosts: the hosts whose circuit breaker was open when the pass began, until
    # when (the breaker lives in the leading keeper's memory; `imagepipe hosts` reads it here)
    host_breakers: tuple[tuple[str, float], ...] = ()


def breakers_to_json(breakers: tuple[tuple[str, float], ...]) -> str:
    """A heartbeat's open host breakers as stored: a JSON object, host -> until."""
    return json.dumps(dict(breakers), sort_keys=True)


def breakers_from_json(text: str) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((str(h), float(u)) for h, u in json.loads(text).items()))


def rollout_to_json(rollout: Rollout) -> str:
    return json.dumps(asdict(rollout), sort_keys=True)


def rollout_from_json(text: str) -> Rollout:
    """A stored rollout; keys a newer imagepipe added are ignored."""
    data: dict[str, Any] = json.loads(text)
    known = {f.name for f in fields(Rollout)}
    data = {k: v for k, v in data.items() if k in known}
    progress_keys = {f.name for f in fields(PoolProgress)}
    data["progress"] = tuple(
        PoolProgress(**{k: v for k, v in p.items() if k in progress_keys})
        for p in data.get("progress", ())
    )
    data["state"] = RolloutState(data["state"])
    data["pools"] = tuple(data["pools"])
    data["warn_before"] = tuple(data.get("warn_before", ()))
    data["warned"] = tuple(data.get("warned", ()))
    return Rollout(**data)
