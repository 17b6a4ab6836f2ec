"""The rules for one clone: its next record and what to do to it, from what the host shows
(power, readiness, session, version) and what the store remembers (state, timers, dirty).

Read top to bottom, they are the "Rules" of docs/pools.md for a single clone:
a quiet clone stays as it is; a clone with a live session is in use (or retiring, or
disconnected) and marked dirty; otherwise its session just ended, it failed, it is of an
old version, it crashed, it is recycling, suspended, powered off, ready, or booting.
"""

from __future__ import annotations

from imagepipe.pool.actions import DeleteClone, ResetClone, StartClone
from imagepipe.pool.model import (
    BackendState,
    CloneRecord,
    CloneState,
    ObservedClone,
    OnLogoff,
    Power,
)
from imagepipe.pool.planner.failures import gave_up, record_failure
from imagepipe.pool.planner.sessions import session_live, session_unread
from imagepipe.pool.planner.steps import Context, Step, ended, enter, healthy, used
from imagepipe.pool.rollout.rules import holds
from imagepipe.record import replace

# Enum members named once: Python 3.11 reads `CloneState.FREE` through the slow path of
# EnumType.__getattr__ (some 15 times a module name's cost), and these are read per clone,
# per pass.
CREATING = CloneState.CREATING
BOOTING = CloneState.BOOTING
FREE = CloneState.FREE
IN_USE = CloneState.IN_USE
DISCONNECTED = CloneState.DISCONNECTED
RECYCLING = CloneState.RECYCLING
SUSPENDED = CloneState.SUSPENDED
RETIRING = CloneState.RETIRING
DELETING = CloneState.DELETING
FAILED = CloneState.FAILED
STOPPED = CloneState.STOPPED
COMING = (CREATING, BOOTING)
WITH_SESSION = (IN_USE, DISCONNECTED, RETIRING)
RUNNING, SHUTOFF, CRASHED = Power.RUNNING, Power.SHUTOFF, Power.CRASHED
POWER_SUSPENDED = Power.SUSPENDED
BACKEND_READY = BackendState.READY
BOOT_RETRIES = 3  # starts of a clone found powered off again before it counts as failed


