"""The rollout use cases (`imagepipe rollout …`): start, dry-run, follow, pause, resume,
cancel, undo, and the rollout read model.

A rollout is a row in the state store that the running keeper executes; this module only
writes intent and reads progress, so a rollout goes on when the command that started it is
interrupted, and a keeper restart continues it. A rollout moves the channel its pools follow
(recording in the registry's channel history who moved it, when and why), so `images list`
and `rollout status` never disagree: the row says *how* the pools move, the channel says *to
what*. Pools pinned with `version:` in their file are left alone.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

from imagepipe.app.bootstrap import (
    Adapters,
    build_balancer,
    build_hypervisor,
    build_images,
    describe_state,
)
from imagepipe.app.keeping import select_pools
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.observe import observe
from imagepipe.pool.planner import free_target
from imagepipe.pool.ports import Channels, Clock, Images
from imagepipe.pool.rollout_records import Rollout, RolloutState
from imagepipe.pool.store import Store

SCHEMA = "imagepipe.rollout/1"
WARN_BEFORE = (600.0, 60.0)  # deadline warnings: 10 and 1 minutes before
FOLLOW_EVERY = 1.0  # seconds between two looks at a rollout that is followed
VERBS = ("status", "pause", "resume", "cancel", "undo")


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


@dataclass(frozen=True)
class PoolPlan:
    """What a rollout would do to one pool (`--dry-run`)."""

    pool: str
    from_versions: tuple[int, ...]
    to_version: int
    new_desktops: int  # made before any old free one goes (the free target)
    replaced_at_once: int  # old free desktops: go as soon as new ones are ready
    wait_for_logoff: int  # old desktops with a session: drained, removed at logoff
    forced_end_at: float | None  # the earliest moment a session is ended (the deadline)


@dataclass(frozen=True)
class Started:
    rollout: Rollout | None  # None: nothing to roll out
    left_alone: tuple[str, ...] = ()  # pinned pools of the image
    message: str = ""


@dataclass
class Rollouts:
    """What the use cases work on: the store (read-write), the registry's channels, a clock."""

    settings: Settings
    store: Store
    images: Images
    channels: Channels
    clock: Clock
    adapters: Adapters

    @classmethod
    def open(cls, settings: Settings, adapters: Adapters) -> Rollouts:
        from imagepipe.app.bootstrap import SystemClock, open_store

        images = adapters.images or build_images(settings)
        if not isinstance(images, Channels):
            raise EnvironmentMissingError("the image registry cannot move channels")
        clock = adapters.clock or SystemClock()
        return cls(settings, open_store(settings), images, images, clock, adapters)

    def close(self) -> None:
        self.store.close()

    # ---- the keeper ----------------------------------------------------------------

    def keeper_running(self) -> str | None:
        """None when a keeper runs; else why we think none does, as a sentence."""
        beat = self.store.heartbeat()
        if beat is None:
            return (
                f"no keeper has run on the state database {describe_state(self.settings)}: "
                "start it "
                "(systemctl start imagepipe-keep, or imagepipe keep) and try again"
            )
        now = self.clock.now()
        ago = round(now - beat.at)
        start = "start it (systemctl start imagepipe-keep, or imagepipe keep)"
        if beat.pid == 0:
            return f"no keeper is running: it stopped {ago} s ago; {start}"
        if beat.host == socket.gethostname():  # this host: its process is the truth
            if _pid_alive(beat.pid):
                return None
        elif now - beat.at <= max(3 * beat.tick, 30.0):
            return None
        return (
            f"no keeper is running: its last pass was {ago} s ago (pid {beat.pid} on "
            f"{beat.host}); start it (systemctl start imagepipe-keep, or imagepipe keep)"
        )

    def require_keeper(self) -> None:
        why = self.keeper_running()
        if why is not None:
            raise EnvironmentMissingError(why)

    # ---- start -----------------------------------------------------------------------

    def choose(self, specs: Sequence[PoolSpec], request: Request) -> tuple[list[PoolSpec], str]:
        """The pools the rollout moves, and the channel they follow."""
        image = request.image
        of_image = [s for s in specs if s.image == image]
        if request.pools:
            chosen = select_pools(specs, request.pools)
            for spec in chosen:
                if spec.image != image:
                    raise BadInputError(f"pool {spec.name} runs image {spec.image}, not {image}")
                if spec.version is not None:
                    raise BadInputError(
                        f"pool {spec.name} is pinned to v{spec.version} (version: in "
                        f"{spec.source or 'its file'}); change the pin there, or make it "
                        "follow a channel"
                    )
        else:
            chosen = [s for s in of_image if s.version is None]
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

    def target(self, request: Request) -> int:
        if request.to is None:
            return self.channels.newest_version(request.image)
        text = request.to.lower().removeprefix("v")
        if not text.isdigit():
            raise BadInputError(f"--to: expected a version such as 7 or v7, got {request.to!r}")
        return self.images.resolve(request.image, int(text)).version

    def start(self, specs: Sequence[PoolSpec], request: Request, *, by: str) -> Started:
        """Write the rollout for the keeper and move the channel (the keeper must run)."""
        chosen, channel = self.choose(specs, request)
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
        deadline = request.deadline
        if request.now:
            deadline = min(request.warn_before, default=0.0)
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
                deadline_at=None if deadline is None else now + deadline,
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
            self.channels.move_channel(
                request.image, channel, to, by=f"rollout #{rollout.id} by {by} ({why})"
            )
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

    def dry_run(self, specs: Sequence[PoolSpec], request: Request) -> list[PoolPlan]:
        """What the rollout would do, from one live observation; changes nothing."""
        chosen, _channel = self.choose(specs, request)
        to = self.target(request)
        hypervisor = self.adapters.hypervisor or build_hypervisor(self.settings)
        try:
            balancer = self.adapters.balancer or build_balancer(self.settings, manage=False)
            try:
                host = observe(hypervisor, balancer, self.images, chosen)
            finally:
                if self.adapters.balancer is None:
                    balancer.close()
        finally:
            if self.adapters.hypervisor is None:
                hypervisor.close()
        now = self.clock.now()
        deadline = request.deadline
        if request.now:
            deadline = min(request.warn_before, default=0.0)
        plans = []
        for spec in chosen:
            observed = host.pools.get(spec.name)
            clones = observed.clones if observed is not None else ()
            old = [c for c in clones if c.info.version != to]
            in_use = sum(1 for c in old if c.session.active)
            plans.append(
                PoolPlan(
                    pool=spec.name,
                    from_versions=tuple(sorted({c.info.version for c in old})),
                    to_version=to,
                    new_desktops=free_target(spec, now),
                    replaced_at_once=len(old) - in_use,
                    wait_for_logoff=in_use,
                    forced_end_at=None if deadline is None or not in_use else now + deadline,
                )
            )
        return plans

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

    def _change(self, image: str, change: Callable[[Rollout], Rollout]) -> Rollout:
        """Change the active rollout of IMAGE in one transaction with the keeper's writes."""
        active = self.active(image)
        result = self.store.update_rollout(active.id, lambda r: change(r) if r.active else r)
        if result is None or not result[0].active:
            raise BadInputError(f"rollout #{active.id} of {image} has just ended")
        return result[1]

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

    def cancel(self, specs: Sequence[PoolSpec], image: str, *, by: str) -> Rollout:
        """Stop the active rollout; its pools go back to the version they ran, blue/green."""
        self.active(image)
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


def who() -> str:
    """Who starts a rollout, for the registry's history: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def to_doc(rollout: Rollout) -> dict[str, object]:
    doc = asdict(rollout)
    doc["schema"] = SCHEMA
    doc["state"] = rollout.state.value
    doc["progress"] = [{**asdict(p), "old_removed": p.old_removed} for p in rollout.progress]
    return doc


def to_json_line(rollout: Rollout) -> str:
    return json.dumps(to_doc(rollout), sort_keys=True)


def exit_code(rollout: Rollout) -> int:
    """`--wait`: 0 done, 4 anything else it ended in (failed, rolled back, cancelled)."""
    return 0 if rollout.state is RolloutState.DONE else 4


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clock_text(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
