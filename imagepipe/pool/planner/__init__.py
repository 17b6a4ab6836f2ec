"""The pool planner: what to do about the difference between wanted and observed.

    plan(spec, observed, record, now) -> list[Action]

Pure: no I/O, no clock, no randomness. docs/pools.md ("Rules") states the rules in
words; each module here holds one group of them:

    clones.py          one clone: quiet, in use, recycle, reset, failed, booting, ...
    resize.py          the pool: count, grow (resume before create), shrink
    ../rollout/rules.py  which version, when the rollout started, the drain deadline, and
                       an active rollout's blue/green pacing (surge, canary, pause): the
                       rollout's own package, called here with this pass
    balancer_rules.py  who serves, who is drained or removed, orphan backends
    failures.py        retries with backoff, the retry budget, the circuit breaker
    schedule.py        the free target after the pool's schedule (and learned warm-up):
                       the one function resize, rollouts, their dry run and status use
    forecast.py        learned warm-up: logins to expect by time of week, from past days
    timers.py          when plan() could next answer differently

A pass plans once and is linear in the number of clones: every clone is advanced once,
then the pool is resized, then each clone's balancer actions follow from its new state.
Actions for one clone are listed in the order they must run (take it out of the balancer,
act on the hypervisor, put it in the balancer, remember the new record).
"""

from __future__ import annotations

from dataclasses import replace

from imagepipe.errors import BadInputError
from imagepipe.pool.actions import Action, BalancerEnable, ForgetClone, RecordClone, RecordPool
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    RolloutPolicy,
)
from imagepipe.pool.planner.balancer_rules import balancer_actions, orphan_actions
from imagepipe.pool.planner.clones import (
    advance,
    advance_missing,
    quiet,
    session_live,
    session_unread,
)
from imagepipe.pool.planner.failures import (
    CLONE_RETRIES,
    breaker_after,
    breaker_open,
    failures_after,
    record_failure,
    retry_delay,
)
from imagepipe.pool.planner.placement import Placer
from imagepipe.pool.planner.resize import Census, Decisions, resize
from imagepipe.pool.planner.schedule import free_target, free_target_until
from imagepipe.pool.planner.steps import Context, remembered
from imagepipe.pool.planner.timers import next_timer
from imagepipe.pool.rollout.rules import (
    drain_deadline_passed,
    old_exists,
    pace,
    policy_of,
    rollout_started,
    target_of,
)

__all__ = [
    "CLONE_RETRIES",
    "classify",
    "context",
    "decide",
    "decide_missing",
    "failures_after",
    "free_target",
    "free_target_until",
    "in_order",
    "next_timer",
    "plan",
    "record_failure",
    "retry_delay",
    "session_live",
    "session_unread",
    "settle",
]


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


def classify(
    spec: PoolSpec,
    observed_clone: ObservedClone | None,
    record: CloneRecord | None,
    now: float,
    *,
    target_version: int | None = None,
    rollout: RolloutPolicy | None = None,
) -> CloneState:
    """The state the planner gives this clone at `now` (for `status`).

    Without `target_version` no rollout is assumed; `rollout` is an active rollout's policy
    (old free desktops it still holds show as free). A clone that is gone and forgotten
    reports its last remembered state.
    """
    ctx = Context(
        spec=spec,
        now=now,
        target=target_version,
        assigned=frozenset(spec.assignments.values()),
        breaker_open=False,
        rollout_started=None,
        drain_deadline_passed=False,
        rollout=rollout if rollout is not None and rollout.to_version == target_version else None,
    )
    if observed_clone is not None:
        nxt = advance(ctx, observed_clone, record).record
    elif record is not None:
        nxt = advance_missing(ctx, record).record
    else:
        raise BadInputError("classify needs an observed clone or a record of one")
    if nxt is not None:
        return nxt.state
    assert record is not None
    return record.state
