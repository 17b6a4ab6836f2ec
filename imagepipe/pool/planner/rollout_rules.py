"""Rollout rules: which version a pool runs, when its rollout started, when the drain
deadline has passed. The per-clone consequences (old clones get no new users, are deleted
when free or when their session ends, or at the deadline) are in clones.py."""

from __future__ import annotations

from imagepipe.pool.model import Observed, PoolRecord, PoolSpec


def target_of(observed: Observed, record: PoolRecord) -> int | None:
    """What the channel resolves to now; the remembered target when the registry could not
    say this pass."""
    return observed.target_version if observed.target_version is not None else record.target_version


def old_exists(record: PoolRecord, target: int | None, observed: Observed) -> bool:
    """A clone or a record of a version other than the target."""
    return target is not None and (
        any(c.info.version != target for c in observed.clones)
        or any(r.version != target for r in record.clones.values())
    )


def rollout_started(record: PoolRecord, target: int | None, old: bool, now: float) -> float | None:
    """When clones of another version began retiring; None when none are left."""
    if target is None or not old:
        return None
    if record.target_version != target or record.rollout_started_at is None:
        return now
    return record.rollout_started_at


def drain_deadline_passed(spec: PoolSpec, started: float | None, now: float) -> bool:
    """Retiring clones are deleted even with a session: the only case a live session is cut."""
    deadline = spec.drain_deadline
    return deadline is not None and started is not None and now - started >= deadline
