"""When the planner could next answer differently without any new observation."""

from __future__ import annotations

from imagepipe.pool.model import CloneRecord, CloneState, PoolRecord, PoolSpec
from imagepipe.pool.planner.forecast import learning, next_bucket, shrink_after

# Enum members named once: Python 3.11 reads `CloneState.FREE` through the slow path of
# EnumType.__getattr__ (some 15 times a module name's cost), and these are read per clone,
# per pass.
RECYCLING, STOPPED, DISCONNECTED = CloneState.RECYCLING, CloneState.STOPPED, CloneState.DISCONNECTED
FREE, FAILED = CloneState.FREE, CloneState.FAILED
UNDER_WAY = (CloneState.CREATING, CloneState.BOOTING, CloneState.DELETING)  # boot_timeout


def next_timer(spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
    """The next moment after `now` at which plan() could answer differently without any new
    observation (a recycle, disconnect, shrink, boot or retry timer, the breaker, the drain
    deadline, a schedule minute, a learned bucket). The keeper may sleep until then or until
    an event."""
    idle_for = shrink_after(spec, record.arrivals)
    clones = (clone_timer(spec, rec, idle_for) for rec in record.clones.values())
    return soonest(now, *clones, *pool_timers(spec, record, now))


def clone_timer(spec: PoolSpec, rec: CloneRecord, idle_for: float) -> float | None:
    """When this clone's record could next move on its own (`idle_for`: shrink_after)."""
    state = rec.state
    if state is RECYCLING:
        ended = rec.session_ended_at if rec.session_ended_at is not None else rec.since
        return ended + spec.recycle_after
    if state is STOPPED:
        return rec.since + spec.recycle_after
    if state is DISCONNECTED:
        return rec.since + spec.disconnect_timeout
    if state is FREE:
        return rec.since + idle_for
    if state in UNDER_WAY:
        return rec.since + spec.boot_timeout
    if state is FAILED:
        return rec.retry_at
    return None


def pool_timers(spec: PoolSpec, record: PoolRecord, now: float) -> list[float | None]:
    """The pool's own timers: the breaker, the drain deadlines, the schedule's next minute,
    the next learned bucket."""
    timers = [record.breaker_open_until]
    if spec.drain_deadline is not None and record.rollout_started_at is not None:
        timers.append(record.rollout_started_at + spec.drain_deadline)
    if record.rollout is not None:
        timers.append(record.rollout.deadline_at)
    if spec.schedule:
        timers.append(now - now % 60.0 + 60.0)
    if record.arrivals is not None and learning(spec, record.arrivals):
        timers.append(next_bucket(record.arrivals, now))
    return timers


def soonest(now: float, *timers: float | None) -> float | None:
    """The earliest of `timers` after `now` (None: none is)."""
    return min((at for at in timers if at is not None and at > now), default=None)
