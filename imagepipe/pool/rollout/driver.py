"""The keeper's side of `imagepipe rollout`: rollouts are rows in the store, executed here.

Every pass the keeper writes its heartbeat (`beat`; `keeper_absent` is the one reading of
it, for the CLI), hands the planner each active rollout's policy with the pool's record,
and after the pass judges every active rollout (progress.py): its progress per pool, its
next state, deadline warnings to show inside the desktops, and an automatic rollback.

A rollback is `rolling back` until the channel really points at the old version again:
the keeper tries to move it every pass (`move_channel`, the one place a rollout moves a
channel), and only once it moved is the rollout `rolled back` and the pool's failure count
cleared. Nothing lives only in memory: a restarted keeper (also after kill -9) reads the
rows and goes on where it was.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

from imagepipe.errors import EnvironmentMissingError, ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.model import CloneState, PoolRecord, PoolSpec
from imagepipe.pool.observe import HostObservation
from imagepipe.pool.ports import Channels, Notifier
from imagepipe.pool.rollout.progress import PoolView, Verdict, judge
from imagepipe.pool.rollout.records import Heartbeat, Rollout, RolloutState
from imagepipe.pool.store import Store
from imagepipe.record import replace

log = logging.getLogger(__name__)

START_KEEPER = "start it (systemctl start imagepipe-keep, or imagepipe keep)"
_NOT_MOVED = "; the channel could not be moved back"  # the rolling-back note's start


def move_channel(channels: Channels | None, rollout: Rollout, version: int, *, by: str) -> None:
    """Point the rollout's channel at `version` (forward when it starts, back when it is
    undone or rolled back), recording who and why in the registry's history."""
    if channels is None:
        raise EnvironmentMissingError("no registry to move it (the keeper runs without one)")
    channels.move_channel(rollout.image, rollout.channel, version, by=by)


def keeper_absent(
    store: Store, now: float, *, alive: Callable[[int], bool] | None = None
) -> str | None:
    """None when a keeper runs on the store; else why we think none does, as a sentence."""
    beat = store.heartbeat()
    if beat is None:
        return (
            f"no keeper has run on the state database {store.location}: {START_KEEPER} and "
            "try again"
        )
    return _stopped(beat, now, alive or _pid_alive)


def _stopped(beat: Heartbeat, now: float, alive: Callable[[int], bool]) -> str | None:
    """None when the keeper that wrote `beat` still runs; else why we think it does not.
    On this host the keeper's process is the truth; elsewhere its last pass must be recent."""
    ago = round(now - beat.at)
    if beat.pid == 0:
        return f"no keeper is running: it stopped {ago} s ago; {START_KEEPER}"
    if beat.host == socket.gethostname():
        if alive(beat.pid):
            return None
    elif now - beat.at <= max(3 * beat.tick, 30.0):
        return None
    return (
        f"no keeper is running: its last pass was {ago} s ago (pid {beat.pid} on "
        f"{beat.host}); {START_KEEPER}"
    )


def open_host_breakers(store: Store, now: float) -> dict[str, float]:
    """The hosts whose circuit breaker the running keeper holds open at `now`, until when,
    as its last heartbeat says (none when no keeper runs: a keeper starts with every
    breaker closed)."""
    beat = store.heartbeat()
    if beat is None or _stopped(beat, now, _pid_alive) is not None:
        return {}
    return {h: until for h, until in beat.host_breakers if until > now}


def warning_text(rollout: Rollout, now: float) -> str:
    assert rollout.deadline_at is not None
    minutes = max(1, round((rollout.deadline_at - now) / 60))
    at = time.strftime("%H:%M UTC", time.gmtime(rollout.deadline_at))
    head = rollout.message or "This desktop is being replaced by a new version."
    return f"{head} Your session ends at {at} (in about {minutes} min): save your work and log off."


