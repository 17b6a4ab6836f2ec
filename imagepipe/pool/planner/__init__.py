"""The pool planner: what to do about the difference between wanted and observed.

    plan(spec, observed, record, now) -> list[Action]

Pure: no I/O, no clock, no randomness. docs/pools.md ("Rules") states the rules in
words; each module here holds one group of them:

    passes.py          plan() and the steps of a pass, which the simulator also calls
    states.py          classify(): the state a pass gives one clone, for `status`
    sessions.py        whether somebody is on a clone (live, or its users read unanswered)
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

The names below are loaded from their modules when first asked for (as imagepipe.config
does), so a reader of one of them (`imagepipe status`: classify, free_target, session_unread)
does not load the rules that build actions (pool/actions.py) with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagepipe.pool.planner.failures import (
        CLONE_RETRIES,
        failures_after,
        record_failure,
        retry_delay,
    )
    from imagepipe.pool.planner.passes import (
        context,
        decide,
        decide_missing,
        in_order,
        logins_in,
        plan,
        settle,
    )
    from imagepipe.pool.planner.schedule import free_target, free_target_until
    from imagepipe.pool.planner.sessions import session_live, session_unread
    from imagepipe.pool.planner.states import classify
    from imagepipe.pool.planner.timers import next_timer

_HOMES = {
    "CLONE_RETRIES": "imagepipe.pool.planner.failures",
    "classify": "imagepipe.pool.planner.states",
    "context": "imagepipe.pool.planner.passes",
    "decide": "imagepipe.pool.planner.passes",
    "decide_missing": "imagepipe.pool.planner.passes",
    "failures_after": "imagepipe.pool.planner.failures",
    "free_target": "imagepipe.pool.planner.schedule",
    "free_target_until": "imagepipe.pool.planner.schedule",
    "in_order": "imagepipe.pool.planner.passes",
    "logins_in": "imagepipe.pool.planner.passes",
    "next_timer": "imagepipe.pool.planner.timers",
    "plan": "imagepipe.pool.planner.passes",
    "record_failure": "imagepipe.pool.planner.failures",
    "retry_delay": "imagepipe.pool.planner.failures",
    "session_live": "imagepipe.pool.planner.sessions",
    "session_unread": "imagepipe.pool.planner.sessions",
    "settle": "imagepipe.pool.planner.passes",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(importlib.import_module(home), name)
    globals()[name] = found
    return found


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
    "logins_in",
    "next_timer",
    "plan",
    "record_failure",
    "retry_delay",
    "session_live",
    "session_unread",
    "settle",
]
