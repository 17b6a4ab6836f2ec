"""Resizing a pool, once its clones are decided: count what it has, grow (resume before
create, retry failed creates, fill assigned slots, then the lowest free slots), shrink one
idle clone per pass. Only clones of the target version count."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from imagepipe.pool.actions import (
    Action,
    CreateClone,
    DeleteClone,
    ForgetClone,
    ResetClone,
    ResumeClone,
    SuspendClone,
)
from imagepipe.pool.model import CloneRecord, CloneState, Endpoint, ObservedClone, Power, Standby
from imagepipe.pool.planner.failures import gave_up
from imagepipe.pool.planner.forecast import shrink_after
from imagepipe.pool.planner.placement import Placer
from imagepipe.pool.planner.steps import Context, moved

# Enum members named once: Python 3.11 reads `CloneState.FREE` through the slow path of
# EnumType.__getattr__ (some 15 times a module name's cost), and these are read per clone,
# per pass.
CREATING, BOOTING, FREE = CloneState.CREATING, CloneState.BOOTING, CloneState.FREE
SUSPENDED, RECYCLING = CloneState.SUSPENDED, CloneState.RECYCLING
DELETING, FAILED = CloneState.DELETING, CloneState.FAILED
POWER_SUSPENDED = Power.SUSPENDED


@dataclass(slots=True)
class Decisions:
    """What one pass has decided so far, clone by clone, in the order first decided."""

    ctx: Context
    observed: Mapping[str, ObservedClone]
    records: dict[str, CloneRecord] = field(default_factory=dict)
    actions: dict[str, tuple[Action, ...]] = field(default_factory=dict)
    quiet: set[str] = field(default_factory=set)  # kept as they are, with nothing to output
    returned: set[str] = field(default_factory=set)  # seen again after their host was lost

    def keep_quiet(self, name: str, record: CloneRecord) -> None:
        """A quiet clone (clones.quiet): counted by resize, no output unless resize acts."""
        self.records[name] = record
        self.actions[name] = ()
        self.quiet.add(name)

    def set(self, name: str, record: CloneRecord | None, actions: tuple[Action, ...]) -> None:
        self.quiet.discard(name)
        self.actions[name] = self.actions.get(name, ()) + actions
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = record


@dataclass(slots=True)
class Census:
    """The pool's clones of the target version, as this pass leaves them."""

    ready_free: int = 0  # free, ready, shared
    coming: int = 0  # shared clones being created or booting
    counted: int = 0  # towards max (creates in flight and deletes included)
    alive: int = 0  # towards initial
    running: int = 0  # alive and not suspended
    used_slots: set[int] = field(default_factory=set)  # slots any clone or record holds
    more_used: Collection[int] = ()  # more held slots, kept by the caller (the simulator's)
    shrinkable: list[CloneRecord] = field(default_factory=list)  # idle past shrink_after
    suspended: list[CloneRecord] = field(default_factory=list)  # can be resumed
    retries: list[CloneRecord] = field(default_factory=list)  # failed creates, due again
    returned: list[CloneRecord] = field(default_factory=list)  # free, back from a lost host
    recycling: list[CloneRecord] = field(default_factory=list)  # session over, reset due


def resize(
    d: Decisions, base_ready: bool, breaker_open: bool, census: Census | None = None
) -> None:
    """Reach `initial`, keep the free target (resume before create), shrink one step.
    `census`: what count(d) gives (counted here when not given)."""
    if d.ctx.target is None:
        return
    census = count(d) if census is None else census
    wanted = d.ctx.free_target
    need = max(wanted - census.ready_free - census.coming, d.ctx.spec.initial - census.alive, 0)
    need = grow(d, census, need, can_create=base_ready and not breaker_open)
    if need == 0:
        drop_replaced(d, census, wanted)
        drop_over_max(d, census)
        shrink(d, census, wanted)


def count(d: Decisions) -> Census:
    c = Census()
    idle_for = shrink_after(d.ctx.spec, d.ctx.arrivals)
    for name, rec in d.records.items():
        tally(c, d, name, rec, idle_for)
    return c


def tally(c: Census, d: Decisions, name: str, rec: CloneRecord, idle_for: float) -> None:
    """Count one decided clone into the census (`idle_for`: shrink_after this pass)."""
    ctx = d.ctx
    now, target = ctx.now, ctx.target
    state, shared = rec.state, rec.slot not in ctx.assigned
    c.used_slots.add(rec.slot)
    if ctx.lost(rec) and name not in d.observed:
        return  # on a lost host: its slot is held, it is not counted (replaced)
    if name not in d.observed:  # a create in flight, or a failed one
        due = state is FAILED and now >= (rec.retry_at or now)
        if due:
            c.retries.append(rec)
        if rec.version == target and (state is CREATING or (state is FAILED and not due)):
            c.counted += 1
            c.alive += 1
            c.coming += shared
        return
    if rec.version != target:
        return
    c.counted += 1
    if state is FREE:
        c.alive += 1
        c.running += 1
        if shared and d.observed[name].info.ready is not None:  # unknown: not relied on
            c.ready_free += 1
            if name in d.returned and not d.actions.get(name):
                c.returned.append(rec)
            if now - rec.since >= idle_for:
                c.shrinkable.append(rec)
    elif state is SUSPENDED:
        c.alive += 1
        if shared and not d.actions.get(name) and d.observed[name].info.power is POWER_SUSPENDED:
            c.suspended.append(rec)
    elif state is not DELETING:
        c.alive += 1
        c.running += 1
        coming = state is BOOTING or state is CREATING
        if shared and coming and d.observed[name].info.ready is not None:
            c.coming += 1
            if name in d.returned and _resets_only(d.actions.get(name, ())):
                c.returned.append(rec)  # used while unseen: its reset may be spared
        elif state is RECYCLING and shared:
            pending = d.actions.get(name, ())
            if not pending or _resets_only(pending):  # nobody on it: deleted instead, over max
                c.recycling.append(rec)


