"""Several balancer instances kept in step: a balancer pair (or more) behind one address.

Users reach one address that keepalived (VRRP) moves between machines, each running its own
HAProxy. Whichever holds the address must already have every desktop with the right state, so
the keeper writes each change to every instance, and each pass (ensure_frontend) puts back
what an instance lost: an HAProxy that restarted comes back empty and gets every backend
again, with its drain state.

What the keeper reads back is one balancer:
- a backend is listed when any reachable instance has it; its state is the most restrictive
  one an instance holds (maint, then drain, then ready), its address the first instance's;
- `connections` is the sum over the reachable instances;
- `sessions_total` is the sum of the instances' counters plus what instances lost while this
  group watched (a restart starts an instance's counter over at 0): it only grows while the
  backend exists, so a session through any instance raises it and the keeper's evidence rule
  (pool/planner/steps.py connected_since) sees it. Removing the backend starts it over at 0.

An instance that does not answer does not stop the others: calls go to the instances that
answer, the unreachable one is named in `health()` and logged once when it goes and once when
it comes back; it is put in step on the first pass after it answers again. Only when no
instance answers does a call fail (BalancerError).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

from imagepipe.errors import (
    BackendInUseError,
    BackendNotFoundError,
    BadInputError,
    BalancerError,
    EnvironmentMissingError,
)
from imagepipe.log import fields
from imagepipe.pool.model import Backend, BackendState, Endpoint, InstanceHealth
from imagepipe.pool.ports import Balancer
from imagepipe.record import replace

log = logging.getLogger(__name__)

T = TypeVar("T")

# most restrictive first: a backend one instance drains is drained everywhere
_RESTRICTIVE = {BackendState.MAINT: 0, BackendState.DRAIN: 1, BackendState.READY: 2}


class _Down(Exception):
    """An instance did not answer (internal: the group goes on with the others)."""


class BalancerGroup:
    """Implements imagepipe.pool.ports.Balancer over several balancers kept in step."""

    def __init__(self, instances: Sequence[tuple[str, Balancer]]) -> None:
        if not instances:
            raise BadInputError("a balancer group needs at least one instance")
        names = [name for name, _ in instances]
        if len(set(names)) != len(names):
            raise BadInputError(f"balancer instance names repeat: {', '.join(names)}")
        self._instances = list(instances)
        self._errors: dict[str, str | None] = {name: None for name in names}
        self._counts: dict[str, int | None] = {name: None for name in names}
        # per (instance, backend): the session counter last read; per backend: what the
        # instances' counters lost at restarts since this group first saw the backend
        self._seen: dict[tuple[str, str], int] = {}
        self._lost: dict[str, int] = {}
        # what this group was asked since it started: the state it set (enable, drain) and
        # the backends it removed, which an instance that missed the call must not spread
        self._intent: dict[str, Backend] = {}
        self._removed: set[str] = set()
        self._closed = False

    # -- Balancer port ---------------------------------------------------------------------

    def ensure_frontend(self) -> None:
        """Every instance listening, then every instance holding the same backends with the
        same states (an instance that restarted gets them back)."""
        self._check_open()
        self._on_each(lambda b: b.ensure_frontend())
        listings = self._listings()
        wanted = _merged(listings) | self._intent
        for name, backends in listings.items():
            self._account(name, backends)  # before putting back what a restart lost
            have = {b.name: b for b in backends}
            balancer = self._balancer(name)
            try:
                self._put_in_step(name, balancer, have, wanted)
            except _Down:
                continue

    def list_backends(self) -> list[Backend]:
        self._check_open()
        listings = self._listings()
        for instance, backends in listings.items():
            self._account(instance, backends)
        by_instance = {i: {b.name: b for b in bs} for i, bs in listings.items()}
        return [
            Backend(
                name=name,
                address=backend.address,
                state=backend.state,
                connections=sum(h[name].connections for h in by_instance.values() if name in h),
                sessions_total=self._total(name, by_instance),
            )
            for name, backend in _merged(listings).items()
        ]

    def enable(self, name: str, address: Endpoint) -> None:
        self._check_open()
        self._on_each(lambda b: b.enable(name, address))
        self._intent[name] = Backend(name, address, BackendState.READY)
        self._removed.discard(name)

    def drain(self, name: str) -> None:
        """Drain on every instance that has the backend; an instance that lost it gets it
        back on the next pass (ensure_frontend). BackendNotFoundError when none has it."""
        self._check_open()
        found = self._on_each(lambda b: _drained(b, name))
        if not any(found):
            raise BackendNotFoundError(
                f"backend {name} is not in any balancer instance, so it cannot be drained"
            )
        known = self._intent.get(name)
        if known is not None:
            self._intent[name] = replace(known, state=BackendState.DRAIN)

    def remove(self, name: str) -> None:
        """Refused while any instance has a connection to it; then removed from each."""
        self._check_open()
        listing = {b.name: b for b in self.list_backends()}
        backend = listing.get(name)
        if backend is not None and backend.connections:
            raise BackendInUseError(
                f"backend {name} still has {backend.connections} connection(s) over the "
                "balancer instances: drain it and remove it once they have ended"
            )
        self._on_each(lambda b: b.remove(name))
        self._intent.pop(name, None)
        self._removed.add(name)
        self._lost.pop(name, None)
        for key in [k for k in self._seen if k[1] == name]:
            del self._seen[key]

    def close(self) -> None:
        for _, balancer in self._instances:
            balancer.close()
        self._closed = True

    # -- for status ------------------------------------------------------------------------

    def health(self) -> list[InstanceHealth]:
        """Each instance as the last call found it."""
        return [
            InstanceHealth(
                name=name,
                reachable=self._errors[name] is None,
                error=self._errors[name],
                backends=self._counts[name] if self._errors[name] is None else None,
            )
            for name, _ in self._instances
        ]

    def instances(self) -> list[tuple[str, Balancer]]:
        return list(self._instances)

    # -- internals -------------------------------------------------------------------------

    def _put_in_step(
        self, name: str, balancer: Balancer, have: dict[str, Backend], wanted: dict[str, Backend]
    ) -> None:
        for gone in sorted(self._removed & have.keys()):
            try:
                self._call(name, partial(balancer.remove, gone))
            except BackendInUseError:
                continue  # a client came in through it while it was away: removed later
            log.info("balancer instance put in step", extra=fields(instance=name, removed=gone))
        for backend in wanted.values():
            mine = have.get(backend.name)
            if backend.name in self._removed or backend.state is BackendState.MAINT:
                continue  # being removed: never spread
            if mine is not None and mine.state is backend.state:
                continue
            self._call(name, partial(_put, balancer, backend))
            log.info(
                "balancer instance put in step",
                extra=fields(
                    instance=name,
                    clone=backend.name,
                    state=backend.state.value,
                    was="missing" if mine is None else mine.state.value,
                ),
            )

    def _balancer(self, name: str) -> Balancer:
        return next(b for n, b in self._instances if n == name)

    def _listings(self) -> dict[str, list[Backend]]:
        listings: dict[str, list[Backend]] = {}
        for name, balancer in self._instances:
            try:
                listings[name] = self._call(name, balancer.list_backends)
            except _Down:
                continue
            self._counts[name] = len(listings[name])
        if not listings:
            raise BalancerError(f"no balancer instance answers: {self._summary()}")
        return listings

    def _on_each(self, action: Callable[[Balancer], T]) -> list[T]:
        """`action` on every instance that answers; typed errors (in use, not found, bad
        input, closed) stop and propagate; BalancerError when none answers."""
        results = []
        for name, balancer in self._instances:
            try:
                results.append(self._call(name, partial(action, balancer)))
            except _Down:
                continue
        if not results:
            raise BalancerError(f"no balancer instance answers: {self._summary()}")
        return results

    def _call(self, name: str, action: Callable[[], T]) -> T:
        try:
            result = action()
        except (BackendInUseError, BackendNotFoundError, BadInputError):
            self._up(name)
            raise
        except (BalancerError, EnvironmentMissingError) as exc:
            self._down(name, str(exc))
            raise _Down(name) from exc
        self._up(name)
        return result

    def _down(self, name: str, error: str) -> None:
        if self._errors[name] is None:
            log.warning(
                "balancer instance unreachable; the others are kept",
                extra=fields(instance=name, error=error),
            )
        self._errors[name] = error

    def _up(self, name: str) -> None:
        if self._errors[name] is not None:
            log.info("balancer instance answers again", extra=fields(instance=name))
        self._errors[name] = None

    def _summary(self) -> str:
        return "; ".join(f"{n}: {e}" for n, e in self._errors.items() if e is not None)

    def _account(self, instance: str, backends: list[Backend]) -> None:
        """A counter that went down, or a backend the instance no longer has, is an instance
        that started over: what it had counted is kept in `_lost`."""
        present = {b.name: b.sessions_total for b in backends}
        for key in [k for k in self._seen if k[0] == instance]:
            before = self._seen[key]
            if key[1] in present and present[key[1]] is None:
                continue
            now = present.get(key[1])
            if now is None or now < before:
                self._lost[key[1]] = self._lost.get(key[1], 0) + before
                del self._seen[key]
        for name, total in present.items():
            if total is not None:
                self._seen[(instance, name)] = total

    def _total(self, name: str, by_instance: dict[str, dict[str, Backend]]) -> int | None:
        """Counters of the instances that answered, the last count of those that did not,
        plus what restarts lost."""
        total = self._lost.get(name, 0)
        for instance, _ in self._instances:
            if instance not in by_instance:
                total += self._seen.get((instance, name), 0)
                continue
            mine = by_instance[instance].get(name)
            if mine is None:
                continue
            if mine.sessions_total is None:
                return None
            total += mine.sessions_total
        return total

    def _check_open(self) -> None:
        if self._closed:
            raise BalancerError("the balancer group was closed; build a new one")


def _merged(listings: dict[str, list[Backend]]) -> dict[str, Backend]:
    """Every backend any instance has: the first instance's address, the most restrictive
    state."""
    merged: dict[str, Backend] = {}
    for backends in listings.values():
        for backend in backends:
            known = merged.get(backend.name)
            if known is None:
                merged[backend.name] = backend
            elif _RESTRICTIVE[backend.state] < _RESTRICTIVE[known.state]:
                merged[backend.name] = Backend(known.name, known.address, backend.state)
    return merged


def _put(balancer: Balancer, backend: Backend) -> None:
    """Give `balancer` the backend in the state it has elsewhere. A drained or maint backend
    is added then drained at once (the port has no add-drained); on an instance that just
    came back this is before the address moves to it."""
    balancer.enable(backend.name, backend.address)
    if backend.state is not BackendState.READY:
        balancer.drain(backend.name)


def _drained(balancer: Balancer, name: str) -> bool:
    try:
        balancer.drain(name)
    except BackendNotFoundError:
        return False
    return True
