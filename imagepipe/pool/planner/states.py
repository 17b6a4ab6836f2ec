"""The state the planner gives a clone, for `imagepipe status`: the per-clone rules of a pass
(clones.py) run on one clone, their actions dropped.
"""

from __future__ import annotations

from imagepipe.errors import BadInputError
from imagepipe.pool.model import CloneRecord, CloneState, ObservedClone, PoolSpec, RolloutPolicy
from imagepipe.pool.planner.steps import Context


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
    # the rules build the actions they would take (pool/actions.py): imported on the first
    # clone classified, so `imagepipe status` loads neither to start (nor with no clones)
    from imagepipe.pool.planner.clones import advance, advance_missing

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
