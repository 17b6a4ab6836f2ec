"""plan()'s answer, pass after pass, for one simulated pool, without deciding every quiet
clone again.

A keeper pass hands plan() the whole pool and plan() decides every clone, although in a busy
pool most of them are quiet (planner/clones.py `quiet`: in use by the same user, free and
serving, suspended) and stay so for hundreds of passes. The simulator knows which clones
changed between two passes (World.changes() and the records it writes itself), so the
Replanner sets quiet clones aside and runs the planner's own steps (context, decide,
decide_missing, settle, in_order) on the others only, in plan()'s order:

- a quiet clone stays quiet while its observation and its record are the objects the pass
  that found it quiet saw, and the pool spec and target version are the same; a pass with
  what quiet() reads beside those (touched clones, lost or draining hosts) or with an active
  rollout (whose pacing reads every record) is plan() itself, and the next pass starts over;
- resize gets the census count() would give: the clones decided this pass counted by
  `tally`, the quiet ones added as tally counts them (of the target version, seen, counted
  and alive; running unless suspended; a free one shared and ready). Of the quiet free
  clones past shrink_after only the idlest is listed: shrink takes the idlest, and nothing
  else reads the list for a quiet clone;
- a quiet clone that resize suspends, resumes or deletes gets its actions where plan() puts
  them (in the order of the observed clones);
- next_timer takes the quiet clones' timers from the free ones' `since` (in use and
  suspended clones have none).

tests/unit/test_sim_replan.py runs plan() beside the Replanner on every pass of seeded days
and compares their answers.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from heapq import merge

from imagepipe.pool.actions import Action
from imagepipe.pool.model import (
    Arrivals,
    CloneRecord,
    CloneState,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
)
from imagepipe.pool.planner import (
    context,
    decide,
    decide_missing,
    free_target,
    free_target_until,
    in_order,
    next_timer,
    plan,
    settle,
)
from imagepipe.pool.planner.forecast import shrink_after
from imagepipe.pool.planner.resize import Census, Decisions, tally
from imagepipe.pool.planner.steps import Context
from imagepipe.pool.planner.timers import clone_timer, pool_timers, soonest
from imagepipe.pool.rollout.rules import target_of
from imagepipe.sim.world import World

_FREE = CloneState.FREE  # named once: Python 3.11 reads a member through its class slowly
_SUSPENDED, _IN_USE = CloneState.SUSPENDED, CloneState.IN_USE
_MARGIN = 1e-3  # a held clone, or a pass, is decided again this long before its timer
# (float rounding: `now - since >= limit` may hold a little before `since + limit`)


@dataclass
class Replanner:
    """plan() for the pool of `world`. The simulation adds the name of every record it
    writes or drops to `written`; the world tells which clones changed."""

    world: World
    written: set[str] = field(default_factory=set)
    _key: tuple[PoolSpec, int | None] | None = None  # what the quiet clones were found under
    _active: set[str] = field(default_factory=set)  # decided every pass
    _quiet: dict[str, CloneRecord] = field(default_factory=dict)
    _free: dict[str, CloneRecord] = field(default_factory=dict)  # quiet and free
    _idlest: list[tuple[float, int, str]] = field(default_factory=list)  # _free by (since, -slot)
    _suspended: dict[str, CloneRecord] = field(default_factory=dict)  # quiet and suspended
    _resumable: dict[str, CloneRecord] = field(default_factory=dict)  # those in shared slots
    _assigned: frozenset[int] = frozenset()  # the reserved slots of the key's spec
    _slots: dict[int, int] = field(default_factory=dict)  # quiet and held clones' slots, counted
    # active clones kept as stored until a timer: (until, in flight, stored record)
    _held: dict[str, tuple[float, bool, CloneRecord]] = field(default_factory=dict)
    # the held clones' census, as tally counted them when they were held (free ones, whose
    # shrinkable reads the clock, are tallied every pass): counted, alive, running, coming
    _held_each: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    _held_sums: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    _held_suspended: dict[str, CloneRecord] = field(default_factory=dict)
    _held_recycling: dict[str, CloneRecord] = field(default_factory=dict)
    _held_free: dict[str, CloneRecord] = field(default_factory=dict)
    _held_under: tuple[bool, bool] = (False, False)  # breaker open, drain deadline passed
    # the last free target: (spec, arrivals, from, until, value)
    _free_target_was: tuple[PoolSpec, Arrivals | None, float, float, int] | None = None
    # the last pass, if it answered nothing: its spec, observation, record and clock, and
    # (once asked) its next_timer; nothing is decided again before that on the same inputs
    _idle_pass: tuple[PoolSpec, Observed, PoolRecord, float] | None = None
    _idle_until: float | None = None

    def plan(
        self, spec: PoolSpec, observed: Observed, record: PoolRecord, now: float
    ) -> list[Action]:
        """What plan(spec, observed, record, now) answers."""
        changed = self.world.changes()
        if self.written:
            changed |= self.written
            self.written = set()
        idle = self._idle_pass
        if (
            not changed
            and idle is not None
            and idle[0] is spec
            and idle[1] is observed
            and idle[2] is record
            and now < self._idle_since(spec, record, idle[3]) - _MARGIN
        ):
            return []  # the same inputs, no timer due: what the last pass answered
        out = self._plan(spec, observed, record, now, changed)
        self._idle_pass = None if out else (spec, observed, record, now)
        self._idle_until = None
        return out

    def _idle_since(self, spec: PoolSpec, record: PoolRecord, at: float) -> float:
        """When the pass at `at` that answered nothing could next answer otherwise."""
        if self._idle_until is None:
            wake = self._next_timer(spec, record, at)
            self._idle_until = float("inf") if wake is None else wake
        return self._idle_until

    def _plan(
        self,
        spec: PoolSpec,
        observed: Observed,
        record: PoolRecord,
        now: float,
        changed: Collection[str],
    ) -> list[Action]:
        if (
            observed.touched
            or observed.lost_hosts
            or observed.draining_hosts
            or record.rollout is not None
        ):
            self._key = None
            return plan(spec, observed, record, now)
        by_name, records = self.world.by_name(), record.clones
        target = target_of(observed, record)
        if (spec, target) != self._key:
            self._start_over((spec, target), by_name, records)
        else:
            for name in changed:
                self._wake(name)
        seen, missing, old = self._sort_active(by_name, records, target)
        ctx = context(spec, observed, record, now, old, self._free_target(spec, record, now))
        d = Decisions(ctx=ctx, observed=by_name)
        self._still_held(ctx)
        failed = came_up = 0
        eventful: set[str] = set()  # failed or came up this pass
        held = self._held
        for name in sorted((n for n in seen if n not in held), key=self.world.order):
            seen_failed, seen_up = decide(d, by_name[name], records.get(name))
            failed += seen_failed
            came_up += seen_up
            if seen_failed or seen_up:
                eventful.add(name)
        for name in [n for n in records if n in missing] if len(missing) > 1 else missing:
            failed += decide_missing(d, name, records[name])
        census = self._census(d) if ctx.target is not None else None
        failures, until = settle(d, observed, record, failed, came_up, census)
        self._in_observed_order(d, by_name)
        out = in_order(d, observed, record, failures, until)
        for name in d.quiet:
            self._rest(name, d.records[name])
        self._hold(d, records, eventful, out)
        return out

    def _sort_active(
        self,
        by_name: Mapping[str, ObservedClone],
        records: Mapping[str, CloneRecord],
        target: int | None,
    ) -> tuple[list[str], set[str], bool]:
        """In one walk over the active clones: forget those neither observed nor stored;
        the observed ones, the stored ones not observed, and whether any is of another
        version than the target (a quiet clone never is)."""
        gone: list[str] = []
        seen: list[str] = []
        missing: set[str] = set()
        old = False
        for name in self._active:
            oc, rec = by_name.get(name), records.get(name)
            if oc is not None:
                seen.append(name)
                old = old or (target is not None and oc.info.version != target)
            elif rec is None:
                gone.append(name)
                continue
            else:
                missing.add(name)
            if rec is not None and target is not None and rec.version != target:
                old = True
        self._active.difference_update(gone)
        return seen, missing, old

    def _free_target(self, spec: PoolSpec, record: PoolRecord, now: float) -> int:
        """free_target(spec, now, record.arrivals), computed again once its window ends."""
        was, arrivals = self._free_target_was, record.arrivals
        if was is not None and was[0] is spec and was[1] is arrivals and was[2] <= now < was[3]:
            return was[4]
        value = free_target(spec, now, arrivals)
        until = free_target_until(spec, now, arrivals)
        self._free_target_was = (spec, arrivals, now, until, value)
        return value

    # ---- clones that wait for a timer --------------------------------------------------

    def _hold(
        self,
        d: Decisions,
        records: Mapping[str, CloneRecord],
        eventful: Collection[str],
        out: list[Action],
    ) -> None:
        """Observed clones the rules kept as stored, with nothing to do (booting, waiting to
        recycle): the same answer until their record's timer, while nothing about them and
        none of the pass-wide values the rules read for them changes."""
        ctx = d.ctx
        acted: set[str | None] | None = None  # what `out` acts on: read once a clone may be held
        idle_for = shrink_after(ctx.spec, ctx.arrivals)
        for name, actions in d.actions.items():
            rec = records.get(name)
            if (
                rec is None
                or actions
                or d.records.get(name) is not rec
                or name in d.quiet
                or name in eventful
                or rec.lost_since is not None
                or name not in d.observed
            ):
                continue
            if acted is None:
                acted = {getattr(a, "clone", None) for a in out}
            if name in acted:
                continue
            at = clone_timer(ctx.spec, rec, idle_for)
            self._held[name] = (
                float("inf") if at is None else at - _MARGIN,
                name in ctx.in_flight,
                rec,
            )
            self._count_held(d, name, rec, idle_for)
        self._held_under = (ctx.breaker_open, ctx.drain_deadline_passed)

    def _count_held(self, d: Decisions, name: str, rec: CloneRecord, idle_for: float) -> None:
        """Keep what tally counts for a clone just held: while it is held its record and
        observation stay the objects of this pass, and the target version and the reserved
        slots those are read against are the same (a change of spec or target starts over)."""
        if rec.state is _FREE:
            self._held_free[name] = rec
            return
        c = Census()
        tally(c, d, name, rec, idle_for)
        each = (c.counted, c.alive, c.running, c.coming)
        self._held_each[name] = each
        self._held_sums = [s + n for s, n in zip(self._held_sums, each, strict=True)]
        self._slots[rec.slot] = self._slots.get(rec.slot, 0) + 1
        if c.suspended:
            self._held_suspended[name] = rec
        if c.recycling:
            self._held_recycling[name] = rec

    def _unhold(self, name: str) -> None:
        """`name` is decided again (its hold ended, or it woke)."""
        held = self._held.pop(name, None)
        if held is None:
            return
        if self._held_free.pop(name, None) is not None:
            return
        each = self._held_each.pop(name)
        self._held_sums = [s - n for s, n in zip(self._held_sums, each, strict=True)]
        self._uncount_slot(held[2].slot)
        self._held_suspended.pop(name, None)
        self._held_recycling.pop(name, None)

    def _uncount_slot(self, slot: int) -> None:
        if self._slots[slot] == 1:
            del self._slots[slot]
        else:
            self._slots[slot] -= 1

    def _still_held(self, ctx: Context) -> None:
        """Drop the holds that this pass's context or clock ends."""
        if (ctx.breaker_open, ctx.drain_deadline_passed) != self._held_under:
            self._unhold_all()
            return
        now, in_flight = ctx.now, ctx.in_flight
        ended = [
            name
            for name, (until, flying, _) in self._held.items()
            if now >= until or (name in in_flight) != flying
        ]
        for name in ended:
            self._unhold(name)

    def _unhold_all(self) -> None:
        for name in list(self._held):
            self._unhold(name)

    def next_timer(self, spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
        """What planner.next_timer answers, right after a pass of plan()."""
        idle = self._idle_pass
        if idle is None or idle[0] is not spec or idle[2] is not record:
            return self._next_timer(spec, record, now)
        if self._idle_until is None or now >= self._idle_until:
            wake = self._next_timer(spec, record, now)
            if now == idle[3]:  # right after the pass that answered nothing
                self._idle_until = float("inf") if wake is None else wake
            return wake
        # after a pass on the same inputs, before the timer: the same timer
        return None if self._idle_until == float("inf") else self._idle_until

    def _next_timer(self, spec: PoolSpec, record: PoolRecord, now: float) -> float | None:
        if self._key is None:
            return next_timer(spec, record, now)
        idle_for = shrink_after(spec, record.arrivals)
        records = record.clones
        timers = [clone_timer(spec, records[n], idle_for) for n in self._active if n in records]
        free = self._free_timer(now, idle_for)
        return soonest(now, *timers, free, *pool_timers(spec, record, now))

    def stored(self, record: PoolRecord, *states: CloneState) -> list[CloneRecord]:
        """The records of `record` in one of `states`, right after a pass of plan() on it:
        the quiet clones' records are the stored ones."""
        records = record.clones
        if self._key is None:
            return [r for r in records.values() if r.state in states]
        out = [records[n] for n in self._active if n in records and records[n].state in states]
        if _FREE in states:
            out += self._free.values()
        if _SUSPENDED in states:
            out += self._suspended.values()
        if _IN_USE in states:  # the other quiet clones
            out += [r for r in self._quiet.values() if r.state is _IN_USE]
        return out

    def idlest(self, record: PoolRecord) -> Iterator[CloneRecord]:
        """The free records of `record`, the longest idle first (by `since`, then the
        higher slot), right after a pass of plan() on it: the quiet ones are kept in that
        order, the others are few."""
        records = record.clones
        names = records if self._key is None else self._active
        free = [records[n] for n in names if n in records and records[n].state is _FREE]
        free.sort(key=_idleness)
        if self._key is None:
            return iter(free)
        quiet = (self._free[name] for _, _, name in self._idlest)
        return merge(free, quiet, key=_idleness)

    # ---- the quiet clones ------------------------------------------------------------

    def _start_over(
        self,
        key: tuple[PoolSpec, int | None],
        by_name: Collection[str],
        records: Collection[str],
    ) -> None:
        for name in list(self._quiet):
            self._wake(name)
        self._unhold_all()  # held under the old target version
        self._active = set(by_name) | set(records)
        self._key = key
        self._assigned = frozenset(key[0].assignments.values())  # as context() reads them

    def _rest(self, name: str, rec: CloneRecord) -> None:
        """`name` was found quiet with the record `rec` (the stored one)."""
        self._active.discard(name)
        self._quiet[name] = rec
        self._slots[rec.slot] = self._slots.get(rec.slot, 0) + 1
        if rec.state is _FREE:
            self._free[name] = rec
            insort(self._idlest, (rec.since, -rec.slot, name))
        elif rec.state is _SUSPENDED:
            self._suspended[name] = rec
            if rec.slot not in self._assigned:
                self._resumable[name] = rec

    def _wake(self, name: str) -> None:
        """`name` is decided again from the next pass on (it changed, or resize acts on it)."""
        self._active.add(name)
        self._unhold(name)
        rec = self._quiet.pop(name, None)
        if rec is None:
            return
        self._uncount_slot(rec.slot)
        if self._free.pop(name, None) is not None:
            del self._idlest[bisect_left(self._idlest, (rec.since, -rec.slot, name))]
        if self._suspended.pop(name, None) is not None:
            self._resumable.pop(name, None)

    def _census(self, d: Decisions) -> Census:
        """count(d) for the whole pool: the clones decided this pass and the quiet ones."""
        ctx = d.ctx
        c = Census()
        idle_for = shrink_after(ctx.spec, ctx.arrivals)
        for name, rec in d.records.items():
            tally(c, d, name, rec, idle_for)
        for name, rec in self._held_free.items():
            tally(c, d, name, rec, idle_for)
        counted, alive, running, coming = self._held_sums
        c.suspended += self._held_suspended.values()
        c.recycling += self._held_recycling.values()
        quiet = len(self._quiet)
        c.counted += quiet + counted
        c.alive += quiet + alive
        c.running += quiet - len(self._suspended) + running
        c.coming += coming
        c.ready_free += len(self._free)  # quiet() holds no free clone in an assigned slot
        c.more_used = self._slots.keys()  # quiet and held; read only when resize creates
        if self._idlest:
            since, _, name = self._idlest[0]
            if ctx.now - since >= idle_for:
                c.shrinkable.append(self._free[name])
        c.suspended += self._resumable.values()  # grow sorts them by slot
        return c

    def _in_observed_order(self, d: Decisions, by_name: Mapping[str, ObservedClone]) -> None:
        """Quiet clones resize acted on: woken, and their actions moved to where plan() has
        them (observed clones first, in their order, then the others as decided)."""
        touched = [n for n in d.actions if n in self._quiet or n in self._held]
        if not touched:
            return
        for name in touched:
            self._wake(name)
        seen = sorted((n for n in d.actions if n in by_name), key=self.world.order)
        rest = [n for n in d.actions if n not in by_name]
        d.actions = {name: d.actions[name] for name in seen + rest}

    def _free_timer(self, now: float, idle_for: float) -> float | None:
        """The soonest shrink timer of a quiet free clone after `now`."""
        idlest = self._idlest
        i = bisect_left(idlest, (now - idle_for - 1.0,))
        while i < len(idlest):
            at = idlest[i][0] + idle_for
            if at > now:
                return at
            i += 1
        return None


def _idleness(rec: CloneRecord) -> tuple[float, int]:
    """The longest idle free clone first (shrink's order)."""
    return rec.since, -rec.slot
