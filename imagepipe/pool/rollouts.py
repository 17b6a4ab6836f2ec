"""The keeper's side of `imagepipe rollout`: rollouts are rows in the store, executed here.

Every pass the keeper writes its heartbeat (so the CLI can tell that a keeper runs), hands
the planner each active rollout's policy with the pool's record, and after the pass judges
every active rollout (planner/rollout_progress.py): its progress per pool, its next state,
deadline warnings to show inside the desktops, and an automatic rollback (the channel is
pointed back at the old version, the pool's failure count cleared). Nothing lives only in
memory: a restarted keeper (also after kill -9) reads the rows and goes on where it was.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from imagepipe.errors import ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.model import CloneState, PoolRecord, PoolSpec
from imagepipe.pool.observe import HostObservation
from imagepipe.pool.planner.rollout_progress import PoolView, Verdict, judge
from imagepipe.pool.ports import Channels, Notifier
from imagepipe.pool.rollout_records import Heartbeat, Rollout
from imagepipe.pool.store import Store

log = logging.getLogger(__name__)


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

    def beat(self, now: float) -> None:
        self.store.beat(
            Heartbeat(at=now, pid=os.getpid(), host=socket.gethostname(), tick=self.tick)
        )

    def stopped(self, now: float) -> None:
        """The keeper stops cleanly: `rollout` must not count on it any more."""
        self.store.beat(Heartbeat(at=now, pid=0, host=socket.gethostname(), tick=self.tick))

    def load(self) -> None:
        """Read the active rollouts (once per pass)."""
        self._active = {}
        for rollout in self.store.rollouts(active=True):  # newest first: the newest wins
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
        self, specs: Mapping[str, PoolSpec], host: HostObservation, now: float
    ) -> list[Rollout]:
        """Judge every active rollout on this pass; returns the ones that changed."""
        changed = []
        for rollout in {r.id: r for r in self._active.values()}.values():
            views = [
                PoolView(
                    spec=specs[p],
                    observed=host.pools[p],
                    record=self.store.load_pool(p),
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
        if verdict.move_back:
            self._roll_back(nxt, views)
        if nxt.state is not current.state:
            log.info(
                "rollout " + nxt.state.label,
                extra=fields(
                    rollout=nxt.id, image=nxt.image, to=f"v{nxt.to_version}", reason=nxt.reason
                ),
            )
        return None if nxt == current else nxt

    def _roll_back(self, rollout: Rollout, views: Sequence[PoolView]) -> None:
        """The new version's desktops failed: the channel goes back, the pools' failure
        count (the new version's) is cleared so the old version's desktops can be made."""
        by = f"rollout #{rollout.id} rolled back: {rollout.reason}"
        if self.channels is None:
            log.error("cannot roll back: no registry to move the channel", extra=fields(by=by))
            return
        try:
            self.channels.move_channel(rollout.image, rollout.channel, rollout.from_version, by=by)
        except ImagepipeError as exc:
            log.error("rollback: the channel could not be moved", extra=fields(error=str(exc)))
            return
        for view in views:
            self.store.save_pool(
                view.spec.name,
                target_version=view.record.target_version,
                failures=0,
                breaker_open_until=None,
            )
        log.warning(
            "rollout rolled back",
            extra=fields(rollout=rollout.id, image=rollout.image, reason=rollout.reason),
        )

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
