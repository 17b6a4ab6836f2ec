"""Taking a pool down (`imagepipe pools down`): the planner's rule for a pool marked down.

    plan_down(spec, observed, record, down, now) -> list[Action]

Pure, like plan(), and used instead of it for a pool the store has marked down:

- no desktop is made, started, reset or resumed;
- every desktop leaves the balancer: drained at once, its entry removed once it has no
  connection (an entry is never removed under a connection);
- a desktop nobody is on is deleted at once; one with a live session (a client connected, or
  a user logged in and disconnected less than disconnect_timeout ago) is drained and marked
  retiring, and deleted in the first pass after its session ends;
- `down.now` deletes every desktop at once, sessions or not (the CLI warns first);
- records of desktops that are gone are forgotten, orphan balancer entries removed; a desktop
  on a lost host (it may still run there) keeps its record and its entry is only drained.

The pool is down when this returns no action and the host has none of its desktops or entries.
"""

from __future__ import annotations

from imagepipe.pool.actions import (
    Action,
    BalancerDrain,
    BalancerRemove,
    DeleteClone,
    ForgetClone,
    RecordClone,
)
from imagepipe.pool.model import (
    BackendState,
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolDown,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.planner import session_live
from imagepipe.record import replace


def plan_down(
    spec: PoolSpec, observed: Observed, record: PoolRecord, down: PoolDown, now: float
) -> list[Action]:
    """Every action that moves the pool towards having no desktop and no balancer entry."""
    out: list[Action] = []
    seen = {c.name for c in observed.clones}
    # on a lost host: may still run there, in use; kept until the host is back, drained only
    unseen = {n for n, r in record.clones.items() if r.host in observed.lost_hosts}
    for oc in observed.clones:
        out += _one(spec, oc, record.clones.get(oc.name), down, now)
    for name in record.clones:
        if name not in seen and name not in unseen:
            out.append(ForgetClone(pool=spec.name, clone=name))
    for backend in observed.orphan_backends:
        if backend.name in unseen:
            if backend.state is BackendState.READY:
                out.append(BalancerDrain(pool=spec.name, clone=backend.name))
        elif backend.connections == 0:
            out.append(BalancerRemove(pool=spec.name, clone=backend.name))
        elif backend.state is BackendState.READY:
            out.append(BalancerDrain(pool=spec.name, clone=backend.name))
    return out


def _one(
    spec: PoolSpec, oc: ObservedClone, rec: CloneRecord | None, down: PoolDown, now: float
) -> list[Action]:
    pool, name, backend = spec.name, oc.name, oc.backend
    staying = not down.now and session_live(spec, oc.session, rec, now)
    state = CloneState.RETIRING if staying else CloneState.DELETING
    out: list[Action] = []
    if backend is not None:
        if backend.connections == 0 and not staying:
            out.append(BalancerRemove(pool=pool, clone=name))
        elif backend.state is BackendState.READY:
            out.append(BalancerDrain(pool=pool, clone=name))
    if not staying:
        out.append(DeleteClone(pool=pool, clone=name))
    if rec is None:
        info = oc.info
        new = CloneRecord(name=name, slot=info.slot, version=info.version, state=state, since=now)
        out.append(RecordClone(pool=pool, clone=name, record=new))
    elif rec.state is not state:
        out.append(RecordClone(pool=pool, clone=name, record=replace(rec, state=state, since=now)))
    return out
