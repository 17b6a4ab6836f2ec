"""Leadership: which of several keepers on one shared store acts on the hosts.

A keeper leads while it holds the store's lease (imagepipe.pool.store.Leadership). The lease
is renewed every `loop_wait` seconds, on a loop of its own (`ElectionLoop`), so a long pass
never delays it. Patroni's rule holds between the settings (checked when they are read):

    loop_wait + 2 * retry_timeout <= lease

A renewal sent at monotonic time t keeps the lease until at least t + lease on the store's
clock (the store counts from when it received the call, which is after t). The keeper acts
only until t + lease - retry_timeout (`act_until`): a healthy leader renews again by
t + loop_wait + retry_timeout, which the rule puts before that point, so it never notices;
a leader that cannot renew (store unreachable, its loop wedged) stops acting a whole
retry_timeout before its lease runs out and a standby may take over. The systemd watchdog
(pinged from the loop, WatchdogSec= in the unit) restarts a keeper whose loop stopped.

The lease is renewed only while the keeper's own loop shows progress (`working`): a pass
busy for `stall` seconds (lease - retry_timeout: the time a leader may act after a renewal)
without a sign of life is wedged (a call that never returns). The election then steps down
and hands the lease over at once, so a standby takes over within a loop_wait or two, and
stops pinging the watchdog for it, so systemd restarts the wedged process.

The fencing token (the epoch) covers what timing cannot: a keeper paused past its lease
(SIGSTOP, a VM freeze) wakes up with a stale epoch, its first write is refused inside the
store's transaction (FencedError), and `fenced()` makes it step down at once.

Everything here runs on an injected clock, so the unit tests drive it with a fake one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from imagepipe.app.metrics import KeeperMetrics
from imagepipe.app.notify import SystemdNotifier
from imagepipe.config import Settings
from imagepipe.errors import FencedError, ImagepipeError, OperationFailedError
from imagepipe.log import fields
from imagepipe.pool.keeper import Keeper, PassReport
from imagepipe.pool.ports import Clock
from imagepipe.pool.store import Leadership

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    """keeper.lease, keeper.lease_loop, keeper.lease_retry (seconds); the settings check
    Patroni's rule between them (imagepipe.config.settings)."""

    lease: float = 30.0  # how long a lease runs without a renewal
    loop_wait: float = 10.0  # seconds between two renewals (or, waiting, two tries)
    retry_timeout: float = 10.0  # how long one store call may take before it counts as failed

    @property
    def stall(self) -> float:
        """How long the keeper's loop may be busy without progress before it counts as
        wedged: the time a leader may act after a renewal."""
        return self.lease - self.retry_timeout


def election_for(settings: Settings, store: Leadership, clock: Clock) -> Election | None:
    """The keeper's election when its state is shared (PostgreSQL); None for the SQLite
    state of one host, whose one keeper always acts, as before."""
    if settings.state is None:
        return None
    cfg = settings.keeper
    lease = LeaseSettings(cfg.lease, cfg.lease_loop, cfg.lease_retry)
    return Election(store, holder_name(), lease, clock)


def pass_once(keeper: Keeper, election: Election) -> PassReport:
    """`keep --once` on a shared state: one pass under the lease, or none while another
    keeper leads (two keepers must never act at once); the lease is given back after."""
    election.step()
    keeper.lead = election
    try:
        if election.term() is None:
            who = election.leader or "another keeper"
            raise OperationFailedError(
                f"{who} leads the keepers of this state; --once changes nothing while it does"
                + (
                    " (the state database did not answer)"
                    if election.role is Role.UNREACHABLE
                    else ""
                )
            )
        report = keeper.pass_if_leading()
        if report is None:
            raise OperationFailedError("this keeper's lease was lost during the pass; see the log")
        return report
    finally:
        election.release()


class Role(Enum):
    LEADING = "leading"
    STANDBY = "standby"  # another keeper holds the lease
    UNREACHABLE = "store unreachable"  # the store did not answer the last call


def holder_name() -> str:
    """This keeper's name in the lease: its host and process, unique while it runs."""
    return f"{socket.gethostname()}/{os.getpid()}"


