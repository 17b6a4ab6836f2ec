"""One pass of the planner: plan() and the steps it is made of (context, decide each clone,
settle the pool, the actions in order), which the simulator's replanner also calls one by one;
and logins_in, the arrivals a pass's plan records (learned warm-up counts them).
"""

from __future__ import annotations

from collections.abc import Iterable

from imagepipe.pool.actions import Action, BalancerEnable, ForgetClone, RecordClone, RecordPool
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.planner.balancer_rules import balancer_actions, orphan_actions
from imagepipe.pool.planner.clones import advance, advance_missing, quiet
from imagepipe.pool.planner.failures import breaker_after, breaker_open
from imagepipe.pool.planner.placement import Placer
from imagepipe.pool.planner.resize import Census, Decisions, resize
from imagepipe.pool.planner.steps import Context, remembered
from imagepipe.pool.rollout.rules import (
    drain_deadline_passed,
    old_exists,
    pace,
    policy_of,
    rollout_started,
    target_of,
)
from imagepipe.record import replace

_IN_USE = CloneState.IN_USE  # read per pass: named once (slow through its Enum class)
# a user arriving takes a desktop in one of these states (a reconnect does not count)
_ARRIVING = frozenset(
    (CloneState.FREE, CloneState.BOOTING, CloneState.SUSPENDED, CloneState.STOPPED)
)


def plan(spec: PoolSpec, observed: Observed, record: PoolRecord, now: float) -> list[Action]:
    """Everything to do now to move the pool towards its spec (docs/pools.md, "Rules"):
    advance every clone once, resize the pool, then each clone's actions in order."""
    old = old_exists(record, target_of(observed, record), observed)
    d = Decisions(ctx=context(spec, observed, record, now, old), observed=observed.by_name())
    failed = came_up = 0
    for oc in observed.clones:
        seen_failed, seen_up = decide(d, oc, record.clones.get(oc.info.name))
        failed += seen_failed
        came_up += seen_up
    for name, rec in record.clones.items():
        if name not in d.observed:
            failed += decide_missing(d, name, rec)
    failures, until = settle(d, observed, record, failed, came_up)
    return in_order(d, observed, record, failures, until)


def context(
    spec: PoolSpec,
    observed: Observed,
    record: PoolRecord,
    now: float,
    old: bool,
    free: int | None = None,
) -> Context:
    """The pass's context; `old`: a clone or record of another version than the target
    exists (rollout/rules.py old_exists); `free`: the free target, when the caller knows it."""
    target = target_of(observed, record)
    started = rollout_started(record, target, old, now)
    policy = policy_of(record, target)
    return Context(
        spec=spec,
        now=now,
        target=target,
        assigned=frozenset(spec.assignments.values()),
        breaker_open=breaker_open(record, now),
        rollout_started=started,
        drain_deadline_passed=drain_deadline_passed(spec, started, now, policy),
        in_flight=observed.in_flight,
        touched=observed.touched,
        rollout=policy,
        arrivals=record.arrivals,
        placer=Placer(observed.hosts),
        lost_hosts=observed.lost_hosts,
        draining_hosts=observed.draining_hosts,
        known_free_target=free,
    )


def decide(d: Decisions, oc: ObservedClone, stored: CloneRecord | None) -> tuple[int, int]:
    """One observed clone, decided once (`stored`: its record in the store). Returns whether
    it failed this pass and whether it came up ready (0 or 1 each)."""
    ctx, name = d.ctx, oc.info.name
    rec = remembered(ctx, oc, stored)
    if stored is not None and stored.lost_since is not None:
        d.returned.add(name)
    if rec is not None and rec is stored and quiet(ctx, oc, rec) and name not in d.actions:
        d.keep_quiet(name, rec)
        return 0, 0
    step = advance(ctx, oc, rec)
    d.set(name, step.record, step.actions)
    return step.failed, step.came_up


