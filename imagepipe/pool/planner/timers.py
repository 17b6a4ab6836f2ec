"""When the planner could next answer differently without any new observation."""

from __future__ import annotations

from imagepipe.pool.model import CloneState, PoolRecord, PoolSpec
from imagepipe.pool.planner.forecast import learning, next_bucket, shrink_after


def next_timer(spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
    """The next moment after `now` at which plan() could answer differently without any new
    observation (a recycle, disconnect, shrink, boot or retry timer, the breaker, the drain
    deadline, a schedule minute, a learned bucket). The keeper may sleep until then or until
    an event."""
    soonest: float | None = None
    idle_for = shrink_after(spec, record.arrivals)

    def consider(at: float | None) -> None:
        nonlocal soonest
        if at is not None and at > now and (soonest is None or at < soonest):
            soonest = at

    for rec in record.clones.values():
        state = rec.state
        if state is CloneState.RECYCLING:
            ended = rec.session_ended_at if rec.session_ended_at is not None else rec.since
            consider(ended + spec.recycle_after)
        elif state is CloneState.STOPPED:
            consider(rec.since + spec.recycle_after)
        elif state is CloneState.DISCONNECTED:
            consider(rec.since + spec.disconnect_timeout)
        elif state is CloneState.FREE:
            consider(rec.since + idle_for)
        elif state in (CloneState.CREATING, CloneState.BOOTING, CloneState.DELETING):
            consider(rec.since + spec.boot_timeout)
        elif state is CloneState.FAILED:
            consider(rec.retry_at)
    consider(record.breaker_open_until)
    if spec.drain_deadline is not None and record.rollout_started_at is not None:
        consider(record.rollout_started_at + spec.drain_deadline)
    if record.rollout is not None:
        consider(record.rollout.deadline_at)
    if spec.schedule:
        consider(now - now % 60.0 + 60.0)
    if record.arrivals is not None and learning(spec, record.arrivals):
        consider(next_bucket(record.arrivals, now))
    return soonest