def grow(d: Decisions, census: Census, need: int, *, can_create: bool) -> int:
    """Resume suspended clones first, then retry failed creates, make the assigned slots'
    clones, and new clones in the lowest free slots. Returns how many are still needed."""
    ctx = d.ctx
    spec = ctx.spec
    resumed = sorted(census.suspended, key=lambda r: r.slot)[:need] if need > 0 else []
    for rec in resumed:
        resume = ResumeClone(pool=spec.name, clone=rec.name)
        d.set(rec.name, moved(ctx, rec, BOOTING), (resume,))
        need -= 1
    room = spec.max - census.counted
    used = census.used_slots
    for rec in sorted(census.retries, key=lambda r: r.slot):
        reserved = rec.slot in ctx.assigned
        if gave_up(rec) or not (reserved or need > 0):
            d.set(rec.name, None, (ForgetClone(pool=spec.name, clone=rec.name),))
        elif can_create and room > 0 and _create(d, rec.slot, rec.failures):
            room -= 1
            need -= not reserved
    if not can_create or not (ctx.assigned or need > 0):
        return need  # no slot to fill
    held = census.more_used  # read where it is kept: copying it into `used` cost more
    for slot in sorted(ctx.assigned):
        free = slot not in used and slot not in held
        if room > 0 and free and slot < spec.slots and _create(d, slot):
            used.add(slot)
            room -= 1
    free_slots = _free_slots(spec.slots, used, held, ctx.assigned)
    while need > 0 and room > 0:
        free_slot = next(free_slots, None)
        if free_slot is None or not _create(d, free_slot):
            break
        need -= 1
        room -= 1
    return need


def drop_replaced(d: Decisions, census: Census, wanted_free: int) -> None:
    """Free desktops back from a lost host that the pool replaced meanwhile: deleted at once
    while the pool keeps its free target without them (or is over `max`)."""
    spec = d.ctx.spec
    for rec in sorted(census.returned, key=lambda r: r.slot):
        serving = census.ready_free + census.coming
        if serving - 1 < wanted_free and census.counted <= spec.max:
            break
        delete = DeleteClone(pool=spec.name, clone=rec.name)
        d.actions[rec.name] = ()  # a reset it was due is not needed: it goes
        d.set(rec.name, moved(d.ctx, rec, DELETING), (delete,))
        if rec.state is FREE:
            census.ready_free -= 1
        else:
            census.coming -= 1
        census.counted -= 1
        census.running -= 1
        if rec in census.shrinkable:
            census.shrinkable.remove(rec)


def drop_over_max(d: Decisions, census: Census) -> None:
    """A pool over `max` (a host came back with desktops in use after the pool refilled
    without them) deletes a desktop whose session just ended instead of resetting it into
    one more free desktop than it may have."""
    spec = d.ctx.spec
    if census.counted <= spec.max:
        return  # the usual pass: nothing to sort
    for rec in sorted(census.recycling, key=lambda r: -r.slot):
        if census.counted <= spec.max:
            break
        d.actions[rec.name] = ()  # the reset it was due is not needed: it goes
        delete = DeleteClone(pool=spec.name, clone=rec.name)
        d.set(rec.name, moved(d.ctx, rec, DELETING), (delete,))
        census.counted -= 1
        census.running -= 1


def _resets_only(actions: tuple[Action, ...]) -> bool:
    return len(actions) == 1 and isinstance(actions[0], ResetClone)


def shrink(d: Decisions, census: Census, wanted_free: int) -> None:
    """One idle surplus clone per pass, the one idle longest: deleted, or suspended with
    standby: suspend. Never below the free target or below `initial` running clones."""
    spec = d.ctx.spec
    if (
        not census.shrinkable
        or census.ready_free - 1 < wanted_free
        or census.running - 1 < spec.initial
    ):
        return
    victim = min(census.shrinkable, key=lambda r: (r.since, -r.slot))
    if spec.standby is Standby.SUSPEND:
        suspend = SuspendClone(pool=spec.name, clone=victim.name)
        d.set(victim.name, moved(d.ctx, victim, SUSPENDED), (suspend,))
    else:
        delete = DeleteClone(pool=spec.name, clone=victim.name)
        d.set(victim.name, moved(d.ctx, victim, DELETING), (delete,))


def _free_slots(
    slots: int, used: set[int], held: Collection[int], reserved: frozenset[int]
) -> Iterator[int]:
    """The slots below `slots` that no clone holds and no assignment reserves, lowest first
    (`held` first: where the caller keeps most of the taken ones, it answers most slots)."""
    for slot in range(slots):
        if slot not in held and slot not in used and slot not in reserved:
            yield slot


def _create(d: Decisions, slot: int, failures: int = 0) -> bool:
    """Make the clone of `slot` on the host placement picks; False: no host has room."""
    spec, now, target = d.ctx.spec, d.ctx.now, d.ctx.target
    assert target is not None
    placer = d.ctx.placer or Placer(())
    host = placer.pick(spec.memory)
    if host is None:
        return False
    name = spec.clone_name(slot)
    rec = CloneRecord(
        name=name,
        slot=slot,
        version=target,
        state=CREATING,
        since=now,
        failures=failures,
        host=host.name,
    )
    display = Endpoint(host.address or spec.display_address, spec.port_for(slot))
    create = CreateClone(
        pool=spec.name, clone=name, slot=slot, version=target, display=display, host=host.name
    )
    d.set(name, rec, (create,))
    return True
