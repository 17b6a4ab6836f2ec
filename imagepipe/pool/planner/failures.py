"""Failure policy, in one place: what a failed action or boot means for its clone (retry with
backoff, or give up and replace it) and for its pool (the circuit breaker).

The executor only reports outcomes; the keeper hands the failed ones to failures_after(),
and plan() uses the same rules for the failures it sees itself (a boot that timed out, a
crashed guest). The retry budget is checked when a failure is recorded: the failure that
spends it marks the clone for replacement at once, not after one more backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imagepipe.pool.actions import Action, CreateClone, RecordClone, RecordPool, StartClone
from imagepipe.pool.model import CloneRecord, CloneState, PoolRecord, PoolSpec
from imagepipe.record import replace

CLONE_RETRIES = 3  # failed attempts on one clone before it is deleted and replaced
HOST_MAX_FAILURES = 3  # consecutive failed creates/starts on one host that open its breaker


def retry_delay(spec: PoolSpec, failures: int) -> float:
    """Backoff before the next attempt: retry_backoff, doubling per consecutive failure."""
    return float(spec.retry_backoff * 2 ** max(failures - 1, 0))


def record_failure(spec: PoolSpec, record: CloneRecord, now: float) -> CloneRecord:
    """The record of a clone whose action just failed: FAILED, one more failure, and the
    moment of its next attempt; none when this failure spent the retry budget."""
    failures = record.failures + 1
    retry_at = None if failures >= CLONE_RETRIES else now + retry_delay(spec, failures)
    return replace(record, state=CloneState.FAILED, since=now, failures=failures, retry_at=retry_at)


def gave_up(record: CloneRecord) -> bool:
    """The clone spent its retry budget: it is deleted (or forgotten) and replaced."""
    return record.failures >= CLONE_RETRIES


def breaker_after(
    spec: PoolSpec, record: PoolRecord, failed: int, came_up: int, now: float
) -> tuple[int, float | None]:
    """The pool's (consecutive failures, breaker open until) after `failed` failures and
    `came_up` clones coming up ready. `max_failures` consecutive failures open the breaker
    for `breaker_cooldown`; after it the pool is half-open: one more failure reopens it."""
    failures, until = record.failures, record.breaker_open_until
    if until is not None and now >= until:
        until = None
        failures = min(failures, max(spec.max_failures - 1, 0))
    if came_up:
        failures = 0
    failures += failed
    if until is None and failed and failures >= spec.max_failures:
        until = now + spec.breaker_cooldown
    return failures, until


@dataclass(frozen=True)
class HostBreaker:
    """One host's circuit breaker: its consecutive failed creates/starts (any pool) and,
    once HOST_MAX_FAILURES of them opened it, until when placement leaves the host alone."""

    failures: int = 0
    open_until: float | None = None

    def is_open(self, now: float) -> bool:
        return self.open_until is not None and now < self.open_until


def host_breaker_after(
    breaker: HostBreaker, failed: int, succeeded: int, cooldown: float, now: float
) -> HostBreaker:
    """The host's breaker after `failed` failed and `succeeded` successful creates/starts
    there; the same rule as the pool's (breaker_after): after the cool-down it is half-open,
    one more failure reopens it, a success closes it."""
    failures, until = breaker.failures, breaker.open_until
    if until is not None and now >= until:
        until = None
        failures = HOST_MAX_FAILURES - 1
    if succeeded:
        failures = 0
    failures += failed
    if until is None and failed and failures >= HOST_MAX_FAILURES:
        until = now + cooldown
    return HostBreaker(failures, until)


def breaker_open(record: PoolRecord, now: float) -> bool:
    return record.breaker_open_until is not None and now < record.breaker_open_until


def counts_against_pool(action: Action) -> bool:
    """A failed create or start says something about the pool (its base, its host)."""
    return isinstance(action, CreateClone | StartClone)


def failures_after(
    spec: PoolSpec,
    record: PoolRecord,
    failed: Sequence[Action],
    now: float,
    host_blamed: Callable[[Action], bool] = lambda action: False,
) -> list[Action]:
    """The records to write for the hypervisor actions that failed in a pass. A failed
    balancer action is not the clone's fault: the next pass simply tries again. A failure
    `host_blamed` (its host's breaker is open and other hosts can take desktops) counts for
    its clone but not toward the pool's breaker, which is there for a broken image."""
    out: list[Action] = []
    against_pool = 0
    for action in failed:
        if action.kind.startswith("Balancer") or action.pool != spec.name:
            continue
        clone = record.clones.get(action.clone)
        if clone is not None:
            failed_clone = record_failure(spec, clone, now)
            out.append(RecordClone(pool=spec.name, clone=action.clone, record=failed_clone))
        against_pool += counts_against_pool(action) and not host_blamed(action)
    if against_pool:
        failures, until = breaker_after(spec, record, against_pool, 0, now)
        out.append(
            RecordPool(
                pool=spec.name,
                target_version=record.target_version,
                failures=failures,
                breaker_open_until=until,
                rollout_started_at=record.rollout_started_at,
            )
        )
    return out
