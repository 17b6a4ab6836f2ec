"""The simulated host: clones, their power and sessions, and the balancer's backends.

Operations take time (Latencies); their effect lands when they finish. Observing the world
gives the planner exactly the types the real observe() gives it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    Power,
    StartMode,
)
from imagepipe.units import parse_duration

# How a new or recycled desktop comes up: the pool file's `start` (boot | restore).
Start = StartMode

# what World's observations are, once each clone is observed (named once: a subscripted
# type is built again each time the expression runs)
_Snapshot = tuple[ObservedClone, ...]
_ByName = Mapping[str, ObservedClone]

# Enum members read on every event or pass, named once: Python 3.11 reads a member through
# its class (`Power.RUNNING`) on EnumType.__getattr__'s slow path, some 15 times slower.
_RUNNING = Power.RUNNING
_SERVING = BackendState.READY


@dataclass(frozen=True)
class Latencies:
    """Seconds each operation takes on one host (linked clones). `boot` runs after a start,
    reset or create-and-start without holding an executor worker. With start: restore, a
    start or reset is one `restore` call (it holds a worker) and the desktop is ready when it
    returns; the warm parent they restore is made once, `boot` + `save` after the start."""

    clone: float = 4.0
    start: float = 1.0
    boot: float = 30.0
    reset: float = 15.0
    delete: float = 3.0
    suspend: float = 5.0
    resume: float = 5.0
    stop: float = 10.0
    restore: float = 0.8
    save: float = 5.0

    @classmethod
    def parse(cls, items: list[str]) -> Latencies:
        """From ["clone=4s", "boot=45s"]; raises ValueError naming the bad item."""
        values = {name: getattr(cls(), name) for name in cls.__dataclass_fields__}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in values:
                known = ", ".join(values)
                raise ValueError(f"expected NAME=DURATION with NAME one of {known}, got {item!r}")
            values[key] = parse_duration(value)
        return cls(**values)

    def zero(self) -> Latencies:
        return Latencies(*(0.0 for _ in self.__dataclass_fields__))


@dataclass
class SimClone:
    """One simulated clone. Whoever changes its power, readiness or user calls
    World.touch(clone) (before anything is asked of the world again): the world keeps what
    the keeper and the balancer see of it up to date from those calls."""

    name: str
    slot: int
    version: int
    power: Power = Power.SHUTOFF
    ready: bool = False
    user: str | None = None  # the logged-in, connected user
    boot_id: int = 0  # bumps on every power change, so a stale "booted" event is ignored
    display: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 0))

    # what observe() built for each (power, ready) and (backend state, connections): a clone
    # goes through a few of each all day, and frozen records cost more to build than to find
    _infos: dict[tuple[Power, bool], CloneInfo] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _backends: dict[tuple[BackendState, int], Backend] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # and the whole observation with nobody on it (free, booting, suspended, drained), by
    # (power, ready, backend state): most observations are one of these few
    _nobody: dict[tuple[Power, bool, BackendState | None], ObservedClone] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def observe(self, pool: str, backend_state: BackendState | None) -> ObservedClone:
        if self.user is None:
            kept = self._nobody.get((self.power, self.ready, backend_state))
            if kept is not None and kept.info.pool == pool:
                return kept
        info = self._infos.get((self.power, self.ready))
        if info is None or info.pool != pool:
            info = self._infos[self.power, self.ready] = CloneInfo(
                name=self.name,
                pool=pool,
                slot=self.slot,
                image="sim",
                version=self.version,
                power=self.power,
                display=self.display,
                ready=self.ready,
            )
        session = _NOBODY if self.user is None else _session(self.user)
        backend = None
        if backend_state is not None:
            connections = int(self.user is not None)
            backend = self._backends.get((backend_state, connections))
            if backend is None:
                backend = self._backends[backend_state, connections] = Backend(
                    name=self.name,
                    address=self.display,
                    state=backend_state,
                    connections=connections,
                )
        observed = ObservedClone(info=info, session=session, backend=backend)
        if self.user is None:
            self._nobody[self.power, self.ready, backend_state] = observed
        return observed

    @property
    def idle(self) -> bool:
        """Running with nobody on it: memory spent for nothing (yet)."""
        return self.power is _RUNNING and self.user is None


@dataclass
class World:
    """The host and the balancer. A backend outlives its clone (an orphan) until removed.

    A keeper pass observes every clone, and the simulation asks after every event how many
    clones are idle and which ones take users; with hundreds of clones and thousands of
    passes, rebuilding those from scratch dominated a simulated day. So the world keeps them
    up to date incrementally: every change to a clone goes through add, remove, touch or
    set_backend, which mark the clone stale, and a stale clone is looked at again (once)
    the next time any of them is asked for. Same answers as a full scan, in the same order.
    """

    pool: str
    version: int = 1
    clones: dict[str, SimClone] = field(default_factory=dict)  # read-only outside World
    backends: dict[str, BackendState] = field(default_factory=dict)  # read-only outside World
    # each clone's last observation (None: changed since), in the order of `clones`
    _observed: dict[str, ObservedClone | None] = field(default_factory=dict, init=False)
    _snapshot: tuple[ObservedClone, ...] | None = field(default=None, init=False)
    _orphans: tuple[Backend, ...] | None = field(default=None, init=False)
    _last: Observed | None = field(default=None, init=False)  # valid while the two above are
    _unseen: set[str] = field(default_factory=set, init=False)  # changed since observed
    _stale: set[str] = field(default_factory=set, init=False)  # changed since idle/takers
    _idle: set[str] = field(default_factory=set, init=False)  # running, nobody on it
    _takers: dict[str, int] = field(default_factory=dict, init=False)  # the balancer sends
    _by_slot: list[tuple[int, str]] = field(default_factory=list, init=False)  # users: by slot
    _changed: set[str] = field(default_factory=set, init=False)  # since changes() was asked
    _orphaned: set[str] = field(default_factory=set, init=False)  # backends without a clone
    _serial: dict[str, int] = field(default_factory=dict, init=False)  # order of add()
    _added: int = field(default=0, init=False)

    def add(self, clone: SimClone) -> None:
        self.clones[clone.name] = clone
        self._observed[clone.name] = None
        self._orphaned.discard(clone.name)
        self._serial[clone.name] = self._added
        self._added += 1
        self._changed.add(clone.name)
        self._snapshot = self._orphans = None
        self._unseen.add(clone.name)
        self._stale.add(clone.name)

    def remove(self, name: str) -> None:
        del self.clones[name]
        del self._observed[name]
        self._snapshot = self._orphans = None
        if name in self.backends:
            self._orphaned.add(name)
        self._changed.add(name)
        self._unseen.discard(name)
        self._stale.add(name)

    def touch(self, clone: SimClone) -> None:
        """`clone` changed (or is about to, before anything is asked of the world)."""
        self._observed[clone.name] = None
        self._snapshot = None
        self._changed.add(clone.name)
        self._unseen.add(clone.name)
        self._stale.add(clone.name)

    def observe(self, in_flight: frozenset[str] = frozenset()) -> Observed:
        """What the keeper observes (`in_flight`: the clones with an operation running).
        Nothing changed since the last call, with the same `in_flight` object: the same
        observation (it is immutable)."""
        last = self._last
        if (
            last is not None
            and self._snapshot is not None
            and self._orphans is not None
            and last.in_flight is in_flight
            and last.target_version == self.version
        ):
            return last
        if self._snapshot is None:
            observed = self._observed
            for name in self._unseen:
                observed[name] = self.clones[name].observe(self.pool, self.backends.get(name))
            self._unseen.clear()
            self._snapshot = cast(_Snapshot, tuple(observed.values()))
        if self._orphans is None and not self._orphaned:
            self._orphans = ()  # the usual case, cheaper to tell than to scan for
        if self._orphans is None:
            self._orphans = tuple(
                Backend(name=name, address=Endpoint("127.0.0.1", 0), state=state)
                for name, state in self.backends.items()
                if name not in self.clones
            )
        self._last = Observed(
            clones=self._snapshot,
            orphan_backends=self._orphans,
            target_version=self.version,
            base_ready=True,
            in_flight=in_flight,
        )
        return self._last

    def by_name(self) -> Mapping[str, ObservedClone]:
        """The last observe()'s clones by name (read-only; up to date until the next change)."""
        assert self._snapshot is not None, "by_name() reads what observe() built"
        return cast(_ByName, self._observed)

    @property
    def order(self) -> Callable[[str], int]:
        """Where a clone (by name) is in observe()'s clones: later clones have larger
        numbers (a key for sorted(), called once per clone sorted)."""
        return self._serial.__getitem__

    def changes(self) -> set[str]:
        """The clones added, removed or changed since the last call (and forgets them)."""
        changed, self._changed = self._changed, set()
        return changed

    def set_backend(self, name: str, state: BackendState | None) -> None:
        if state is None:
            self.backends.pop(name, None)
            self._orphaned.discard(name)
        else:
            self.backends[name] = state
            if name not in self.clones:
                self._orphaned.add(name)
        self._orphans = None
        clone = self.clones.get(name)
        if clone is not None:
            self.touch(clone)

    def takes_users(self, clone: SimClone) -> bool:
        """The balancer would send a new user here."""
        return clone.user is None and clone.ready and self.backends.get(clone.name) is _SERVING

    def _refresh(self) -> None:
        for name in self._stale:
            clone = self.clones.get(name)
            if clone is not None and clone.idle:
                self._idle.add(name)
            else:
                self._idle.discard(name)
            slot = self._takers.get(name)
            if clone is not None and self.takes_users(clone):
                if slot is None:
                    self._takers[name] = clone.slot
                    insort(self._by_slot, (clone.slot, name))
            elif slot is not None:
                del self._takers[name]
                del self._by_slot[bisect_left(self._by_slot, (slot, name))]
        self._stale.clear()

    def idle(self) -> int:
        """How many clones are running with nobody on them."""
        self._refresh()
        return len(self._idle)

    def takers(self, most: int | None = None) -> list[SimClone]:
        """The clones the balancer would send a new user to, by slot (the first `most`)."""
        self._refresh()
        return [self.clones[name] for _, name in self._by_slot[:most]]

    def taker_count(self) -> int:
        """How many clones the balancer would send a new user to."""
        self._refresh()
        return len(self._takers)


_NOBODY = GuestSession()


@lru_cache(maxsize=4096)
def _session(user: str) -> GuestSession:
    """The session of `user` on a desktop (the same record for every clone and pass)."""
    return GuestSession(client="10.0.0.1", users=(user,))
