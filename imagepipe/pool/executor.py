"""The executor: carry out the planner's actions against the hypervisor and the balancer.

- Record actions (RecordClone, ForgetClone, RecordPool) go to the store first, in one
  transaction per pool: the store holds intent, written before anything is done about it.
- Actions on one clone run in order; different clones run in parallel, at most `parallel`
  at a time (the original tool cloned one at a time).
- Every hypervisor or balancer action is journaled (journal_begin before, journal_end after),
  so a crash mid-action is visible on restart; recover() finishes or undoes those entries.
- BusyError (the hypervisor is locked for a moment) is retried inside the call with
  exponential backoff, a bounded number of times, each retry explained in the log: that is
  how one call is made, not a decision about the clone. CloneNotFoundError is final (for a
  delete it means success). NotOurCloneError and BaseMissingError are never success, not
  even for a stop or a delete. An action that fails stops the rest of its clone's actions for
  this pass.
- The executor reports outcomes and decides nothing about them: the keeper hands the failed
  ones to the planner (planner.failures_after: retries, the retry budget, the breaker). The
  one fact it writes itself is a completed reset (store.mark_clean): the clone is clean.
- Timeouts use the injected clock's monotonic(), so a fake clock can make a call time out.
- Only the thread that calls run() touches the store; workers only talk to the adapters.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from imagepipe.errors import (
    BackendNotFoundError,
    BusyError,
    CloneNotFoundError,
    ImagepipeError,
    OperationFailedError,
)
from imagepipe.log import fields
from imagepipe.pool.actions import (
    Action,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    ResetClone,
    ResumeClone,
    StartClone,
    StopClone,
    SuspendClone,
)
from imagepipe.pool.model import BaseImage, CloneSpec, PoolSpec
from imagepipe.pool.ports import Balancer, Clock, Hypervisor
from imagepipe.pool.store import Store

log = logging.getLogger(__name__)

RECORD_ACTIONS = (RecordClone, ForgetClone, RecordPool)
BaseResolver = Callable[[str, int], BaseImage]  # (image, version) -> the base to clone from


@dataclass(frozen=True)
class ExecutorSettings:
    parallel: int = 4  # actions at the same time
    action_timeout: float = 600.0  # seconds one hypervisor/balancer call may take
    busy_retries: int = 3  # extra attempts after a BusyError
    busy_backoff: float = 1.0  # first retry delay; doubles per attempt
    poll: float = 1.0  # longest real wait between two looks at the clock while calls run


@dataclass(frozen=True)
class Outcome:
    action: Action
    ok: bool
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0  # how long the action ran (0 when it never started)


@dataclass(frozen=True)
class ExecutionReport:
    outcomes: tuple[Outcome, ...] = ()
    skipped: tuple[Action, ...] = ()  # not started: stop requested, or an earlier step failed

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Running:
    action: Action
    journal_id: int
    started: float  # clock.monotonic(): guards against real hangs
    finished: threading.Event


@dataclass(frozen=True)
class _Done:
    key: tuple[str, str]
    action: Action
    error: BaseException | None
    attempts: int


class Executor:
    """Runs actions; one instance lives as long as the keeper."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        balancer: Balancer,
        store: Store,
        bases: BaseResolver,
        clock: Clock,
        settings: ExecutorSettings = ExecutorSettings(),
    ) -> None:
        self.hypervisor = hypervisor
        self.balancer = balancer
        self.store = store
        self.bases = bases
        self.clock = clock
        self.settings = settings
        self._stop = threading.Event()
        # whether an action may start now (the keeper's term as leader lasts); checked
        # before each action's journal entry, so none starts once it says no
        self.gate: Callable[[], bool] = _always
        self.alive: Callable[[], None] = _nothing  # called while run() waits: it is not stuck
        # clones whose timed-out call still runs -> set when that call finally returns
        self._stuck: dict[tuple[str, str], threading.Event] = {}

    def stop(self) -> None:
        """Start no new action; run() returns once the actions in flight are done."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _may_start(self) -> bool:
        return not self.stopping and self.gate()

    def in_flight(self, pool: str) -> frozenset[str]:
        """Clones of `pool` whose call outlived its timeout and still runs."""
        return frozenset(
            clone for (p, clone), gate in self._stuck.items() if p == pool and not gate.is_set()
        )

    # ---- run -------------------------------------------------------------------------

    def run(self, specs: Mapping[str, PoolSpec], actions: Sequence[Action]) -> ExecutionReport:
        """Apply record actions, then run the others; returns when all are done."""
        self._apply_records(actions)
        chains: dict[tuple[str, str], list[Action]] = {}
        for action in actions:
            if not isinstance(action, RECORD_ACTIONS):
                chains.setdefault((action.pool, action.clone), []).append(action)
        outcomes: list[Outcome] = []
        skipped: list[Action] = []
        for key, gate in list(self._stuck.items()):
            if gate.is_set():
                del self._stuck[key]
            elif key in chains:
                log.warning(
                    "skipping actions: an earlier call on this clone is still running",
                    extra=fields(pool=key[0], clone=key[1]),
                )
                skipped += chains.pop(key)
        done: queue.Queue[_Done] = queue.Queue()
        running: dict[tuple[str, str], _Running] = {}
        waiting = list(chains)
        while waiting or running:
            self.alive()
            while waiting and len(running) < self.settings.parallel and self._may_start():
                key = waiting.pop(0)
                action = chains[key].pop(0)
                started = self._start(specs, action, key, done)
                if isinstance(started, Outcome):
                    outcomes.append(started)
                    skipped += chains.pop(key)
                    continue
                running[key] = started
            if waiting and not self._may_start():
                for key in waiting:
                    skipped += chains.pop(key)
                waiting = []
            if not running:
                continue
            finished = self._next_done(done, running)
            if finished is None:
                outcomes += self._expire(running, chains, skipped)
                continue
            entry = running.get(finished.key)
            if entry is None or entry.action is not finished.action:
                continue  # a timed-out call that came back late: already reported
            del running[finished.key]
            outcome = self._finish(entry, finished)
            outcomes.append(outcome)
            if not outcome.ok:
                skipped += chains.pop(finished.key)
            elif chains[finished.key]:
                waiting.append(finished.key)
            else:
                chains.pop(finished.key)
        return ExecutionReport(outcomes=tuple(outcomes), skipped=tuple(skipped))

    def _apply_records(self, actions: Sequence[Action]) -> None:
        by_pool: dict[str, list[Action]] = {}
        for action in actions:
            if isinstance(action, RECORD_ACTIONS):
                by_pool.setdefault(action.pool, []).append(action)
        for pool, records in by_pool.items():
            self.store.apply(pool, records)

    def _start(
        self,
        specs: Mapping[str, PoolSpec],
        action: Action,
        key: tuple[str, str],
        done: queue.Queue[_Done],
    ) -> _Running | Outcome:
        spec = specs.get(action.pool)
        try:
            if spec is None:
                raise OperationFailedError(f"pool {action.pool} is not configured")
            call = self._call_for(spec, action)
        except ImagepipeError as exc:
            self._log(action, ok=False, error=str(exc), seconds=0.0, attempts=0)
            return Outcome(action=action, ok=False, error=str(exc), attempts=0)
        journal_id = self.store.journal_begin(action, self.clock.now())
        started = self.clock.monotonic()  # before the call can begin, so its time all counts
        finished = threading.Event()
        worker = threading.Thread(
            target=self._work,
            args=(key, action, call, done, finished),
            name=f"imagepipe-{action.kind}-{action.clone}",
            daemon=True,
        )
        worker.start()
        return _Running(
            action=action,
            journal_id=journal_id,
            started=started,
            finished=finished,
        )

    def _work(
        self,
        key: tuple[str, str],
        action: Action,
        call: Callable[[], None],
        done: queue.Queue[_Done],
        finished: threading.Event,
    ) -> None:
        attempts = 0
        error: BaseException | None = None
        while True:
            attempts += 1
            try:
                call()
                error = None
            except BusyError as exc:
                error = exc
                if attempts <= self.settings.busy_retries and not self.stopping:
                    delay = self.settings.busy_backoff * 2 ** (attempts - 1)
                    log.info(
                        "busy, retrying",
                        extra=fields(
                            pool=action.pool,
                            clone=action.clone,
                            action=action.kind,
                            attempt=attempts + 1,
                            of=self.settings.busy_retries + 1,
                            delay=delay,
                            reason=str(exc),
                        ),
                    )
                    self.clock.sleep(delay)
                    continue
            except Exception as exc:  # an adapter bug must not kill the keeper
                error = exc
            break
        finished.set()
        done.put(_Done(key=key, action=action, error=error, attempts=attempts))

    def _next_done(
        self, done: queue.Queue[_Done], running: Mapping[tuple[str, str], _Running]
    ) -> _Done | None:
        oldest = min(r.started for r in running.values())
        due = oldest + self._timeout_of_oldest(running) - self.clock.monotonic()
        wait = min(max(0.0, due), self.settings.poll)
        try:
            return done.get(timeout=wait)
        except queue.Empty:
            return None

    def _timeout_of_oldest(self, running: Mapping[tuple[str, str], _Running]) -> float:
        entry = min(running.values(), key=lambda r: r.started)
        return self._timeout(entry.action)

    def _timeout(self, action: Action) -> float:
        if isinstance(action, StopClone):
            return max(self.settings.action_timeout, action.graceful_timeout + 30.0)
        return self.settings.action_timeout

    def _expire(
        self,
        running: dict[tuple[str, str], _Running],
        chains: dict[tuple[str, str], list[Action]],
        skipped: list[Action],
    ) -> list[Outcome]:
        outcomes = []
        now = self.clock.monotonic()
        for key, entry in list(running.items()):
            limit = self._timeout(entry.action)
            if now - entry.started < limit:
                continue
            self._stuck[key] = entry.finished
            running.pop(key)
            error = f"timed out after {limit:.0f}s (the call goes on in the background)"
            self.store.journal_end(entry.journal_id, ok=False, error=error, now=self.clock.now())
            self._log(entry.action, ok=False, error=error, seconds=limit, attempts=1)
            outcomes.append(Outcome(action=entry.action, ok=False, error=error, seconds=limit))
            skipped += chains.pop(key, [])
        return outcomes

    def _finish(self, entry: _Running, done: _Done) -> Outcome:
        seconds = self.clock.monotonic() - entry.started
        error = None if done.error is None else _describe(done.error)
        ok = done.error is None
        self.store.journal_end(entry.journal_id, ok=ok, error=error, now=self.clock.now())
        if ok and isinstance(done.action, ResetClone):
            self.store.mark_clean(done.action.pool, done.action.clone)
        self._log(done.action, ok=ok, error=error, seconds=seconds, attempts=done.attempts)
        return Outcome(
            action=done.action, ok=ok, error=error, attempts=done.attempts, seconds=seconds
        )

    # ---- recovery after a crash ------------------------------------------------------

    def recover(self) -> list[Outcome]:
        """Finish or undo the actions a previous keeper left open in the journal.

        An interrupted create leaves a half-made clone: it is deleted (it was never started,
        so nobody is on it) and the next plan makes it again. An interrupted delete is
        repeated. An interrupted reset is repeated when nobody is on the clone, so the next
        user never gets a half-cleaned desktop. Anything else is closed: the next pass
        observes the real state and plans from there.
        """
        entries = self.store.journal_open()
        if not entries:
            return []
        present = {c.name: c for c in self.hypervisor.list_clones()}
        outcomes = []
        for entry in entries:
            action = entry.action
            try:
                note = self._recover_one(action, action.clone in present)
                ok, error = True, None
            except ImagepipeError as exc:
                note, ok, error = "could not finish it", False, str(exc)
            self.store.journal_end(
                entry.id,
                ok=False,
                error=f"interrupted by a keeper restart; {note}" + (f": {error}" if error else ""),
                now=self.clock.now(),
            )
            log.warning(
                "recovered an interrupted action",
                extra=fields(
                    pool=action.pool,
                    clone=action.clone or None,
                    action=action.kind,
                    outcome=note,
                    error=error,
                ),
            )
            outcomes.append(Outcome(action=action, ok=ok, error=error))
        return outcomes

    def _recover_one(self, action: Action, present: bool) -> str:
        hv, name = self.hypervisor, action.clone
        if isinstance(action, CreateClone):
            if not present:
                return "the clone was never made; the next pass makes it"
            if hv.sessions(name).active:
                return "the clone exists and is in use; kept"
            _tolerate(CloneNotFoundError, lambda: hv.delete(name))
            self.store.forget_clone(action.pool, name)
            return "deleted the half-made clone; the next pass makes it again"
        if isinstance(action, DeleteClone):
            _tolerate(CloneNotFoundError, lambda: hv.delete(name))
            self.store.forget_clone(action.pool, name)
            return "repeated the delete"
        if isinstance(action, ResetClone) and present:
            if hv.sessions(name).active:
                return "somebody is on the clone; not reset"
            hv.reset(name)
            self.store.mark_clean(action.pool, name)
            return "repeated the reset"
        return "the next pass reconciles it"

    # ---- the calls -------------------------------------------------------------------

    def _call_for(self, spec: PoolSpec, action: Action) -> Callable[[], None]:
        """The adapter call for one action; resolving the base happens here, in run()'s
        thread, so workers never touch the registry or the store."""
        hv, bal, name = self.hypervisor, self.balancer, action.clone
        if isinstance(action, CreateClone):
            clone_spec = CloneSpec(
                name=name,
                pool=spec.name,
                slot=action.slot,
                base=self.bases(spec.image, action.version),
                mode=spec.clone,
                cpus=spec.cpus,
                memory=spec.memory,
                display=action.display,
                start=spec.start,
                host=action.host,
            )
            return lambda: _discard(hv.create_clone(clone_spec))
        if isinstance(action, StartClone):
            return lambda: hv.start(name)
        if isinstance(action, StopClone):
            timeout = action.graceful_timeout
            return lambda: _tolerate(CloneNotFoundError, lambda: hv.stop(name, timeout))
        if isinstance(action, ResetClone):
            return lambda: hv.reset(name)
        if isinstance(action, SuspendClone):
            return lambda: hv.suspend(name)
        if isinstance(action, ResumeClone):
            return lambda: hv.resume(name)
        if isinstance(action, DeleteClone):
            return lambda: _tolerate(CloneNotFoundError, lambda: hv.delete(name))
        if isinstance(action, BalancerEnable):
            address = action.address
            return lambda: bal.enable(name, address)
        if isinstance(action, BalancerDrain):
            return lambda: _tolerate(BackendNotFoundError, lambda: bal.drain(name))
        if isinstance(action, BalancerRemove):
            return lambda: _tolerate(BackendNotFoundError, lambda: bal.remove(name))
        raise OperationFailedError(f"the executor does not know how to do {action.kind}")

    def _log(
        self, action: Action, *, ok: bool, error: str | None, seconds: float, attempts: int
    ) -> None:
        extra = fields(
            pool=action.pool,
            clone=action.clone or None,
            action=action.kind,
            seconds=round(seconds, 3),
            attempts=attempts if attempts != 1 else None,
            error=error,
        )
        if ok:
            log.info("action done", extra=extra)
        else:
            log.warning("action failed", extra=extra)


def _describe(error: BaseException) -> str:
    if isinstance(error, ImagepipeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _nothing() -> None:
    """The default `alive` hook: a keeper without a lead has nobody to tell."""


def _always() -> bool:
    return True


def _discard(_: object) -> None:
    return None


def _tolerate(kind: type[Exception], call: Callable[[], None]) -> None:
    """Idempotent removal: 'already gone' is the result we wanted."""
    try:
        call()
    except kind:
        return