def decide_missing(d: Decisions, name: str, rec: CloneRecord) -> int:
    """A remembered clone the host lacks, decided once. Returns whether it failed (0/1)."""
    ctx = d.ctx
    if ctx.lost(rec):  # it may exist there, in use: kept, slot and name held
        lost = rec if rec.lost_since is not None else replace(rec, lost_since=ctx.now)
        d.set(name, lost, ())
        return 0
    step = advance_missing(ctx, rec)
    forget = (ForgetClone(pool=ctx.spec.name, clone=name),) if step.record is None else ()
    d.set(name, step.record, forget)
    return step.failed


def settle(
    d: Decisions,
    observed: Observed,
    record: PoolRecord,
    failed: int,
    came_up: int,
    census: Census | None = None,
) -> tuple[int, float | None]:
    """Once every clone is decided: the breaker, resize (on `census`, else count(d)) and the
    rollout's pacing. Returns the pool's consecutive failures and breaker."""
    ctx = d.ctx
    failures, until = breaker_after(ctx.spec, record, failed, came_up, ctx.now)
    resize(d, observed.base_ready, until is not None and ctx.now < until, census)
    pace(d, record)
    return failures, until


def in_order(
    d: Decisions, observed: Observed, record: PoolRecord, failures: int, until: float | None
) -> list[Action]:
    """What the settled pass does: each clone's actions in order, orphan backends, the
    pool's record."""
    ctx = d.ctx
    out = _in_order(d, record)
    out += orphan_actions(ctx.spec.name, observed.orphan_backends, _unseen(ctx, record))
    memory = (ctx.target, failures, until, ctx.rollout_started)
    if memory != (
        record.target_version,
        record.failures,
        record.breaker_open_until,
        record.rollout_started_at,
    ):  # most passes change nothing the pool's record holds: no record to build
        out.append(
            RecordPool(
                pool=ctx.spec.name,
                target_version=ctx.target,
                failures=failures,
                breaker_open_until=until,
                rollout_started_at=ctx.rollout_started,
            )
        )
    return out


def _unseen(ctx: Context, record: PoolRecord) -> frozenset[str]:
    """Clones on a lost host: their backends are drained, never removed."""
    if not ctx.lost_hosts:
        return frozenset()
    return frozenset(n for n, r in record.clones.items() if r.host in ctx.lost_hosts)


def _in_order(d: Decisions, record: PoolRecord) -> list[Action]:
    """Per clone: balancer take-out, hypervisor actions, balancer put-in, the new record."""
    out: list[Action] = []
    seen = d.observed
    pool = d.ctx.spec.name
    for name, hyper in d.actions.items():
        if name in d.quiet:
            continue
        nxt = d.records.get(name)
        oc = seen.get(name)
        if oc is not None:
            before, after = balancer_actions(d.ctx, oc, nxt, hyper)
            if nxt is not None and oc.backend is None and _adds(after):
                # a backend the balancer adds now counts from 0: the baseline is written
                # before the add, so a session right after it is evidence even if the
                # keeper dies before its next pass
                nxt = replace(nxt, sessions_seen=0)
            out += before
            out += hyper
            out += after
        else:
            out += hyper
        if nxt is not None:
            prev = record.clones.get(name)
            if nxt is not prev and nxt != prev:
                out.append(RecordClone(pool=pool, clone=name, record=nxt))
    return out


def _adds(actions: tuple[Action, ...]) -> bool:
    return any(isinstance(a, BalancerEnable) for a in actions)


def logins_in(record: PoolRecord, actions: Iterable[Action]) -> int:
    """How many users arrived at a desktop in this pass's plan: a clone recorded in use that
    was free (or booting, suspended, stopped) before. Reconnects and adoptions do not count."""
    count = 0
    for action in actions:
        if isinstance(action, RecordClone) and action.record.state is _IN_USE:
            before = record.clones.get(action.clone)
            if before is not None and before.state in _ARRIVING:
                count += 1
    return count
