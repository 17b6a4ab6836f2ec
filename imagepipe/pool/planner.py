"""The pool planner: what to do about the difference between wanted and observed.

    plan(spec, observed, record, now) -> list[Action]

Pure: no I/O, no clock, no randomness. Every rule of a pool lives here; README.md ("Pool lifecycle")
describes them in words and draws the state diagram. One pass is linear in the number of
clones: each clone is advanced once (`_advance`), then the pool as a whole grows, resumes or
shrinks (`_resize`), then balancer actions follow from each clone's new state.

Actions for one clone are listed in the order they must run (take it out of the balancer,
act on the hypervisor, put it in the balancer, remember the new record).

plan() runs on every keeper pass (and thousands of times per simulated day) over every
clone, so the hot paths are written for speed without changing a single decision: most
clones in a busy pool are quiet (in use by the same user, free and serving, suspended), and
plan() tells them apart up front and skips the per-clone work that would end in "keep the
record, do nothing". benchmarks/bench_planner.py measures it.
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
    CloneInfo,
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

_COMING_STATES = (CloneState.CREATING, CloneState.BOOTING)

# plan() runs every pass over every clone: module-level names for the enum members it tests
# are several times cheaper to read than `CloneState.FREE` (a class attribute lookup).
_CREATING = CloneState.CREATING
_BOOTING = CloneState.BOOTING
_FREE = CloneState.FREE
_IN_USE = CloneState.IN_USE
_DISCONNECTED = CloneState.DISCONNECTED
_RECYCLING = CloneState.RECYCLING
_SUSPENDED = CloneState.SUSPENDED
_RETIRING = CloneState.RETIRING
_DELETING = CloneState.DELETING
_FAILED = CloneState.FAILED
_STOPPED = CloneState.STOPPED
_RUNNING = Power.RUNNING
_SHUTOFF = Power.SHUTOFF
_POWER_SUSPENDED = Power.SUSPENDED
_CRASHED = Power.CRASHED
_READY = BackendState.READY


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
    in_flight: frozenset[str] = frozenset()

    def persistent(self, slot: int) -> bool:
        return self.spec.on_logoff is OnLogoff.KEEP or slot in self.assigned


# One clone's step: (next record, or None to forget the clone; its hypervisor actions in
# order; it failed in this pass (pool failure count); a new or reset clone came up (pool
# failures reset)). A plain tuple, not a dataclass: _advance runs for every clone on every
# pass, and building a tuple costs a fraction of a frozen dataclass.
_Step = tuple[CloneRecord | None, tuple[Action, ...], bool, bool]
_NO_ACTIONS: tuple[Action, ...] = ()


def _enter(
    ctx: _Context, rec: CloneRecord | None, name: str, slot: int, version: int, state: CloneState
) -> CloneRecord:
    """The record after moving to `state`; `since` only moves when the state changes."""
    if rec is None:  # a clone the store does not know: nobody can tell who was on it
        return CloneRecord(
            name=name, slot=slot, version=version, state=state, since=ctx.now, dirty=True
        )
    if rec.state is state and rec.slot == slot and rec.version == version:
        return rec  # the common case, kept cheap: plan() runs often over many clones
    since = rec.since if rec.state is state else ctx.now
    return replace(rec, slot=slot, version=version, state=state, since=since)


def _to(ctx: _Context, rec: CloneRecord | None, info: CloneInfo, state: CloneState) -> CloneRecord:
    return _enter(ctx, rec, info.name, info.slot, info.version, state)


def _ended(rec: CloneRecord, at: float | None) -> CloneRecord:
    return rec if rec.session_ended_at == at else replace(rec, session_ended_at=at)


def _in_use(rec: CloneRecord, last_user: str | None) -> CloneRecord:
    if rec.session_ended_at is None and rec.last_user == last_user and rec.dirty:
        return rec
    return replace(rec, session_ended_at=None, last_user=last_user, dirty=True)


def _used(rec: CloneRecord) -> CloneRecord:
    """Somebody is on the clone: it must be reset before anyone else gets it."""
    if rec.dirty and rec.session_ended_at is None:
        return rec
    return replace(rec, session_ended_at=None, dirty=True)


def _reset(ctx: _Context, rec: CloneRecord | None, info: CloneInfo) -> _Step:
    """Reset now (the record stays dirty until the executor reports the reset done)."""
    nxt = _ended(_to(ctx, rec, info, _BOOTING), None)
    return nxt, (ResetClone(pool=ctx.spec.name, clone=info.name),), False, False


def _healthy(rec: CloneRecord) -> CloneRecord:
    if rec.session_ended_at is None and rec.failures == 0 and rec.retry_at is None:
        return rec
    return replace(rec, session_ended_at=None, failures=0, retry_at=None)


def _delete(ctx: _Context, rec: CloneRecord | None, info: CloneInfo) -> _Step:
    delete = DeleteClone(pool=ctx.spec.name, clone=info.name)
    return _to(ctx, rec, info, _DELETING), (delete,), False, False


def _advance(ctx: _Context, oc: ObservedClone, rec: CloneRecord | None) -> _Step:
    """The next record of an observed clone, and what to do to it."""
    info, session, target = oc.info, oc.session, ctx.target
    old = target is not None and info.version != target
    state = rec.state if rec is not None else None

    client = session.client
    if client is not None or (session.users and session_live(ctx.spec, session, rec, ctx.now)):
        if old or state is _RETIRING:
            if ctx.drain_deadline_passed:
                return _delete(ctx, rec, info)
            return _used(_to(ctx, rec, info, _RETIRING)), _NO_ACTIONS, False, False
        if client is None:
            return _used(_to(ctx, rec, info, _DISCONNECTED)), _NO_ACTIONS, False, False
        users = session.users
        last = users[0] if users else (rec.last_user if rec else None)
        if (  # still in use by the same user: the record stays as it is
            state is _IN_USE
            and rec is not None
            and rec.last_user == last
            and rec.session_ended_at is None
            and rec.dirty
            and rec.slot == info.slot
            and rec.version == info.version
        ):
            return rec, _NO_ACTIONS, False, False
        return _in_use(_to(ctx, rec, info, _IN_USE), last), _NO_ACTIONS, False, False

    power = info.power
    if not old and rec is not None and rec.slot == info.slot and rec.version == info.version:
        # the common quiet cases, which the rules below would reach with the same answer
        if state is _SUSPENDED and power is _POWER_SUSPENDED:
            return rec, _NO_ACTIONS, False, False  # stays suspended
        if (
            state is _FREE
            and power is _RUNNING
            and info.ready
            and rec.session_ended_at is None
            and rec.failures == 0
            and rec.retry_at is None
            and not rec.dirty
        ):
            return rec, _NO_ACTIONS, False, False  # free and healthy

    spec, now = ctx.spec, ctx.now
    if rec is None and not old and not ctx.persistent(info.slot):
        return _reset(ctx, rec, info)  # unknown history, nobody on it: clean it before use
    if state is _DELETING and rec is not None:
        if info.name not in ctx.in_flight:  # the delete never ran (a crash): issue it again
            again = DeleteClone(pool=spec.name, clone=info.name)
            return replace(rec, since=now), (again,), False, False
        return rec, _NO_ACTIONS, False, False

    if (state is _IN_USE or state is _DISCONNECTED or state is _RETIRING) and rec is not None:
        # the session just ended
        if old or state is _RETIRING:
            return _delete(ctx, rec, info)
        ended = now
        if state is _DISCONNECTED:  # logged off, or the disconnect timed out: whichever came first
            ended = min(now, rec.since + spec.disconnect_timeout)
        rec = _ended(_to(ctx, rec, info, _RECYCLING), ended)
        state = _RECYCLING

    if state is _FAILED and rec is not None:
        if (rec.retry_at is not None and now < rec.retry_at) or ctx.breaker_open:
            return rec, _NO_ACTIONS, False, False
        if old or rec.failures >= CLONE_RETRIES:
            return _delete(ctx, rec, info)
        nxt = replace(_to(ctx, rec, info, _BOOTING), retry_at=None)
        return nxt, (ResetClone(pool=spec.name, clone=info.name),), False, False

    if old:
        return _delete(ctx, rec, info)

    if power is _CRASHED:
        base = rec or _to(ctx, rec, info, _FAILED)
        return record_failure(spec, base, now), _NO_ACTIONS, True, False

    if state is _RECYCLING and rec is not None:
        return _recycle(ctx, oc, rec)

    if power is _POWER_SUSPENDED:
        return _to(ctx, rec, info, _SUSPENDED), _NO_ACTIONS, False, False

    if power is _SHUTOFF:
        return _powered_off(ctx, oc, rec)

    if power is _RUNNING and info.ready:
        if rec is not None and rec.dirty and not ctx.persistent(info.slot):
            if info.name in ctx.in_flight:
                return rec, _NO_ACTIONS, False, False  # its reset is on its way
            return _reset(ctx, rec, info)  # never free before its reset completed
        fresh = state in _COMING_STATES or state is None
        return _healthy(_to(ctx, rec, info, _FREE)), _NO_ACTIONS, False, fresh
    booting_since = rec.since if state in _COMING_STATES and rec is not None else now
    if now - booting_since >= spec.boot_timeout:
        return record_failure(spec, _to(ctx, rec, info, _BOOTING), now), _NO_ACTIONS, True, False
    return _to(ctx, rec, info, _BOOTING), _NO_ACTIONS, False, False


def _powered_off(ctx: _Context, oc: ObservedClone, rec: CloneRecord | None) -> _Step:
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    state = rec.state if rec is not None else None

    if state is _CREATING:  # made, not started yet
        return _to(ctx, rec, info, _BOOTING), (StartClone(pool=pool, clone=name),), False, False
    if state is _BOOTING and rec is not None:
        if name in ctx.in_flight:  # a start or reset is on its way
            return rec, _NO_ACTIONS, False, False
        # The start or reset never reached the hypervisor (a crash, a stop), or the guest
        # powered itself off at once: do it again now, a bounded number of times.
        if rec.failures + 1 >= CLONE_RETRIES:
            return record_failure(spec, rec, now), _NO_ACTIONS, True, False
        again: Action = (
            ResetClone(pool=pool, clone=name) if rec.dirty else StartClone(pool=pool, clone=name)
        )
        return replace(rec, since=now, failures=rec.failures + 1), (again,), False, False
    if ctx.persistent(info.slot):
        stopped = _to(ctx, rec, info, _STOPPED)
        if now - stopped.since >= spec.recycle_after:
            start = StartClone(pool=pool, clone=name)
            return _to(ctx, rec, info, _BOOTING), (start,), False, False
        return stopped, _NO_ACTIONS, False, False
    return _recycle(ctx, oc, _ended(_to(ctx, rec, info, _RECYCLING), now))


def _recycle(ctx: _Context, oc: ObservedClone, rec: CloneRecord) -> _Step:
    """A clone whose user logged off (or that powered off) waits recycle_after, then:
    reset (clean state), delete, or, for a persistent desktop, back to free (started again
    if it is powered off)."""
    spec, now, info = ctx.spec, ctx.now, oc.info
    pool, name = spec.name, info.name
    ended = rec.session_ended_at if rec.session_ended_at is not None else rec.since
    if now - ended < spec.recycle_after:
        return rec, _NO_ACTIONS, False, False
    if ctx.persistent(info.slot):
        if info.power is _SHUTOFF:
            nxt = _to(ctx, rec, info, _BOOTING)
            return nxt, (StartClone(pool=pool, clone=name),), False, False
        ready = info.power is _RUNNING and info.ready
        nxt = _to(ctx, rec, info, _FREE if ready else _BOOTING)
        return _ended(nxt, None), _NO_ACTIONS, False, False
    if spec.on_logoff is OnLogoff.DELETE:
        nxt = _to(ctx, rec, info, _DELETING)
        return nxt, (DeleteClone(pool=pool, clone=name),), False, False
    nxt = _to(ctx, rec, info, _BOOTING)
    return _ended(nxt, None), (ResetClone(pool=pool, clone=name),), False, False


def _advance_missing(ctx: _Context, rec: CloneRecord) -> _Step:
    """A remembered clone the hypervisor does not have (any more, or not yet)."""
    spec, now = ctx.spec, ctx.now
    if rec.state is _CREATING:
        if rec.name not in ctx.in_flight:
            return None, _NO_ACTIONS, False, False  # it never ran (a crash): the pool remakes it
        if now - rec.since < spec.boot_timeout:
            return rec, _NO_ACTIONS, False, False  # the create is in flight: never issue it twice
        return record_failure(spec, rec, now), _NO_ACTIONS, True, False
    if rec.state is _FAILED and rec.retry_at is not None:
        return rec, _NO_ACTIONS, False, False  # a failed create waiting for its retry (_resize)
    return None, _NO_ACTIONS, False, False


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
        nxt = _advance(ctx, observed_clone, record)[0]
    elif record is not None:
        nxt = _advance_missing(ctx, record)[0]
    else:
        raise BadInputError("classify needs an observed clone or a record of one")
    if nxt is not None:
        return nxt.state
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
    # every clone the pass has decided about, in the order it was first decided about
    actions: dict[str, tuple[Action, ...]] = field(default_factory=dict)
    # Settled clones (name -> slot): in use by the same user, of the target version, out of
    # the balancer, their record as it was. Nothing can happen to them in this pass, so they
    # skip records/actions; _resize only counts them (see _settled in plan()).
    settled: dict[str, int] = field(default_factory=dict)
    unsettled: bool = False  # _resize decided about a settled clone after all: plan again
    # Quiet clones: free and serving, or suspended; kept as they are with nothing to output
    # unless _resize decides about them (a shrink, a resume).
    quiet: set[str] = field(default_factory=set)

    def set(self, name: str, record: CloneRecord | None, actions: tuple[Action, ...]) -> None:
        if name in self.settled:
            self.unsettled = True
        self.quiet.discard(name)
        self.actions[name] = self.actions.get(name, _NO_ACTIONS) + actions
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = record


def _rollout_started(
    record: PoolRecord, target: int | None, old_exists: bool, now: float
) -> float | None:
    """`old_exists`: a clone or record of a version other than `target` (not None)."""
    if target is None or not old_exists:
        return None
    if record.target_version != target or record.rollout_started_at is None:
        return now
    return record.rollout_started_at


def _old_exists(record: PoolRecord, target: int | None, observed: Observed) -> bool:
    return target is not None and (
        any(c.info.version != target for c in observed.clones)
        or any(r.version != target for r in record.clones.values())
    )


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
    ready_free = coming = 0
    shrinkable: list[CloneRecord] = []
    suspended: list[CloneRecord] = []
    retries: list[CloneRecord] = []
    used: set[int] = set(p.settled.values())
    counted = alive = running = len(p.settled)  # in use: alive and running, never shared-free
    observed, decided, assigned = p.observed, p.actions, ctx.assigned
    shrink_after, use = spec.shrink_after, used.add
    for name, rec in p.records.items():
        state = rec.state
        use(rec.slot)
        if name not in observed:  # a create in flight, or a failed one
            if state is _FAILED and now >= (rec.retry_at or now):
                retries.append(rec)  # due for another attempt
            if rec.version == target and (
                state is _CREATING or (state is _FAILED and rec not in retries)
            ):
                counted += 1
                alive += 1
                coming += rec.slot not in assigned
            continue
        if rec.version != target:
            continue
        counted += 1
        if state is _FREE:
            alive += 1
            running += 1
            if rec.slot not in assigned:
                ready_free += 1
                if now - rec.since >= shrink_after:
                    shrinkable.append(rec)
        elif state is _SUSPENDED:
            alive += 1
            if (
                rec.slot not in assigned
                and not decided.get(name)
                and observed[name].info.power is _POWER_SUSPENDED
            ):
                suspended.append(rec)
        elif state is not _DELETING:
            alive += 1
            running += 1
            if (state is _BOOTING or state is _CREATING) and rec.slot not in assigned:
                coming += 1

    wanted_free = free_target(spec, now)
    need = max(wanted_free - ready_free - coming, spec.initial - alive, 0)

    for rec in sorted(suspended, key=lambda r: r.slot)[:need] if need > 0 else ():
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


_NO_BALANCER: tuple[tuple[Action, ...], tuple[Action, ...]] = ((), ())


def _balancer(
    ctx: _Context, oc: ObservedClone, rec: CloneRecord | None, hyper: tuple[Action, ...]
) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    """(take-out actions before the hypervisor's, put-in actions after) for one clone."""
    backend = oc.backend
    state = rec.state if rec is not None else _DELETING
    info = oc.info
    if (
        state is _FREE
        and not hyper
        and info.version == ctx.target
        and info.slot not in ctx.assigned
    ):
        if backend is None or backend.state is not _READY:  # serving: in the balancer
            spec = ctx.spec
            address = info.display or Endpoint(spec.display_address, spec.port_for(info.slot))
            return (), (BalancerEnable(pool=spec.name, clone=info.name, address=address),)
        return _NO_BALANCER
    if backend is None:
        return _NO_BALANCER
    leaving = state is _DELETING or (bool(hyper) and any(isinstance(a, ResetClone) for a in hyper))
    if leaving and backend.connections == 0:
        return (BalancerRemove(pool=ctx.spec.name, clone=info.name),), ()
    if backend.state is _READY:
        return (BalancerDrain(pool=ctx.spec.name, clone=info.name),), ()
    return _NO_BALANCER


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
    """Everything to do now to move the pool towards its spec ("Pool lifecycle", README.md)."""
    planned = _plan(spec, observed, record, now, settle=True)
    if planned is None:
        planned = _plan(spec, observed, record, now, settle=False)
        assert planned is not None  # with nothing settled, nothing can come unsettled
    return planned


def _plan(
    spec: PoolSpec, observed: Observed, record: PoolRecord, now: float, *, settle: bool
) -> list[Action] | None:
    """plan(). With `settle`, quiet clones skip the per-clone work: settled ones (in use)
    are only counted, quiet ones (free, suspended) only handed to _resize. None: _resize
    decided about a settled clone after all (only possible when a clone's name is not its
    slot's name): plan again without settling."""
    target = observed.target_version
    if target is None:
        target = record.target_version
    deadline = spec.drain_deadline
    started: float | None = None
    if deadline is not None:  # the drain deadline needs the rollout's start before any clone
        started = _rollout_started(record, target, _old_exists(record, target, observed), now)
    ctx = _Context(
        spec=spec,
        now=now,
        target=target,
        assigned=frozenset(spec.assignments.values()),
        breaker_open=record.breaker_open_until is not None and now < record.breaker_open_until,
        drain_deadline_passed=deadline is not None
        and started is not None
        and now - started >= deadline,
        in_flight=observed.in_flight,
    )
    remembered = record.clones
    by_name = {c.info.name: c for c in observed.clones}
    p = _Pass(ctx=ctx, observed=by_name)
    records, decided = p.records, p.actions
    failed = ready = 0
    old_exists = False  # a clone or record of another version than the target
    get = remembered.get
    twice = len(by_name) < len(observed.clones)  # a name observed twice (never, really)
    settle = settle and not twice
    settled, quiet, assigned = p.settled, p.quiet, ctx.assigned
    for oc in observed.clones:
        info = oc.info
        name = info.name
        rec = get(name)
        if info.version != target or (rec is not None and rec.version != target):
            old_exists = True
        elif settle and rec is not None and rec.slot == info.slot:
            # The common quiet clones of the target version, told apart without the
            # per-clone work: _advance would keep their record as it is with no action, and
            # _balancer would have nothing to do, so they have no output.
            state, session, backend = rec.state, oc.session, oc.backend
            if state is _IN_USE:
                if (
                    session.client is not None
                    and (backend is None or backend.state is not _READY)
                    and rec.session_ended_at is None
                    and rec.dirty
                    and (not session.users or session.users[0] == rec.last_user)
                ):
                    settled[name] = info.slot  # the same user's live session, drained
                    continue
            elif session.client is None and not session.users:
                if state is _SUSPENDED:
                    if info.power is _POWER_SUSPENDED and (
                        backend is None or backend.state is not _READY
                    ):
                        decided[name] = _NO_ACTIONS  # suspended, out of the balancer
                        records[name] = rec
                        quiet.add(name)
                        continue
                elif (
                    state is _FREE
                    and info.power is _RUNNING
                    and info.ready
                    and rec.session_ended_at is None
                    and rec.failures == 0
                    and rec.retry_at is None
                    and not rec.dirty
                    and backend is not None
                    and backend.state is _READY
                    and info.slot not in assigned
                ):
                    decided[name] = _NO_ACTIONS  # free, healthy, serving
                    records[name] = rec
                    quiet.add(name)
                    continue
        nxt, hyper, step_failed, became_ready = _advance(ctx, oc, rec)
        if twice and name in decided:  # observed twice: decide as one clone
            p.set(name, nxt, hyper)
        else:
            decided[name] = hyper
            if nxt is not None:
                records[name] = nxt
        if step_failed:
            failed += 1
        if became_ready:
            ready += 1
    if not remembered.keys() <= by_name.keys():  # remembered clones the hypervisor lacks
        for name, rec in remembered.items():
            if rec.version != target:
                old_exists = True
            if name not in by_name:
                nxt, _, step_failed, _ = _advance_missing(ctx, rec)
                forget = (ForgetClone(pool=spec.name, clone=name),) if nxt is None else _NO_ACTIONS
                p.set(name, nxt, forget)
                failed += step_failed
    if deadline is None:
        started = _rollout_started(record, target, old_exists, now)

    failures, until = _pool_memory(spec, record, failed, ready, now)
    breaker_open = until is not None and now < until
    _resize(p, observed.base_ready, breaker_open)
    if p.unsettled:
        return None

    out: list[Action] = []
    for name, hyper in decided.items():
        if name in quiet:
            continue
        nxt = records.get(name)
        seen = by_name.get(name)
        if seen is not None:
            before, after = _balancer(ctx, seen, nxt, hyper)
            if before:
                out += before
            if hyper:
                out += hyper
            if after:
                out += after
        elif hyper:
            out += hyper
        if nxt is not None:
            prev = get(name)
            if nxt is not prev and nxt != prev:
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
        if state is _RECYCLING:
            ended = rec.session_ended_at if rec.session_ended_at is not None else rec.since
            consider(ended + spec.recycle_after)
        elif state is _STOPPED:
            consider(rec.since + spec.recycle_after)
        elif state is _DISCONNECTED:
            consider(rec.since + spec.disconnect_timeout)
        elif state is _FREE:
            consider(rec.since + spec.shrink_after)
        elif state is _CREATING or state is _BOOTING or state is _DELETING:
            consider(rec.since + spec.boot_timeout)
        elif state is _FAILED:
            consider(rec.retry_at)
    consider(record.breaker_open_until)
    if spec.drain_deadline is not None and record.rollout_started_at is not None:
        consider(record.rollout_started_at + spec.drain_deadline)
    if spec.schedule:
        consider(now - now % 60.0 + 60.0)
    return soonest
