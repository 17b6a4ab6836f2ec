"""What the per-clone rules share: the pass's context, a clone's step, record transitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypedDict, Unpack

from imagepipe.pool.model import (
    Arrivals,
    CloneInfo,
    CloneRecord,
    CloneState,
    ObservedClone,
    OnLogoff,
    PoolSpec,
    RolloutPolicy,
)
from imagepipe.pool.planner.placement import Placer
from imagepipe.pool.planner.schedule import free_target
from imagepipe.record import replace

if TYPE_CHECKING:  # a Step carries actions; the context and records (status) need none
    from imagepipe.pool.actions import Action

_KEEP = OnLogoff.KEEP  # read per clone: named once (a member read through its Enum class is slow)


@dataclass(frozen=True, slots=True)  # built on every pass: slots make that a third cheaper
class Context:
    """What every rule of one pass may read."""

    spec: PoolSpec
    now: float
    target: int | None  # the version the pool runs; None = not known yet
    assigned: frozenset[int]  # reserved slots (persistent, never shared)
    breaker_open: bool
    rollout_started: float | None  # when clones of another version began retiring
    drain_deadline_passed: bool
    in_flight: frozenset[str] = frozenset()  # clones with a call still running
    touched: frozenset[str] = frozenset()  # clones a client connected to since the last pass
    rollout: RolloutPolicy | None = None  # an active rollout onto the target version
    arrivals: Arrivals | None = None  # logins expected by time of week (learned warm-up)
    placer: Placer | None = None  # where new desktops go (None: the only host)
    lost_hosts: frozenset[str] = frozenset()  # hosts the hypervisor cannot reach now
    draining_hosts: frozenset[str] = frozenset()  # no new desktops; free ones replaced
    known_free_target: int | None = None  # free_target(spec, now, arrivals), when known

    def lost(self, rec: CloneRecord | None) -> bool:
        """The clone's host is lost: it may still exist there, in use."""
        return rec is not None and rec.host in self.lost_hosts

    def draining(self, info: CloneInfo) -> bool:
        return info.host in self.draining_hosts

    @property
    def free_target(self) -> int:
        """The free ready desktops the pool wants this pass (schedule and learned warm-up):
        the one number resize keeps and an active rollout's pacing never goes below. Read
        once a pass (twice with an active rollout), so not cached: a cached_property takes
        a lock on its first read, which cost more than the pure function it saved."""
        if self.known_free_target is not None:
            return self.known_free_target
        return free_target(self.spec, self.now, self.arrivals)

    def persistent(self, slot: int) -> bool:
        """Logoff leaves this desktop as its user left it (no reset, no balancer rules)."""
        return self.spec.on_logoff is _KEEP or slot in self.assigned

    def old(self, info: CloneInfo) -> bool:
        """A clone of another version than the target (a rollout retires it)."""
        return self.target is not None and info.version != self.target


class Step(NamedTuple):
    """One clone's decision in one pass."""

    record: CloneRecord | None  # the next record; None = forget the clone
    actions: tuple[Action, ...] = ()  # hypervisor actions, in the order they run
    failed: bool = False  # a failure seen this pass (counts against the pool)
    came_up: bool = False  # a new or reset clone became ready (clears the pool's count)


class Also(TypedDict, total=False):
    """More of a clone's record that changes as it moves to a state (`ended`, `used`,
    `healthy`): handed to `enter`, so that the move builds one record, not one per change."""

    session_ended_at: float | None
    last_user: str | None
    dirty: bool
    failures: int
    retry_at: float | None


def enter(
    ctx: Context,
    rec: CloneRecord | None,
    info: CloneInfo,
    state: CloneState,
    **also: Unpack[Also],
) -> CloneRecord:
    """The record after moving to `state`, with the changes `also` holds; `since` only moves
    when the state changes. A clone the store has no record of has unknown history: its new
    record is dirty."""
    if rec is None:
        fresh: Also = {"dirty": True, **also}
        return CloneRecord(
            name=info.name,
            slot=info.slot,
            version=info.version,
            state=state,
            since=ctx.now,
            host=info.host,
            **fresh,
        )
    if (
        rec.state is state
        and rec.slot == info.slot
        and rec.version == info.version
        and rec.host == info.host
        and all(getattr(rec, name) == value for name, value in also.items())
    ):
        return rec
    since = rec.since if rec.state is state else ctx.now
    return replace(
        rec,
        slot=info.slot,
        version=info.version,
        state=state,
        since=since,
        host=info.host,
        **also,
    )


def moved(ctx: Context, rec: CloneRecord, state: CloneState) -> CloneRecord:
    """A remembered clone's record moved to `state` (same slot and version)."""
    if rec.state is state:
        return rec
    return replace(rec, state=state, since=ctx.now)


def ended(at: float | None) -> Also:
    """The session ended at `at` (None: no session to account for)."""
    return {"session_ended_at": at}


def used(rec: CloneRecord | None, last_user: str | None = None) -> Also:
    """Somebody is on the clone: it must be reset before anyone else gets it."""
    user = last_user if last_user is not None or rec is None else rec.last_user
    return {"session_ended_at": None, "last_user": user, "dirty": True}


def remembered(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> CloneRecord | None:
    """The stored record, dirty if somebody connected to the clone since the last pass: a
    client's connection event (ctx.touched), or the balancer's session counter past the
    value the record accounted for (a session while no keeper watched). The record takes
    the counter's new value in the same write as the dirty mark."""
    if rec is None:
        return None
    total = oc.backend.sessions_total if oc.backend is not None else None
    dirty = rec.dirty or oc.name in ctx.touched or connected_since(rec.sessions_seen, total)
    seen = rec.sessions_seen if total is None else total
    if dirty == rec.dirty and seen == rec.sessions_seen and rec.lost_since is None:
        return rec
    # seen again after its host was lost: tracked as any other clone from now on
    return replace(rec, dirty=dirty, sessions_seen=seen, lost_since=None)


def connected_since(seen: int | None, total: int | None) -> bool:
    """Whether the balancer passed a connection to the backend since the record accounted
    for `seen` of them. A count below `seen` started over (the backend was removed and added
    again, the balancer restarted): any connection since counts, as Prometheus' increase()
    reads a counter reset. No evidence when the balancer cannot tell (`total` None) or the
    record has no baseline yet (`seen` None: it takes `total` as its baseline)."""
    if seen is None or total is None:
        return False
    if total < seen:
        return total > 0
    return total > seen


def healthy() -> Also:
    """No session to account for, no failure, no retry pending."""
    return {"session_ended_at": None, "failures": 0, "retry_at": None}