def quiet(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> bool:
    """Most clones of a busy pool: nothing about them changes this pass, and the balancer
    already has them as it should. In use by the same user (out of the balancer); free,
    clean, healthy, ready and serving; or suspended (out of the balancer). The rules give
    the same answer; this is the one place that recognises them cheaply."""
    if rec is None:
        return False
    info, session, state, backend = oc.info, oc.session, rec.state, oc.backend
    if rec.slot != info.slot or rec.version != info.version or ctx.old(info):
        return False
    if ctx.draining_hosts and ctx.draining(info):
        return False
    serving = backend is not None and backend.state is BACKEND_READY
    if state is IN_USE:
        users = session.users
        return (
            session.client is not None
            and not serving
            and rec.dirty
            and rec.session_ended_at is None
            and (not users or users[0] == rec.last_user)
        )
    if session.client is not None or session.users:
        return False
    if state is FREE:
        return (
            serving
            and info.power is RUNNING
            and info.ready is True
            and info.slot not in ctx.assigned
            and not rec.dirty
            and rec.session_ended_at is None
            and rec.failures == 0
            and rec.retry_at is None
        )
    return state is SUSPENDED and info.power is POWER_SUSPENDED and not serving


def advance(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    """The next record of an observed clone, and what to do to it."""
    if session_live(ctx.spec, oc.session, rec, ctx.now):
        return _with_session(ctx, oc, rec)
    if rec is not None and session_unread(ctx.spec, oc.session, rec, ctx.now):
        return Step(rec)  # its user may still be logged in: decided when the guest answers
    return _without_session(ctx, oc, rec)


def _with_session(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    """Somebody is on it: never reset, deleted or handed to anyone else; marked dirty."""
    info, session = oc.info, oc.session
    if ctx.old(info) or (rec is not None and rec.state is RETIRING):
        if ctx.drain_deadline_passed:
            return _delete(ctx, rec, oc)
        return Step(enter(ctx, rec, info, RETIRING, **used(rec)))
    if session.client is None:
        return Step(enter(ctx, rec, info, DISCONNECTED, **used(rec)))
    user = session.users[0] if session.users else None
    return Step(enter(ctx, rec, info, IN_USE, **used(rec, user)))


def _without_session(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    spec, now, info = ctx.spec, ctx.now, oc.info
    old = ctx.old(info)
    if rec is None:
        if not old and not ctx.persistent(info.slot):
            return _reset(ctx, rec, oc)  # unknown history, nobody on it: clean it first
        return _unremembered(ctx, oc)
    if rec.state is DELETING:
        if info.name in ctx.in_flight:
            return Step(rec)
        # the delete never ran (a crash, a stop): issue it again
        return Step(replace(rec, since=now), (DeleteClone(pool=spec.name, clone=info.name),))
    if rec.state in WITH_SESSION:  # the session just ended
        if old or rec.state is RETIRING:
            return _delete(ctx, rec, oc)
        at = now
        if rec.state is DISCONNECTED:  # logged off or timed out: whichever came first
            at = min(now, rec.since + spec.disconnect_timeout)
        rec = enter(ctx, rec, info, RECYCLING, **ended(at))
    if rec.state is FAILED:
        return _failed(ctx, oc, rec)
    if old:
        if holds(ctx, oc, rec):  # keeps serving until a new desktop can take its place
            return Step(rec)
        return _delete(ctx, rec, oc)
    if info.power is CRASHED:
        return Step(record_failure(spec, rec, now), failed=True)
    if rec.state is RECYCLING:
        return _recycle(ctx, oc, rec)
    return _by_power(ctx, oc, rec)


def _unremembered(ctx: Context, oc: ObservedClone) -> Step:
    """A clone without a record that is not reset at once: an old version's (deleted) or a
    persistent desktop (kept as it is)."""
    if ctx.old(oc.info):
        return _delete(ctx, None, oc)
    if oc.info.power is CRASHED:
        return Step(
            record_failure(ctx.spec, enter(ctx, None, oc.info, FAILED), ctx.now), failed=True
        )
    return _by_power(ctx, oc, None)


def _by_power(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    power = oc.info.power
    if power is POWER_SUSPENDED:
        return Step(enter(ctx, rec, oc.info, SUSPENDED))
    if power is SHUTOFF:
        return _powered_off(ctx, oc, rec)
    if power is RUNNING and oc.info.ready is None:
        return _unread(ctx, oc, rec)
    if power is RUNNING and oc.info.ready:
        return _ready(ctx, oc, rec)
    return _booting(ctx, oc, rec)


def _unread(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    """Running, readiness unknown (its read did not answer in time): nothing is decided on
    a read that did not answer. The record stays as it was: not failed, reset or taken out of
    the balancer; resize does not count it free (the pool keeps its free target without it)."""
    if rec is None:
        return Step(enter(ctx, rec, oc.info, BOOTING))
    return Step(rec)


def _failed(ctx: Context, oc: ObservedClone, rec: CloneRecord) -> Step:
    """Retried (reset) when its backoff is over and the breaker is closed; replaced once it
    spent its retry budget, or when it is of an old version."""
    if gave_up(rec) or ctx.old(oc.info):
        return _delete(ctx, rec, oc)
    if (rec.retry_at is not None and ctx.now < rec.retry_at) or ctx.breaker_open:
        return Step(rec)
    nxt = replace(enter(ctx, rec, oc.info, BOOTING), retry_at=None)
    return Step(nxt, (ResetClone(pool=ctx.spec.name, clone=oc.info.name),))


def _ready(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    """Running and ready: free, unless somebody was on it since its last reset."""
    if rec is not None and rec.dirty and not ctx.persistent(oc.info.slot):
        if oc.info.name in ctx.in_flight:
            return Step(rec)  # its reset is on its way
        if oc.backend is not None and oc.backend.connections > 0:
            # a client connected through the balancer that the hypervisor does not report
            # yet (a VRDE client shows once its handshake is done): not reset under it;
            # dirty, so it serves nobody else
            return Step(rec)
        return _reset(ctx, rec, oc)  # never free before its reset completed
    if ctx.draining(oc.info) and not ctx.persistent(oc.info.slot):
        return _delete(ctx, rec, oc)  # its host is drained: replaced on another host
    came_up = rec is None or rec.state in COMING
    return Step(enter(ctx, rec, oc.info, FREE, **healthy()), came_up=came_up)


def _booting(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    """Running, not ready yet: failed after boot_timeout."""
    spec, now = ctx.spec, ctx.now
    since = rec.since if rec is not None and rec.state in COMING else now
    booting = enter(ctx, rec, oc.info, BOOTING)
    if now - since >= spec.boot_timeout:
        return Step(record_failure(spec, booting, now), failed=True)
    return Step(booting)


def _powered_off(ctx: Context, oc: ObservedClone, rec: CloneRecord | None) -> Step:
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    state = rec.state if rec is not None else None
    if state is CREATING:  # made, not started yet
        return Step(enter(ctx, rec, info, BOOTING), (StartClone(pool=pool, clone=name),))
    if state is BOOTING and rec is not None:
        return _start_again(ctx, oc, rec)
    if ctx.persistent(info.slot):
        stopped = enter(ctx, rec, info, STOPPED)
        if now - stopped.since >= spec.recycle_after:
            start = StartClone(pool=pool, clone=name)
            return Step(enter(ctx, rec, info, BOOTING), (start,))
        return Step(stopped)
    return _recycle(ctx, oc, enter(ctx, rec, info, RECYCLING, **ended(now)))


def _start_again(ctx: Context, oc: ObservedClone, rec: CloneRecord) -> Step:
    """Booting, yet powered off: the start or reset never reached the hypervisor (a crash,
    a stop) or the guest powered itself off at once. Unless it is still running, do it
    again now (a reset when dirty), a bounded number of times."""
    spec, name = ctx.spec, oc.info.name
    if name in ctx.in_flight:
        return Step(rec)
    if rec.failures + 1 >= BOOT_RETRIES:
        return Step(record_failure(spec, rec, ctx.now), failed=True)
    again = (
        ResetClone(pool=spec.name, clone=name)
        if rec.dirty
        else StartClone(pool=spec.name, clone=name)
    )
    return Step(replace(rec, since=ctx.now, failures=rec.failures + 1), (again,))


def _recycle(ctx: Context, oc: ObservedClone, rec: CloneRecord) -> Step:
    """A clone whose user logged off (or that powered off) waits recycle_after, then:
    reset (clean state), delete, or, for a persistent desktop, back to free (started again
    if it is powered off)."""
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    at = rec.session_ended_at if rec.session_ended_at is not None else rec.since
    if now - at < spec.recycle_after:
        return Step(rec)
    if ctx.persistent(info.slot):
        if info.power is SHUTOFF:
            return Step(enter(ctx, rec, info, BOOTING), (StartClone(pool=pool, clone=name),))
        if info.power is RUNNING and info.ready is None:
            return Step(rec)  # ready or not is unread: decided when the read answers
        ready = info.power is RUNNING and info.ready is True
        return Step(enter(ctx, rec, info, FREE if ready else BOOTING, **ended(None)))
    if spec.on_logoff is OnLogoff.DELETE or ctx.draining(info):
        return _delete(ctx, rec, oc)
    return _reset(ctx, rec, oc)


def _reset(ctx: Context, rec: CloneRecord | None, oc: ObservedClone) -> Step:
    """Reset now; the record stays dirty until the executor reports the reset done."""
    nxt = enter(ctx, rec, oc.info, BOOTING, **ended(None))
    return Step(nxt, (ResetClone(pool=ctx.spec.name, clone=oc.info.name),))


def _delete(ctx: Context, rec: CloneRecord | None, oc: ObservedClone) -> Step:
    delete = DeleteClone(pool=ctx.spec.name, clone=oc.info.name)
    return Step(enter(ctx, rec, oc.info, DELETING), (delete,))


def advance_missing(ctx: Context, rec: CloneRecord) -> Step:
    """A remembered clone the hypervisor does not have (any more, or not yet)."""
    if rec.state is CREATING:
        if rec.name not in ctx.in_flight:
            return Step(None)  # the create never ran (a crash): the pool makes it again
        if ctx.now - rec.since < ctx.spec.boot_timeout:
            return Step(rec)  # the create is in flight: never issue it twice
        return Step(record_failure(ctx.spec, rec, ctx.now), failed=True)
    if rec.state is FAILED and rec.retry_at is not None:
        return Step(rec)  # a failed create waiting for its retry (resize)
    return Step(None)