class RolloutDriver:
    def __init__(
        self,
        store: Store,
        *,
        tick: float,
        channels: Channels | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.tick = tick
        self.channels = channels
        self.notifier = notifier
        self._active: dict[str, Rollout] = {}  # pool -> its active rollout (the newest)

    def heartbeat(self, now: float, host_breakers: Mapping[str, float]) -> Heartbeat:
        """The heartbeat a pass starting at `now` writes (Store.begin_pass), with the
        hosts whose circuit breaker is open (until when)."""
        return Heartbeat(
            at=now,
            pid=os.getpid(),
            host=socket.gethostname(),
            tick=self.tick,
            host_breakers=tuple(sorted(host_breakers.items())),
        )

    def stopped(self, now: float) -> None:
        """The keeper stops cleanly: `rollout` must not count on it any more."""
        self.store.beat(Heartbeat(at=now, pid=0, host=socket.gethostname(), tick=self.tick))

    def load(self, active: Sequence[Rollout]) -> None:
        """Take the active rollouts, newest first, as the pass read them (once per pass)."""
        self._active = {}
        for rollout in active:  # newest first: the newest wins
            for pool in rollout.pools:
                self._active.setdefault(pool, rollout)

    def record(self, spec: PoolSpec, record: PoolRecord) -> PoolRecord:
        """The pool's record with its active rollout's policy, for the planner."""
        rollout = self._active.get(spec.name)
        return record if rollout is None else replace(record, rollout=rollout.policy(spec))

    def next_due(self, now: float) -> float | None:
        """When a rollout could change without any event (a bake ending, a warning)."""
        due = []
        for rollout in set(self._active.values()):
            if rollout.canary_ready_at is not None and rollout.bake is not None:
                due.append(rollout.canary_ready_at + rollout.bake)
            if rollout.deadline_at is not None:
                due += [rollout.deadline_at - w for w in rollout.warn_before]
        later = [d for d in due if d > now]
        return min(later) if later else None

    def after_pass(
        self,
        specs: Mapping[str, PoolSpec],
        host: HostObservation,
        record_of: Callable[[PoolSpec], PoolRecord],
        now: float,
    ) -> list[Rollout]:
        """Judge every active rollout on this pass; `record_of` reads a pool's record as the
        keeper plans with it (after this pass's writes, learned arrivals included). Returns
        the rollouts that changed."""
        changed = []
        for rollout in {r.id: r for r in self._active.values()}.values():
            views = [
                PoolView(
                    spec=specs[p],
                    observed=host.pools[p],
                    record=record_of(specs[p]),
                    note=host.notes.get(p),
                )
                for p in rollout.pools
                if p in specs and p in host.pools
            ]
            if not views:
                continue
            nxt = self._judge(rollout.id, views, now)
            if nxt is not None:
                changed.append(nxt)
        return changed

    def _judge(self, rollout_id: int, views: list[PoolView], now: float) -> Rollout | None:
        """Judge one rollout and act on the verdict; the rollout if it changed."""
        verdicts: list[Verdict] = []

        def judged(current: Rollout) -> Rollout:
            verdicts.append(judge(current, views, now))  # an ended one comes back unchanged
            return verdicts[-1].rollout

        # one transaction: a pause or cancel the CLI writes meanwhile is never lost
        result = self.store.update_rollout(rollout_id, judged)
        if result is None or not verdicts:
            return None
        current, nxt = result
        verdict = verdicts[-1]
        if verdict.warnings:
            self._warn(nxt, views, now)
        if nxt.state is not current.state:
            log.info(
                "rollout " + nxt.state.label,
                extra=fields(
                    rollout=nxt.id, image=nxt.image, to=f"v{nxt.to_version}", reason=nxt.reason
                ),
            )
        if verdict.move_back:
            nxt = self._roll_back(nxt, views, now)
        return None if nxt == current else nxt

    def _roll_back(self, rollout: Rollout, views: Sequence[PoolView], now: float) -> Rollout:
        """The new version's desktops failed: move the channel back; once it moved, the
        rollout is rolled back and the pools' failure count (the new version's) is cleared
        so the old version's desktops can be made. A move that fails is said in the
        rollout's reason and tried again next pass."""
        cause = (rollout.reason or "").split(_NOT_MOVED)[0]
        by = f"rollout #{rollout.id} rolled back: {cause}"
        try:
            move_channel(self.channels, rollout, rollout.from_version, by=by)
        except ImagepipeError as exc:
            why = f"{cause}{_NOT_MOVED} to v{rollout.from_version} ({exc}): trying again every pass"
            if why != rollout.reason:
                log.error(
                    "rollback: the channel could not be moved back",
                    extra=fields(rollout=rollout.id, image=rollout.image, error=str(exc)),
                )
            return self._settle(rollout, lambda r: replace(r, reason=why))
        for view in views:
            self.store.save_pool(
                view.spec.name,
                target_version=view.record.target_version,
                failures=0,
                breaker_open_until=None,
            )
        log.warning(
            "rollout rolled back",
            extra=fields(rollout=rollout.id, image=rollout.image, reason=cause),
        )
        return self._settle(
            rollout,
            lambda r: replace(
                r, state=RolloutState.ROLLED_BACK, reason=cause, finished_at=now, paused=False
            ),
        )

    def _settle(self, rollout: Rollout, change: Callable[[Rollout], Rollout]) -> Rollout:
        """Write the rollback's outcome unless the rollout left `rolling back` meanwhile
        (cancelled by the CLI)."""
        result = self.store.update_rollout(
            rollout.id, lambda r: change(r) if r.state is RolloutState.ROLLING_BACK else r
        )
        return rollout if result is None else result[1]

    def _warn(self, rollout: Rollout, views: Sequence[PoolView], now: float) -> None:
        text = warning_text(rollout, now)
        for view in views:
            for rec in view.record.clones.values():
                if rec.version == rollout.to_version or rec.state is not CloneState.RETIRING:
                    continue
                log.warning(
                    "deadline warning",
                    extra=fields(pool=view.spec.name, clone=rec.name, rollout=rollout.id),
                )
                if self.notifier is None:
                    continue
                try:
                    self.notifier.notify_users(rec.name, text)
                except ImagepipeError as exc:
                    log.warning(
                        "the warning did not reach the desktop",
                        extra=fields(clone=rec.name, error=str(exc)),
                    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