class Election:
    """One keeper's side of the lease. `step()` renews or tries to acquire it (the loop
    calls it every loop_wait); `term()` is the epoch to act under, or None; `fenced()` is
    what a refused write calls. Thread-safe: the loop steps, the keeper asks."""

    def __init__(
        self, store: Leadership, holder: str, settings: LeaseSettings, clock: Clock
    ) -> None:
        self.store = store
        self.holder = holder
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._epoch: int | None = None
        self._act_until = -math.inf  # monotonic
        self.role = Role.STANDBY
        self.leader: str | None = None  # who leads, as last read (None: nobody known)
        self._said: tuple[Role, str | None] | None = None  # the last state logged
        self._unreachable = False  # the last store call failed (said once)
        self._busy_since: float | None = None  # the keeper's loop's last progress in a pass

    # ---- what the keeper asks ---------------------------------------------------------

    def term(self) -> int | None:
        """The epoch to act under while this keeper leads and its lease surely runs; None
        once it must not act (standby, or the lease could not be renewed in time)."""
        with self._lock:
            if self._epoch is None:
                return None
            if self.clock.monotonic() < self._act_until:
                return self._epoch
            self._drop(
                "the lease was not renewed in time (this process was paused, or the state "
                "database did not answer): stopped acting before it may have run out",
                Role.UNREACHABLE if self.role is Role.UNREACHABLE else Role.STANDBY,
            )
            return None

    @property
    def leading(self) -> bool:
        return self.term() is not None

    def working(self, busy: bool) -> None:
        """The keeper's loop is alive: busy in a pass and making progress now (True), or
        done with it, waiting for the next one (False)."""
        self._busy_since = self.clock.monotonic() if busy else None

    @property
    def wedged(self) -> float | None:
        """Seconds the keeper's loop has been busy without progress, once that is longer
        than `stall`; None while it is not wedged."""
        since = self._busy_since
        if since is None:
            return None
        busy = self.clock.monotonic() - since
        return busy if busy > self.settings.stall else None

    def fenced(self, error: FencedError) -> None:
        """A write under our epoch was refused: another keeper leads. Step down at once."""
        with self._lock:
            if self._epoch is None or self._epoch != error.epoch:
                return
            self.leader = error.holder
            self._drop(f"another keeper was elected meanwhile ({error})", Role.STANDBY)

    # ---- the loop's side --------------------------------------------------------------

    def step(self) -> Role:
        """Renew the lease (leading) or try to take it (waiting); returns the role after."""
        sent = self.clock.monotonic()
        # A lease already past its acting time (the whole process was paused, or the
        # store did not answer) steps down for that reason, before the wedge rule could
        # read the pause as a call that does not return.
        epoch = self.term()
        wedged = self.wedged
        if wedged is not None:
            return self._hand_over(epoch, wedged)
        lease = self.settings.lease
        try:
            if epoch is not None:
                renewed = self.store.renew(self.holder, epoch, lease, self.clock.now())
                if not renewed:
                    with self._lock:
                        if self._epoch == epoch:
                            self._drop("the lease was taken over or ran out", Role.STANDBY)
                    epoch = None
            if epoch is None:
                epoch = self.store.try_acquire(self.holder, lease, self.clock.now())
                current = None if epoch is not None else self.store.leader(self.clock.now())
        except FencedError as exc:
            self.fenced(exc)
            return self.role
        except ImagepipeError as exc:
            with self._lock:
                self.role = Role.UNREACHABLE
                if not self._unreachable:
                    self._unreachable = True
                    log.warning(
                        "state store unreachable: changing nothing until it answers; "
                        "desktops and the balancer keep serving",
                        extra=fields(holder=self.holder, error=str(exc)),
                    )
                return self.role
        with self._lock:
            if self._unreachable:
                self._unreachable = False
                log.info("state store answers again", extra=fields(holder=self.holder))
            if epoch is None:
                self.role = Role.STANDBY
                self.leader = current.holder if current is not None and current.held else None
                self._say(Role.STANDBY, self.leader)
                return self.role
            new = epoch != self._epoch
            self._epoch = epoch
            self._act_until = sent + lease - self.settings.retry_timeout
            self.role = Role.LEADING
            self.leader = self.holder
            self._say(Role.LEADING, str(epoch), again=new)
            return self.role

    def _hand_over(self, epoch: int | None, busy: float) -> Role:
        """The keeper's loop is wedged: lead no more (and do not take the lease); end the
        lease now, so a standby takes over without waiting for it to run out. A write the
        wedged pass makes when its call returns is refused by the fence."""
        with self._lock:
            if epoch is None or self._epoch != epoch:
                return self.role
            self._drop(
                f"this keeper's loop has made no progress for {busy:.0f}s (a call that does "
                "not return?): handing the lease over",
                Role.STANDBY,
            )
        try:
            self.store.release(self.holder, epoch, self.clock.now())
        except ImagepipeError as exc:
            log.warning("could not release the lease", extra=fields(error=str(exc)))
        return self.role

    def release(self) -> None:
        """A clean stop: end the lease now, so a standby need not wait for it to run out."""
        with self._lock:
            epoch = self._epoch
            self._epoch = None
            self._act_until = -math.inf
        if epoch is None:
            return
        try:
            self.store.release(self.holder, epoch, self.clock.now())
        except ImagepipeError as exc:
            log.warning("could not release the lease", extra=fields(error=str(exc)))
        else:
            log.info("released the lease", extra=fields(holder=self.holder, epoch=epoch))

    # ---- inside the lock ----------------------------------------------------------------

    def _drop(self, why: str, role: Role) -> None:
        epoch, self._epoch, self._act_until = self._epoch, None, -math.inf
        self.role = role
        if self.leader == self.holder:
            self.leader = None
        self._said = (role, "stepped down")
        log.warning(
            "stepped down: this keeper leads no more and changes nothing",
            extra=fields(holder=self.holder, epoch=epoch, reason=why),
        )

    def _say(self, role: Role, detail: str | None, *, again: bool = False) -> None:
        """Log leading or waiting once, when it begins (not at every step); `again`: a
        new term."""
        said = self._said
        repeated = said is not None and said[0] is role
        if repeated and not again and (role is Role.LEADING or (said and said[1]) == detail):
            return
        self._said = (role, detail)
        if role is Role.LEADING:
            log.info(
                "leading: this keeper acts on the hosts",
                extra=fields(holder=self.holder, epoch=detail, lease=self.settings.lease),
            )
        else:
            log.info(
                "standby: another keeper leads; waiting to take over",
                extra=fields(holder=self.holder, leader=detail or "nobody (lease running out)"),
            )


