"""What the planner asks the executor to do: Action and its kinds (CreateClone, ResetClone,
BalancerDrain, RecordClone, ...), one per step the executor knows how to take.

Frozen records (imagepipe.record: dataclasses made at first use): no I/O. plan() returns them, the
executor runs them, the store's journal keeps them as JSON (pool/codec.py) and the store
applies the record ones (RecordClone, ForgetClone, RecordPool). Kept apart from the model so
that reading a pool's state (`imagepipe status`) does not build these classes.
"""

from __future__ import annotations

# needed at run time, not only for mypy: the codec reads the fields' types by name here
from imagepipe.pool.model import CloneRecord, Endpoint
from imagepipe.record import Record


class Action(Record):
    """Something the executor does. Every action is idempotent.

    Keyword-only: CreateClone(pool="lab", clone="lab-3", slot=3, ...). Pool-level actions
    (RecordPool) leave `clone` empty.
    """

    pool: str
    clone: str = ""

    @property
    def kind(self) -> str:
        return type(self).__name__


class CreateClone(Action):
    slot: int
    version: int
    display: Endpoint
    host: str = ""  # where placement put it ("": the only host)


class StartClone(Action):
    """Power the clone on."""


class StopClone(Action):
    graceful_timeout: float = 60.0


class ResetClone(Action):
    """Restore the clean state and start again."""


class SuspendClone(Action):
    """Suspend an idle clone (standby: suspend)."""


class ResumeClone(Action):
    """Resume a suspended clone."""


class DeleteClone(Action):
    """Power off and remove the clone with its disks."""


class BalancerEnable(Action):
    """Add the clone to the balancer, or set it ready again (cancels a drain)."""

    address: Endpoint


class BalancerDrain(Action):
    """No new connections; existing ones stay."""


class BalancerRemove(Action):
    """Remove the backend (only done when it has no connections)."""


class RecordClone(Action):
    """Write this clone's record to the store (state transitions and timers)."""

    record: CloneRecord


class ForgetClone(Action):
    """Drop the clone's record: it is gone from the hypervisor."""


class RecordPool(Action):
    """Write pool-level memory: rollout target, failure count, breaker."""

    target_version: int | None
    failures: int
    breaker_open_until: float | None
    rollout_started_at: float | None = None
