"""Balancer rules: free clones of the target version serve; every other clone is drained,
and removed once it has no connections and is being deleted or reset; orphan backends go."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from imagepipe.pool.actions import Action, BalancerDrain, BalancerEnable, BalancerRemove, ResetClone
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneRecord,
    CloneState,
    Endpoint,
    ObservedClone,
)
from imagepipe.pool.planner.steps import Context

# Enum members named once: Python 3.11 reads `CloneState.FREE` through the slow path of
# EnumType.__getattr__ (some 15 times a module name's cost), and these are read per clone,
# per pass.
FREE, DELETING = CloneState.FREE, CloneState.DELETING
BACKEND_READY = BackendState.READY

NOTHING: tuple[tuple[Action, ...], tuple[Action, ...]] = ((), ())


def balancer_actions(
    ctx: Context, oc: ObservedClone, rec: CloneRecord | None, hyper: tuple[Action, ...]
) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    """(take-out actions before the clone's hypervisor actions, put-in actions after)."""
    backend, info = oc.backend, oc.info
    state = rec.state if rec is not None else DELETING
    serves = (
        state is FREE
        and not hyper
        and (info.version == ctx.target or ctx.rollout is not None)  # old: held (rollout/rules.py)
        and info.slot not in ctx.assigned
        and rec is not None
        and (not rec.dirty or ctx.persistent(info.slot))  # a dirty shared clone never serves
    )
    pool = ctx.spec.name
    if serves:
        if info.ready is None:  # readiness unread: no new user is sent to it on that read
            return NOTHING
        if backend is None or backend.state is not BACKEND_READY:
            address = info.display or Endpoint(
                ctx.spec.display_address, ctx.spec.port_for(info.slot)
            )
            return (), (BalancerEnable(pool=pool, clone=info.name, address=address),)
        return NOTHING
    if backend is None:
        return NOTHING
    leaving = state is DELETING or any(isinstance(a, ResetClone) for a in hyper)
    if leaving and backend.connections == 0:
        return (BalancerRemove(pool=pool, clone=info.name),), ()
    if backend.state is BACKEND_READY:
        return (BalancerDrain(pool=pool, clone=info.name),), ()
    return NOTHING


def orphan_actions(
    pool: str, orphans: Sequence[Backend], unseen: Collection[str] = ()
) -> list[Action]:
    """Backends of this pool with no clone: removed when idle, drained until then. The
    backend of a clone on a lost host (`unseen`) is only drained: a connection that still
    reaches the desktop is left alone, and its session counter stays the evidence of use."""
    out: list[Action] = []
    for backend in orphans:
        if backend.name in unseen:
            if backend.state is BACKEND_READY:
                out.append(BalancerDrain(pool=pool, clone=backend.name))
        elif backend.connections == 0:
            out.append(BalancerRemove(pool=pool, clone=backend.name))
        elif backend.state is BACKEND_READY:
            out.append(BalancerDrain(pool=pool, clone=backend.name))
    return out