class ElectionLoop:
    """Steps the election every loop_wait seconds on a thread of its own (sooner after a
    failure, retrying within retry_timeout), pinging the systemd watchdog after each step
    and waking the keeper when its role changes."""

    def __init__(
        self,
        election: Election,
        notifier: SystemdNotifier | None = None,
        on_change: Callable[[], None] | None = None,
        metrics: KeeperMetrics | None = None,
    ) -> None:
        self.election = election
        self.notifier = notifier
        self.metrics = metrics
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: str | None = None  # the STATUS= last sent from here

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imagepipe-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.election.settings.retry_timeout + 5)

    def _run(self) -> None:
        settings = self.election.settings
        while not self._stop.is_set():
            before = self.election.role
            role = self.election.step()
            # a keeper that does not lead pings from here, unless its loop is wedged: that
            # one is left to the watchdog
            idle = role is not Role.LEADING and self.election.wedged is None
            if self.notifier is not None and idle:
                self._notify(role)
            if self.metrics is not None:
                leading = self.election.term() is not None
                self.metrics.record_role(leading=leading, reachable=role is not Role.UNREACHABLE)
            if role is not before and self._on_change is not None:
                self._on_change()
            wait = settings.loop_wait
            if role is Role.UNREACHABLE:
                wait = min(wait, max(settings.retry_timeout / 3, 0.1))
            self._stop.wait(wait)

    def _notify(self, role: Role) -> None:
        """A keeper that does not lead: the watchdog ping (its keeper loop passes no more,
        and a leader's passes ping themselves, so a wedged pass is still caught), and ready
        too (systemd would fail its start otherwise), saying why it changes nothing."""
        assert self.notifier is not None
        self.notifier.watchdog()
        status = None
        if role is Role.STANDBY:
            leader = self.election.leader or "nobody yet"
            status = f"standby: {leader} leads; taking over when its lease runs out"
        elif role is Role.UNREACHABLE:
            status = "state database unreachable: changing nothing until it answers"
        if status is not None and status != self._status:
            self.notifier.ready(status)
        self._status = status
