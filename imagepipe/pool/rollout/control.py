"""The administrator's side of `imagepipe rollout`: start, dry-run plan, follow, pause,
resume, cancel, undo, and what is shown.

A rollout is a row in the state store that the running keeper executes (driver.py); this
module only writes intent and reads progress, so a rollout goes on when the command that
started it is interrupted, and a keeper restart continues it. A rollout moves the channel
its pools follow (recording in the registry's channel history who moved it, when and why),
so `images list` and `rollout status` never disagree: the row says *how* the pools move,
the channel says *to what*. Pools pinned with `version:` in their file are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.pool.model import Observed, PoolRecord, PoolSpec
from imagepipe.pool.planner.schedule import free_target
from imagepipe.pool.ports import Channels, Clock, Images
from imagepipe.pool.rollout.driver import keeper_absent, move_channel
from imagepipe.pool.rollout.records import Rollout, RolloutState
from imagepipe.pool.store import Store
from imagepipe.record import replace

WARN_BEFORE = (600.0, 60.0)  # deadline warnings: 10 and 1 minutes before
FOLLOW_EVERY = 1.0  # seconds between two looks at a rollout that is followed


@dataclass(frozen=True)
class Request:
    """`imagepipe rollout IMAGE …` in plain values."""

    image: str
    to: str | None = None  # a version (7, v7); None: the newest usable one
    pools: tuple[str, ...] = ()  # named pools; none: every pool of the image not pinned
    deadline: float | None = None  # seconds; None: --drain
    now: bool = False  # --now: the deadline is the last warning's grace
    message: str | None = None
    canary: int | None = None
    bake: float | None = None
    surge: int | None = None
    warn_before: tuple[float, ...] = WARN_BEFORE

    def deadline_at(self, now: float) -> float | None:
        """When the remaining sessions are ended, for a rollout starting at `now`; None
        with --drain (nobody is kicked off)."""
        deadline = min(self.warn_before, default=0.0) if self.now else self.deadline
        return None if deadline is None else now + deadline


@dataclass(frozen=True)
class PoolPlan:
    """What a rollout would do to one pool (`--dry-run`)."""

    pool: str
    from_versions: tuple[int, ...]
    to_version: int
    new_desktops: int  # made before any old free one goes (the keeper's free target)
    replaced_at_once: int  # old free desktops: go as soon as new ones are ready
    wait_for_logoff: int  # old desktops with a session: drained, removed at logoff
    forced_end_at: float | None  # the earliest moment a session is ended (the deadline)


@dataclass(frozen=True)
class Started:
    rollout: Rollout | None  # None: nothing to roll out
    left_alone: tuple[str, ...] = ()  # pinned pools of the image
    message: str = ""


def choose(
    specs: Sequence[PoolSpec], image: str, named: Sequence[PoolSpec]
) -> tuple[list[PoolSpec], str]:
    """The pools the rollout moves (the `named` ones, else every pool of the image that
    follows a channel), and the channel they follow."""
    of_image = [s for s in specs if s.image == image]
    for spec in named:
        if spec.image != image:
            raise BadInputError(f"pool {spec.name} runs image {spec.image}, not {image}")
        if spec.version is not None:
            raise BadInputError(
                f"pool {spec.name} is pinned to v{spec.version} (version: in "
                f"{spec.source or 'its file'}); change the pin there, or make it "
                "follow a channel"
            )
    chosen = list(named) or [s for s in of_image if s.version is None]
    if not chosen:
        raise BadInputError(f"no pool follows a channel of image {image}: nothing to roll out")
    channels = sorted({s.channel or "" for s in chosen})
    if len(channels) > 1:
        raise BadInputError(
            f"the pools of {image} follow several channels ({', '.join(channels)}): "
            "roll out one channel's pools at a time with --pool"
        )
    channel = channels[0]
    names = {s.name for s in chosen}
    others = [s.name for s in of_image if s.channel == channel and s.name not in names]
    if others:
        raise BadInputError(
            f"pool(s) {', '.join(others)} also follow {image}@{channel}, and a rollout moves "
            "that channel: name them too, or give them a channel of their own"
        )
    return chosen, channel


@dataclass
class RolloutControl:
    """What the use cases work on: the store (read-write), the registry, a clock."""

    store: Store
    images: Images
    channels: Channels
    clock: Clock

    def keeper_running(self) -> str | None:
        """None when a keeper runs; else why we think none does, as a sentence."""
        return keeper_absent(self.store, self.clock.now())

    def require_keeper(self) -> None:
        why = self.keeper_running()
        if why is not None:
            raise EnvironmentMissingError(why)

    # ---- start -----------------------------------------------------------------------

    def target(self, request: Request) -> int:
        if request.to is None:
            return self.channels.newest_version(request.image)
        text = request.to.lower().removeprefix("v")
        if not text.isdigit():
            raise BadInputError(f"--to: expected a version such as 7 or v7, got {request.to!r}")
        return self.images.resolve(request.image, int(text)).version

    def start(
        self,
        specs: Sequence[PoolSpec],
        named: Sequence[PoolSpec],
        request: Request,
        *,
        by: str,
    ) -> Started:
        """Write the rollout for the keeper and move the channel (the keeper must run)."""
        chosen, channel = choose(specs, request.image, named)
        pinned = tuple(s.name for s in specs if s.image == request.image and s.version is not None)
        to = self.target(request)
        before = self.channels.channel_version(request.image, channel)
        if before is None:
            raise BadInputError(f"{request.image} has no channel {channel!r}")
        old = self._running_versions(chosen, to)
        if before == to and not old:
            names = ", ".join(s.name for s in chosen)
            return Started(None, pinned, f"nothing to roll out: {names} already run v{to}")
        from_version = before if before != to else max(old)
        busy = [
            r
            for r in self.store.rollouts(request.image, active=True)
            if set(r.pools) & {s.name for s in chosen}
        ]
        if busy:
            r = busy[0]
            raise BadInputError(
                f"rollout #{r.id} of {r.image} (v{r.from_version} → v{r.to_version}) is "
                f"{r.state.label}: wait for it, or `imagepipe rollout cancel {r.image}`"
            )
        self.require_keeper()
        rollout = self._write(request, chosen, channel, from_version, to, by)
        return Started(rollout, pinned)

    def _write(
        self,
        request: Request,
        chosen: Sequence[PoolSpec],
        channel: str,
        from_version: int,
        to: int,
        by: str,
        *,
        undo_of: int | None = None,
    ) -> Rollout:
        now = self.clock.now()
        rollout = self.store.add_rollout(
            Rollout(
                id=0,
                image=request.image,
                channel=channel,
                pools=tuple(s.name for s in chosen),
                from_version=from_version,
                to_version=to,
                state=RolloutState.PENDING,
                created_at=now,
                created_by=by,
                deadline_at=request.deadline_at(now),
                message=request.message,
                warn_before=request.warn_before,
                canary=request.canary,
                bake=request.bake,
                surge=request.surge,
                undo_of=undo_of,
            )
        )
        why = f"undo of #{undo_of}" if undo_of is not None else "rollout"
        try:
            move_channel(self.channels, rollout, to, by=f"rollout #{rollout.id} by {by} ({why})")
        except BaseException as exc:
            self.store.save_rollout(
                replace(
                    rollout,
                    state=RolloutState.FAILED,
                    reason=f"the channel could not be moved: {exc}",
                    finished_at=self.clock.now(),
                )
            )
            raise
        return rollout

    def _running_versions(self, chosen: Sequence[PoolSpec], to: int) -> list[int]:
        versions = set()
        for spec in chosen:
            record = self.store.load_pool(spec.name)
            versions |= {r.version for r in record.clones.values() if r.version != to}
        return sorted(versions)

    # ---- control ---------------------------------------------------------------------

    def active(self, image: str) -> Rollout:
        active = self.store.rollouts(image, active=True)
        if not active:
            raise BadInputError(
                f"no rollout of {image} is in progress (see `imagepipe rollout status --all`)"
            )
        return active[0]

    def pause(self, image: str) -> Rollout:
        why = f"paused: `imagepipe rollout resume {image}` goes on"
        return self._change(
            image, lambda r: replace(r, paused=True, state=RolloutState.PAUSED, reason=why)
        )

    def resume(self, image: str) -> Rollout:
        """Go on after a pause, or end the canary's wait (also after a canary failure)."""
        return self._change(
            image,
            lambda r: replace(
                r,
                paused=False,
                canary_passed=r.canary is not None,
                canary_failed=False,
                state=RolloutState.IN_PROGRESS,
                reason="resumed",
            ),
        )

    def _change(self, image: str, change: Callable[[Rollout], Rollout]) -> Rollout:
        """Change the active rollout of IMAGE in one transaction with the keeper's writes.
        A rollout that is rolling back is not changed: it only ends rolled back."""
        active = self._not_rolling_back(image)
        result = self.store.update_rollout(
            active.id,
            lambda r: change(r) if r.active and r.state is not RolloutState.ROLLING_BACK else r,
        )
        if result is None or not result[0].active or result[0].state is RolloutState.ROLLING_BACK:
            raise BadInputError(f"rollout #{active.id} of {image} has just ended or rolls back")
        return result[1]

    def _not_rolling_back(self, image: str) -> Rollout:
        """The active rollout of IMAGE, unless it is rolling back: the keeper already moves
        its channel back (as soon as the registry lets it) and nothing else may meanwhile."""
        active = self.active(image)
        if active.state is RolloutState.ROLLING_BACK:
            raise BadInputError(
                f"rollout #{active.id} of {image} is rolling back to v{active.from_version}: "
                f"the keeper moves the channel back; {active.reason}"
            )
        return active

    def cancel(self, specs: Sequence[PoolSpec], image: str, *, by: str) -> Rollout:
        """Stop the active rollout; its pools go back to the version they ran, blue/green."""
        self._not_rolling_back(image)
        self.require_keeper()
        now = self.clock.now()
        ended = self._change(
            image,
            lambda r: replace(
                r,
                state=RolloutState.CANCELLED,
                reason=f"cancelled by {by}: back to v{r.from_version}",
                finished_at=now,
                paused=False,
            ),
        )
        return self._reverse(specs, ended, by)

    def undo(self, specs: Sequence[PoolSpec], image: str, *, by: str) -> Rollout:
        """Back to the version before the newest rollout of IMAGE, by a rollout."""
        newest = self.store.rollouts(image, limit=1)
        if not newest:
            raise BadInputError(f"{image} has had no rollout to undo")
        if newest[0].active:
            return self.cancel(specs, image, by=by)
        last = newest[0]
        if last.state is not RolloutState.DONE:
            raise BadInputError(
                f"rollout #{last.id} of {image} ended {last.state.label}: its pools already run "
                f"v{last.from_version}"
            )
        self.require_keeper()
        return self._reverse(specs, last, by)

    def _reverse(self, specs: Sequence[PoolSpec], rollout: Rollout, by: str) -> Rollout:
        known = {s.name: s for s in specs}
        chosen = [known[p] for p in rollout.pools if p in known]
        request = Request(image=rollout.image, pools=rollout.pools)
        return self._write(
            request,
            chosen,
            rollout.channel,
            rollout.to_version,
            rollout.from_version,
            by,
            undo_of=rollout.id,
        )

    # ---- reading ---------------------------------------------------------------------

    def shown(self, image: str | None, *, history: bool) -> list[Rollout]:
        """Active rollouts, else each image's newest; with history, every one."""
        if history:
            return self.store.rollouts(image)
        active = self.store.rollouts(image, active=True)
        if active:
            return active
        newest: dict[str, Rollout] = {}
        for r in self.store.rollouts(image, limit=50):
            newest.setdefault(r.image, r)
        return list(newest.values())

    def follow(
        self, rollout_id: int, stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Rollout]:
        """The rollout each time it changes (the keeper's pass time aside), until it ended
        (the last one yielded)."""
        seen: Rollout | None = None
        while True:
            current = self.store.rollout(rollout_id)
            if current is None:
                raise BadInputError(f"no rollout #{rollout_id}")
            if seen is None or replace(current, updated_at=None) != replace(seen, updated_at=None):
                seen = current
                yield current
            if not current.active or stop():
                return
            self.clock.sleep(FOLLOW_EVERY)


def plans(
    chosen: Sequence[PoolSpec],
    observed: Mapping[str, Observed],
    records: Mapping[str, PoolRecord],
    to: int,
    request: Request,
    now: float,
) -> list[PoolPlan]:
    """The dry run: what the rollout would do to each chosen pool, from one observation and
    the pools' records (with what their login history taught: the new desktops made first
    are the keeper's own free target). Changes nothing."""
    deadline_at = request.deadline_at(now)
    out = []
    for spec in chosen:
        seen = observed.get(spec.name)
        old = [c for c in (seen.clones if seen is not None else ()) if c.info.version != to]
        in_use = sum(1 for c in old if c.session.active)
        record = records.get(spec.name, PoolRecord(spec.name))
        out.append(
            PoolPlan(
                pool=spec.name,
                from_versions=tuple(sorted({c.info.version for c in old})),
                to_version=to,
                new_desktops=free_target(spec, now, record.arrivals),
                replaced_at_once=len(old) - in_use,
                wait_for_logoff=in_use,
                forced_end_at=deadline_at if in_use else None,
            )
        )
    return out
