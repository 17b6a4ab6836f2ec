"""The pool planner: what to do about the difference between wanted and observed.

    plan(spec, observed, record, now) -> list[Action]

Pure: no I/O, no clock, no randomness. Every rule of a pool lives here; docs/pool-lifecycle.md
describes them in words and draws the state diagram. One pass is linear in the number of
clones: each clone is advanced once (`_advance`), then the pool as a whole grows, resumes or
shrinks (`_resize`), then balancer actions follow from each clone's new state.

Actions for one clone are listed in the order they must run (take it out of the balancer,
act on the hypervisor, put it in the balancer, remember the new record).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from imagepipe.errors import BadInputError
from imagepipe.pool.model import (
    Action,
    BackendState,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CloneRecord,
    CloneState,
    CreateClone,
    DeleteClone,
    Endpoint,
    ForgetClone,
    GuestSession,
    Observed,
    ObservedClone,
    OnLogoff,
    PoolRecord,
    PoolSpec,
    Power,
    RecordClone,
    RecordPool,
    ResetClone,
    ResumeClone,
    Standby,
    StartClone,
    SuspendClone,
)

CLONE_RETRIES = 3  # failed attempts on one clone before it is deleted and replaced

_SESSION_STATES = (CloneState.IN_USE, CloneState.DISCONNECTED, CloneState.RETIRING)
_COMING_STATES = (CloneState.CREATING, CloneState.BOOTING)


# --------------------------------------------------------------------------------------
# Small pure helpers (also used by the executor, the keeper and `status`)
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def free_target(spec: PoolSpec, now: float) -> int:
    """How many free ready clones the pool wants at `now`, after its schedule.

    The first schedule rule whose weekday and time window (in spec.timezone) contain `now`
    wins; a window whose end is before its start runs past midnight.
    """
    if not spec.schedule:
        return spec.free
    local = datetime.fromtimestamp(now, _zone(spec.timezone))
    minute = local.hour * 60 + local.minute
    for rule in spec.schedule:
        if rule.start_minute <= rule.end_minute:
            inside = rule.start_minute <= minute < rule.end_minute
            day = local.weekday()
        else:
            inside = minute >= rule.start_minute or minute < rule.end_minute
            day = local.weekday() if minute >= rule.start_minute else (local.weekday() - 1) % 7
        if inside and day in rule.days:
            return rule.free
    return spec.free


def retry_delay(spec: PoolSpec, failures: int) -> float:
    """Backoff before the next attempt: retry_backoff, doubling per consecutive failure."""
    return float(spec.retry_backoff * 2 ** max(failures - 1, 0))


def record_failure(spec: PoolSpec, record: CloneRecord, now: float) -> CloneRecord:
    """The record of a clone whose action just failed: FAILED, one more failure, backoff."""
    failures = record.failures + 1
    return replace(
        record,
        state=CloneState.FAILED,
        since=now,
        failures=failures,
        retry_at=now + retry_delay(spec, failures),
    )


def session_live(
    spec: PoolSpec, session: GuestSession, record: CloneRecord | None, now: float
) -> bool:
    """Somebody is on the clone: a client is connected, or a user is logged in and
    disconnected less than spec.disconnect_timeout ago. Such a clone is never reset,
    deleted, stopped or suspended (except a retiring clone past the drain deadline)."""
    if session.client is not None:
        return True
    if not session.users:
        return False
    disconnected_at = now
    if record is not None and record.state is CloneState.DISCONNECTED:
        disconnected_at = record.since
    return now - disconnected_at < spec.disconnect_timeout


# --------------------------------------------------------------------------------------
# One clone
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    spec: PoolSpec
    now: float
    target: int | None
    assigned: frozenset[int]
    breaker_open: bool
    drain_deadline_passed: bool

    def persistent(self, slot: int) -> bool:
        return self.spec.on_logoff is OnLogoff.KEEP or slot in self.assigned


@dataclass(frozen=True)
class _Step:
    record: CloneRecord | None  # None: forget the clone
    actions: tuple[Action, ...] = ()  # hypervisor actions, in order
    failed: bool = False  # the clone failed in this pass (pool failure count)
    became_ready: bool = False  # a new or reset clone came up (pool failures reset)


def _enter(
    ctx: _Context, rec: CloneRecord | None, name: str, slot: int, version: int, state: CloneState
) -> CloneRecord:
    """The record after moving to `state`; `since` only moves when the state changes."""
    if rec is None:
        return CloneRecord(name=name, slot=slot, version=version, state=state, since=ctx.now)
    if rec.state is state and rec.slot == slot and rec.version == version:
        return rec  # the common case, kept cheap: plan() runs often over many clones
    since = rec.since if rec.state is state else ctx.now
    return replace(rec, slot=slot, version=version, state=state, since=since)


def _ended(rec: CloneRecord, at: float | None) -> CloneRecord:
    return rec if rec.session_ended_at == at else replace(rec, session_ended_at=at)


def _in_use(rec: CloneRecord, last_user: str | None) -> CloneRecord:
    if rec.session_ended_at is None and rec.last_user == last_user:
        return rec
    return replace(rec, session_ended_at=None, last_user=last_user)


def _healthy(rec: CloneRecord) -> CloneRecord:
    if rec.session_ended_at is None and rec.failures == 0 and rec.retry_at is None:
        return rec
    return replace(rec, session_ended_at=None, failures=0, retry_at=None)


def _advance(ctx: _Context, oc: ObservedClone, rec: CloneRecord | None) -> _Step:
    """The next record of an observed clone, and what to do to it."""
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    old = ctx.target is not None and info.version != ctx.target
    state = rec.state if rec is not None else None

    def to(new: CloneState) -> CloneRecord:
        return _enter(ctx, rec, name, info.slot, info.version, new)

    def delete() -> _Step:
        return _Step(to(CloneState.DELETING), (DeleteClone(pool=pool, clone=name),))

    if session_live(spec, oc.session, rec, now):
        if old or state is CloneState.RETIRING:
            if ctx.drain_deadline_passed:
                return delete()
            return _Step(_ended(to(CloneState.RETIRING), None))
        if oc.session.client is None:
            return _Step(_ended(to(CloneState.DISCONNECTED), None))
        last = oc.session.users[0] if oc.session.users else (rec.last_user if rec else None)
        return _Step(_in_use(to(CloneState.IN_USE), last))

    if state is CloneState.DELETING and rec is not None:
        if now - rec.since >= spec.boot_timeout:  # the delete got lost: issue it again
            return _Step(replace(rec, since=now), (DeleteClone(pool=pool, clone=name),))
        return _Step(rec)

    if state in _SESSION_STATES and rec is not None:  # the session just ended
        if old or state is CloneState.RETIRING:
            return delete()
        ended = now
        if state is CloneState.DISCONNECTED:
            ended = rec.since + spec.disconnect_timeout
        rec = _ended(to(CloneState.RECYCLING), ended)
        state = CloneState.RECYCLING

    if state is CloneState.FAILED and rec is not None:
        if (rec.retry_at is not None and now < rec.retry_at) or ctx.breaker_open:
            return _Step(rec)
        if old or rec.failures >= CLONE_RETRIES:
            return delete()
        nxt = replace(to(CloneState.BOOTING), retry_at=None)
        return _Step(nxt, (ResetClone(pool=pool, clone=name),))

    if old:
        return delete()

    if info.power is Power.CRASHED:
        base = rec or to(CloneState.FAILED)
        return _Step(record_failure(spec, base, now), failed=True)

    if state is CloneState.RECYCLING and rec is not None:
        return _recycle(ctx, oc, rec)

    if info.power is Power.SUSPENDED:
        return _Step(to(CloneState.SUSPENDED))

    if info.power is Power.SHUTOFF:
        return _powered_off(ctx, oc, rec)

    booting_since = rec.since if state in _COMING_STATES and rec is not None else now
    if info.power is Power.RUNNING and info.ready:
        fresh = state in _COMING_STATES or state is None
        return _Step(_healthy(to(CloneState.FREE)), became_ready=fresh)
    if now - booting_since >= spec.boot_timeout:
        return _Step(record_failure(spec, to(CloneState.BOOTING), now), failed=True)
    return _Step(to(CloneState.BOOTING))


def _powered_off(ctx: _Context, oc: ObservedClone, rec: CloneRecord | None) -> _Step:
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    state = rec.state if rec is not None else None

    def to(new: CloneState) -> CloneRecord:
        return _enter(ctx, rec, name, info.slot, info.version, new)

    if state is CloneState.CREATING:  # made, not started yet
        return _Step(to(CloneState.BOOTING), (StartClone(pool=pool, clone=name),))
    if state is CloneState.BOOTING and rec is not None:  # a start or reset is on its way
        if now - rec.since >= spec.boot_timeout:
            return _Step(record_failure(spec, rec, now), failed=True)
        return _Step(rec)
    if ctx.persistent(info.slot):
        stopped = to(CloneState.STOPPED)
        if now - stopped.since >= spec.recycle_after:
            return _Step(to(CloneState.BOOTING), (StartClone(pool=pool, clone=name),))
        return _Step(stopped)
    return _recycle(ctx, oc, _ended(to(CloneState.RECYCLING), now))


def _recycle(ctx: _Context, oc: ObservedClone, rec: CloneRecord) -> _Step:
    """A clone whose user logged off (or that powered off) waits recycle_after, then:
    reset (clean state), delete, or, for a persistent desktop, back to free (started again
    if it is powered off)."""
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    ended = rec.session_ended_at if rec.session_ended_at is not None else rec.since
    if now - ended < spec.recycle_after:
        return _Step(rec)
    if ctx.persistent(info.slot):
        if info.power is Power.SHUTOFF:
            nxt = _enter(ctx, rec, name, info.slot, info.version, CloneState.BOOTING)
            return _Step(nxt, (StartClone(pool=pool, clone=name),))
        ready = info.power is Power.RUNNING and info.ready
        state = CloneState.FREE if ready else CloneState.BOOTING
        nxt = _enter(ctx, rec, name, info.slot, info.version, state)
        return _Step(_ended(nxt, None))
    if spec.on_logoff is OnLogoff.DELETE:
        nxt = _enter(ctx, rec, name, info.slot, info.version, CloneState.DELETING)
        return _Step(nxt, (DeleteClone(pool=pool, clone=name),))
    nxt = _enter(ctx, rec, name, info.slot, info.version, CloneState.BOOTING)
    return _Step(_ended(nxt, None), (ResetClone(pool=pool, clone=name),))


def _advance_missing(ctx: _Context, rec: CloneRecord) -> _Step:
    """A remembered clone the hypervisor does not have (any more, or not yet)."""
    spec, now = ctx.spec, ctx.now
    if rec.state is CloneState.CREATING:
        if now - rec.since < spec.boot_timeout:
            return _Step(rec)  # the create is in flight: never issue it twice
        return _Step(record_failure(spec, rec, now), failed=True)
    if rec.state is CloneState.FAILED and rec.retry_at is not None:
        return _Step(rec)  # a failed create waiting for its retry (see _resize)
    return _Step(None)


def classify(
    spec: PoolSpec,
    observed_clone: ObservedClone | None,
    record: CloneRecord | None,
    now: float,
    *,
    target_version: int | None = None,
) -> CloneState:
    """The state the planner gives this clone at `now` (for `status`).

    Without `target_version` no rollout is assumed. A clone that is gone and forgotten
    reports its last remembered state.
    """
    ctx = _Context(
        spec=spec,
        now=now,
        target=target_version,
        assigned=frozenset(spec.assignments.values()),
        breaker_open=False,
        drain_deadline_passed=False,
    )
    if observed_clone is not None:
        step = _advance(ctx, observed_clone, record)
    elif record is not None:
        step = _advance_missing(ctx, record)
    else:
        raise BadInputError("classify needs an observed clone or a record of one")
    if step.record is not None:
        return step.record.state
    assert record is not None
    return record.state


# --------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What one planning pass has decided so far (mutable while the pass runs)."""

    ctx: _Context
    observed: Mapping[str, ObservedClone]
    records: dict[str, CloneRecord] = field(default_factory=dict)
    actions: dict[str, list[Action]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def set(self, name: str, record: CloneRecord | None, actions: tuple[Action, ...]) -> None:
        if name not in self.actions:
            self.order.append(name)
            self.actions[name] = []
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = record
        self.actions[name].extend(actions)


def _rollout_started(
    record: PoolRecord, target: int | None, observed: Observed, now: float
) -> float | None:
    old_exists = target is not None and (
        any(c.info.version != target for c in observed.clones)
        or any(r.version != target for r in record.clones.values())
    )
    if not old_exists:
        return None
    if record.target_version != target or record.rollout_started_at is None:
        return now
    return record.rollout_started_at


def _free_slots(spec: PoolSpec, used: set[int], reserved: frozenset[int]) -> Iterator[int]:
    for slot in range(spec.slots):
        if slot not in used and slot not in reserved:
            yield slot


def _create(p: _Pass, slot: int, failures: int = 0) -> None:
    spec, now, target = p.ctx.spec, p.ctx.now, p.ctx.target
    assert target is not None
    name = spec.clone_name(slot)
    rec = CloneRecord(
        name=name,
        slot=slot,
        version=target,
        state=CloneState.CREATING,
        since=now,
        failures=failures,
    )
    display = Endpoint(spec.display_address, spec.port_for(slot))
    create = CreateClone(pool=spec.name, clone=name, slot=slot, version=target, display=display)
    p.set(name, rec, (create,))


def _resize(p: _Pass, base_ready: bool, breaker_open: bool) -> None:
    """Reach `initial`, keep the free target (resume before create), shrink one step."""
    ctx = p.ctx
    spec, now, target = ctx.spec, ctx.now, ctx.target
    if target is None:
        return
    ready_free = coming = counted = alive = running = 0
    shrinkable: list[CloneRecord] = []
    suspended: list[CloneRecord] = []
    retries: list[CloneRecord] = []
    used: set[int] = set()
    for name, rec in p.records.items():
        used.add(rec.slot)
        exists = name in p.observed
        if not exists and rec.state is CloneState.FAILED and now >= (rec.retry_at or now):
            retries.append(rec)  # a failed create, due for another attempt
        if rec.version != target:
            continue
        shared = rec.slot not in ctx.assigned
        if not exists:  # a create in flight, or a failed one waiting for its retry
            if rec.state is CloneState.CREATING or (
                rec.state is CloneState.FAILED and rec not in retries
            ):
                counted += 1
                alive += 1
                coming += shared
            continue
        counted += 1
        if rec.state is not CloneState.DELETING:
            alive += 1
            running += rec.state is not CloneState.SUSPENDED
        if not shared:
            continue
        if rec.state is CloneState.FREE:
            ready_free += 1
            if now - rec.since >= spec.shrink_after:
                shrinkable.append(rec)
        elif rec.state in _COMING_STATES:
            coming += 1
        elif (
            rec.state is CloneState.SUSPENDED
            and not p.actions.get(name)
            and p.observed[name].info.power is Power.SUSPENDED
        ):
            suspended.append(rec)

    wanted_free = free_target(spec, now)
    need = max(wanted_free - ready_free - coming, spec.initial - alive, 0)

    for rec in sorted(suspended, key=lambda r: r.slot)[:need]:
        p.set(
            rec.name,
            _enter(ctx, rec, rec.name, rec.slot, rec.version, CloneState.BOOTING),
            (ResumeClone(pool=spec.name, clone=rec.name),),
        )
        need -= 1

    can_create = base_ready and not breaker_open
    room = spec.max - counted
    for rec in sorted(retries, key=lambda r: r.slot):
        reserved = rec.slot in ctx.assigned
        if rec.failures >= CLONE_RETRIES or not (reserved or need > 0):
            p.set(rec.name, None, (ForgetClone(pool=spec.name, clone=rec.name),))
        elif can_create and room > 0:
            _create(p, rec.slot, rec.failures)
            room -= 1
            need -= not reserved
    if can_create:
        for slot in sorted(ctx.assigned):
            if room > 0 and slot not in used and slot < spec.slots:
                _create(p, slot)
                used.add(slot)
                room -= 1
        free_slots = _free_slots(spec, used, ctx.assigned)
        while need > 0 and room > 0:
            free_slot = next(free_slots, None)
            if free_slot is None:
                break
            _create(p, free_slot)
            need -= 1
            room -= 1

    if need > 0 or ready_free - 1 < wanted_free or running - 1 < spec.initial or not shrinkable:
        return
    victim = min(shrinkable, key=lambda r: (r.since, -r.slot))
    if spec.standby is Standby.SUSPEND:
        nxt = _enter(ctx, victim, victim.name, victim.slot, victim.version, CloneState.SUSPENDED)
        p.set(victim.name, nxt, (SuspendClone(pool=spec.name, clone=victim.name),))
    else:
        nxt = _enter(ctx, victim, victim.name, victim.slot, victim.version, CloneState.DELETING)
        p.set(victim.name, nxt, (DeleteClone(pool=spec.name, clone=victim.name),))


def _balancer(
    ctx: _Context, oc: ObservedClone, rec: CloneRecord | None, hyper: list[Action]
) -> tuple[list[Action], list[Action]]:
    """(take-out actions before the hypervisor's, put-in actions after) for one clone."""
    pool, name, backend = ctx.spec.name, oc.name, oc.backend
    state = rec.state if rec is not None else CloneState.DELETING
    serving = (
        state is CloneState.FREE
        and oc.info.version == ctx.target
        and oc.info.slot not in ctx.assigned
        and not hyper
    )
    if serving:
        if backend is None or backend.state is not BackendState.READY:
            address = oc.info.display or Endpoint(
                ctx.spec.display_address, ctx.spec.port_for(oc.info.slot)
            )
            return [], [BalancerEnable(pool=pool, clone=name, address=address)]
        return [], []
    if backend is None:
        return [], []
    leaving = state is CloneState.DELETING or (
        bool(hyper) and any(isinstance(a, ResetClone) for a in hyper)
    )
    if leaving and backend.connections == 0:
        return [BalancerRemove(pool=pool, clone=name)], []
    if backend.state is BackendState.READY:
        return [BalancerDrain(pool=pool, clone=name)], []
    return [], []


def _pool_memory(
    spec: PoolSpec, record: PoolRecord, failed: int, ready: int, now: float
) -> tuple[int, float | None]:
    """(consecutive failures, breaker open until) after this pass's events."""
    failures, until = record.failures, record.breaker_open_until
    if until is not None and now >= until:  # cooldown over: half-open, one more failure reopens
        until = None
        failures = min(failures, max(spec.max_failures - 1, 0))
    if ready:
        failures = 0
    failures += failed
    if until is None and failed and failures >= spec.max_failures:
        until = now + spec.breaker_cooldown
    return failures, until


def plan(spec: PoolSpec, observed: Observed, record: PoolRecord, now: float) -> list[Action]:
    """Everything to do now to move the pool towards its spec (see docs/pool-lifecycle.md)."""
    target = observed.target_version
    if target is None:
        target = record.target_version
    started = _rollout_started(record, target, observed, now)
    deadline = spec.drain_deadline
    ctx = _Context(
        spec=spec,
        now=now,
        target=target,
        assigned=frozenset(spec.assignments.values()),
        breaker_open=record.breaker_open_until is not None and now < record.breaker_open_until,
        drain_deadline_passed=deadline is not None
        and started is not None
        and now - started >= deadline,
    )
    by_name = {c.name: c for c in observed.clones}
    p = _Pass(ctx=ctx, observed=by_name)
    failed = ready = 0
    for oc in observed.clones:
        step = _advance(ctx, oc, record.clones.get(oc.name))
        p.set(oc.name, step.record, step.actions)
        failed += step.failed
        ready += step.became_ready
    for name, rec in record.clones.items():
        if name not in by_name:
            step = _advance_missing(ctx, rec)
            forget = (ForgetClone(pool=spec.name, clone=name),) if step.record is None else ()
            p.set(name, step.record, forget)
            failed += step.failed

    failures, until = _pool_memory(spec, record, failed, ready, now)
    breaker_open = until is not None and now < until
    _resize(p, observed.base_ready, breaker_open)

    out: list[Action] = []
    for name in p.order:
        hyper = p.actions[name]
        nxt = p.records.get(name)
        seen = by_name.get(name)
        before, after = _balancer(ctx, seen, nxt, hyper) if seen is not None else ([], [])
        out += before
        out += hyper
        out += after
        prev = record.clones.get(name)
        if nxt is not None and nxt is not prev and nxt != prev:
            out.append(RecordClone(pool=spec.name, clone=name, record=nxt))
    for backend in observed.orphan_backends:
        if backend.connections == 0:
            out.append(BalancerRemove(pool=spec.name, clone=backend.name))
        elif backend.state is BackendState.READY:
            out.append(BalancerDrain(pool=spec.name, clone=backend.name))
    memory = (target, failures, until, started)
    if memory != (
        record.target_version,
        record.failures,
        record.breaker_open_until,
        record.rollout_started_at,
    ):
        out.append(
            RecordPool(
                pool=spec.name,
                target_version=target,
                failures=failures,
                breaker_open_until=until,
                rollout_started_at=started,
            )
        )
    return out


def next_timer(spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
    """The next moment after `now` at which plan() could answer differently without any new
    observation (a recycle, disconnect, shrink, boot or retry timer, the breaker, the drain
    deadline, a schedule minute). The keeper may sleep until then or until an event."""
    soonest: float | None = None

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
            consider(rec.since + spec.shrink_after)
        elif state in (CloneState.CREATING, CloneState.BOOTING, CloneState.DELETING):
            consider(rec.since + spec.boot_timeout)
        elif state is CloneState.FAILED:
            consider(rec.retry_at)
    consider(record.breaker_open_until)
    if spec.drain_deadline is not None and record.rollout_started_at is not None:
        consider(record.rollout_started_at + spec.drain_deadline)
    if spec.schedule:
        consider(now - now % 60.0 + 60.0)
    return soonest
