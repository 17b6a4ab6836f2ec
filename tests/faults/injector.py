"""A seeded fault schedule and a simulated keeper crash, shared by the faulty port wrappers.

    injector = FaultInjector(random.Random(seed), kinds={FaultKind.BUSY}, rate=0.1)
    injector.crash_at(CrashAt("remove", occurrence=1, point=CrashPoint.AFTER), on_crash=snap)
    hv = FaultyHypervisor(real_or_fake_hypervisor, injector)
    lb = FaultyBalancer(real_or_fake_balancer, injector)

Faults (what a refusing or slow hypervisor or balancer does):

- BUSY: the object is locked by another client (BusyError; BalancerError for a balancer).
- INVALID: the system says the object is in the wrong state for this call.
- FATAL: the call fails for good (FatalHypervisorError / BalancerError).
- TIMEOUT: the system does the work but answers later than the keeper's action timeout.
- HANG: the call never reaches the system and does not return until release_hangs().
- HALF_CREATE: create_clone leaves the clone defined on the host and then fails, as a create
  that died half-way (the clone exists; nobody was told).

Slow faults cost no real time when the injector is given the fake clock (`advance`): the
call moves the clock `late_by` seconds on (past the keeper's action timeout, so the executor
gives up on it at its next look at the clock) and then does not return until
release_hangs() (the harness calls it after the pass). Without a clock, a TIMEOUT answers
`late_by` real seconds late and a HANG waits for release_hangs().

A crash is a `kill -9` of the keeper at a chosen call: BEFORE the request reaches the system
(the keeper journaled it and died) or AFTER the system did it (the keeper died before hearing
back). At that instant `on_crash` runs (the campaign copies the state database there, which is
what survives a kill -9), and from then on every call through this injector fails: with
KeeperCrash (a BaseException, so nothing in the keeper handles it) in the thread that drives
the keeper, with CrashedCall in the executor's worker threads (so the dead keeper's pass
unwinds at once instead of waiting for its action timeout). The dead keeper never reaches the
host again; the harness drops it and starts a new one on the saved state.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum

from imagepipe.errors import (
    BalancerError,
    BusyError,
    FatalHypervisorError,
    InvalidStateError,
    OperationFailedError,
)


class FaultKind(StrEnum):
    BUSY = "busy"
    INVALID = "invalid"
    FATAL = "fatal"
    TIMEOUT = "timeout"
    HANG = "hang"
    HALF_CREATE = "half_create"


class CrashPoint(StrEnum):
    BEFORE = "before"  # journaled, not yet asked
    AFTER = "after"  # done by the system, not yet heard back


# Calls that change the host: every fault kind applies. Reads only fail (busy or fatal): a
# read that hangs has no timeout in the keeper's observe step, by design of that step.
HYPERVISOR_ACTIONS = ("create_clone", "start", "stop", "reset", "suspend", "resume", "delete")
HYPERVISOR_READS = ("list_clones", "sessions", "base_ready", "display")
BALANCER_ACTIONS = ("enable", "drain", "remove")
BALANCER_READS = ("list_backends", "ensure_frontend")
REGISTRY_READS = ("resolve",)
CRASHABLE = ("create_clone", "start", "reset", "delete", "stop", *BALANCER_ACTIONS)
_READ_KINDS = frozenset({FaultKind.BUSY, FaultKind.FATAL})


class KeeperCrash(BaseException):
    """The keeper process died (kill -9) at this call."""


class CrashedCall(Exception):
    """A call made by a worker thread of a keeper that has already died."""


@dataclass(frozen=True)
class CrashAt:
    operation: str  # a port method name, one of CRASHABLE
    occurrence: int  # the n-th call of it, counted from when the crash was armed (1-based)
    point: CrashPoint


@dataclass(frozen=True)
class Injected:
    """One fault or crash that happened, for reports and for replaying a seed by hand."""

    operation: str
    name: str  # clone or backend name ("" for inventory calls)
    kind: str  # a FaultKind value, or "crash-before" / "crash-after"


@dataclass
class FaultInjector:
    """Decides, call by call, whether a call fails and how; seeded, so a run repeats exactly
    as long as the keeper makes the same calls in the same order (parallel=1)."""

    rng: random.Random
    kinds: Collection[FaultKind] = ()
    rate: float = 0.0  # chance that one call gets a fault of one of `kinds`
    hang_limit: float = 30.0  # seconds a HANG waits at most (real time; a safety net)
    late_by: float = 0.0  # seconds a TIMEOUT answers after the call is done
    advance: Callable[[float], None] | None = None  # the fake clock: slow faults take no time
    quiet: bool = False  # no faults (crashes still happen)
    operations: Collection[str] = ()  # only these calls get faults; empty = every call
    guard: Callable[[str, str], None] | None = None  # called before a mutating call
    injected: list[Injected] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # calls per operation
    crashed: bool = False
    _crash: CrashAt | None = None
    _crash_base: int = 0
    _on_crash: Callable[[], None] | None = None
    _owner: threading.Thread | None = None
    _hangs: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _slow: int = 0  # TIMEOUT and HANG calls that have not returned yet
    _slow_done: threading.Condition = field(default_factory=threading.Condition)

    def successor(self) -> FaultInjector:
        """The injector for the next keeper after a crash: same schedule and history, alive."""
        return FaultInjector(
            rng=self.rng,
            kinds=self.kinds,
            rate=self.rate,
            hang_limit=self.hang_limit,
            late_by=self.late_by,
            advance=self.advance,
            quiet=self.quiet,
            operations=self.operations,
            guard=self.guard,
            injected=self.injected,
            counts=Counter(),
        )

    def crash_at(self, crash: CrashAt, on_crash: Callable[[], None] | None = None) -> None:
        """Kill the keeper at that call. Calls from the thread that armed the crash (the one
        driving the keeper) die with KeeperCrash, others with CrashedCall."""
        with self._lock:
            self._crash = crash
            self._crash_base = self.counts[crash.operation]
            self._on_crash = on_crash
            self._owner = threading.current_thread()

    def disarm(self) -> None:
        with self._lock:
            self._crash = None

    def release_hangs(self, wait: float = 5.0) -> None:
        """Let every hanging call return (it fails: it never reached the system), and wait
        (at most `wait` seconds) until every late call has returned too, so the next pass
        starts from the same state on every run of a seed."""
        self._hangs.set()
        self._hangs = threading.Event()
        with self._slow_done:
            self._slow_done.wait_for(lambda: self._slow == 0, timeout=wait)

    def _slow_call(self, delta: int) -> None:
        with self._slow_done:
            self._slow += delta
            self._slow_done.notify_all()

    # ---- used by the wrappers --------------------------------------------------------

    def call(
        self, operation: str, name: str, do: Callable[[], object], *, mutating: bool
    ) -> object:
        """Run `do` (the real call) with whatever this schedule says happens around it."""
        crash_point, fault = self._decide(operation, name, mutating)
        if crash_point is CrashPoint.BEFORE:
            self._die(operation, name, crash_point)
        if fault is FaultKind.HANG:
            self._late(released=True)
            raise fault_error(operation, name, FaultKind.HANG)
        if fault in (FaultKind.BUSY, FaultKind.INVALID, FaultKind.FATAL):
            raise fault_error(operation, name, fault)
        if mutating and self.guard is not None:
            self.guard(operation, name)
        result = do()
        if crash_point is CrashPoint.AFTER:
            self._die(operation, name, crash_point)
        if fault is FaultKind.HALF_CREATE:
            raise fault_error(operation, name, fault)
        if fault is FaultKind.TIMEOUT:
            self._late(released=self.advance is not None)
        return result

    def _late(self, *, released: bool) -> None:
        """A slow call: `late_by` on the fake clock, if there is one; then, `released`,
        until release_hangs() (else `late_by` real seconds)."""
        gate = self._hangs
        self._slow_call(+1)
        try:
            if self.advance is not None:
                self.advance(self.late_by)
            gate.wait(self.hang_limit if released else self.late_by)
        finally:
            self._slow_call(-1)
        self._check_alive()

    def _decide(
        self, operation: str, name: str, mutating: bool
    ) -> tuple[CrashPoint | None, FaultKind | None]:
        with self._lock:
            self._check_alive()
            self.counts[operation] += 1
            crash = self._crash
            if (
                crash is not None
                and crash.operation == operation
                and self.counts[operation] - self._crash_base == crash.occurrence
            ):
                return crash.point, None
            if self.quiet or not self.kinds or self.rng.random() >= self.rate:
                return None, None
            if self.operations and operation not in self.operations:
                return None, None
            allowed = [k for k in self.kinds if _applies(k, operation, mutating)]
            if not allowed:
                return None, None
            fault = self.rng.choice(sorted(allowed))
            self.injected.append(Injected(operation, name, fault.value))
            return None, fault

    def _die(self, operation: str, name: str, point: CrashPoint) -> None:
        with self._lock:
            if not self.crashed:
                self.crashed = True
                self.injected.append(Injected(operation, name, f"crash-{point.value}"))
                if self._on_crash is not None:
                    self._on_crash()
        self._check_alive()

    def _check_alive(self) -> None:
        if not self.crashed:
            return
        if threading.current_thread() is self._owner:
            raise KeeperCrash("the keeper was killed")
        raise CrashedCall("this keeper was killed; its call never happened")


def _applies(kind: FaultKind, operation: str, mutating: bool) -> bool:
    if not mutating:
        return kind in _READ_KINDS
    if kind is FaultKind.HALF_CREATE:
        return operation == "create_clone"
    return True


def fault_error(operation: str, name: str, kind: FaultKind) -> Exception:
    """The typed error a real adapter raises for this kind of failure."""
    what = f"{operation} {name}".strip()
    if operation in REGISTRY_READS:
        return OperationFailedError(f"injected: registry {name}: permission denied")
    balancer = operation in BALANCER_ACTIONS or operation in BALANCER_READS
    if kind is FaultKind.BUSY:
        message = f"injected: {what}: the object is locked by another client"
        return BalancerError(message) if balancer else BusyError(message)
    if kind is FaultKind.INVALID:
        message = f"injected: {what}: requested operation is not valid in this state"
        return BalancerError(message) if balancer else InvalidStateError(message)
    if kind is FaultKind.HANG:
        message = f"injected: {what}: no answer (the request was lost)"
        return BalancerError(message) if balancer else FatalHypervisorError(message)
    if kind is FaultKind.HALF_CREATE:
        return FatalHypervisorError(f"injected: {what}: died half-way; the clone is defined")
    message = f"injected: {what}: internal error"
    return BalancerError(message) if balancer else FatalHypervisorError(message)
