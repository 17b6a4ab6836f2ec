"""The simulated host: clones, their power and sessions, and the balancer's backends.

Operations take time (Latencies); their effect lands when they finish. Observing the world
gives the planner exactly the types the real observe() gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    Power,
)
from imagepipe.units import parse_duration


@dataclass(frozen=True)
class Latencies:
    """Seconds each operation takes on one host (linked clones). `boot` runs after a start,
    reset or create-and-start without holding an executor worker."""

    clone: float = 4.0
    start: float = 1.0
    boot: float = 30.0
    reset: float = 15.0
    delete: float = 3.0
    suspend: float = 5.0
    resume: float = 5.0
    stop: float = 10.0

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
    name: str
    slot: int
    version: int
    power: Power = Power.SHUTOFF
    ready: bool = False
    user: str | None = None  # the logged-in, connected user
    boot_id: int = 0  # bumps on every power change, so a stale "booted" event is ignored
    display: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 0))
    _observed: ObservedClone | None = None

    def changed(self) -> None:
        self._observed = None

    def observe(self, pool: str, backend_state: BackendState | None) -> ObservedClone:
        if self._observed is None:
            info = CloneInfo(
                name=self.name,
                pool=pool,
                slot=self.slot,
                image="sim",
                version=self.version,
                power=self.power,
                display=self.display,
                ready=self.ready,
            )
            session = GuestSession()
            if self.user is not None:
                session = GuestSession(client="10.0.0.1", users=(self.user,))
            backend = None
            if backend_state is not None:
                backend = Backend(
                    name=self.name,
                    address=self.display,
                    state=backend_state,
                    connections=int(self.user is not None),
                )
            self._observed = ObservedClone(info=info, session=session, backend=backend)
        return self._observed

    @property
    def idle(self) -> bool:
        """Running with nobody on it: memory spent for nothing (yet)."""
        return self.power is Power.RUNNING and self.user is None


@dataclass
class World:
    """The host and the balancer. A backend outlives its clone (an orphan) until removed."""

    pool: str
    version: int = 1
    clones: dict[str, SimClone] = field(default_factory=dict)
    backends: dict[str, BackendState] = field(default_factory=dict)

    def observe(self) -> Observed:
        orphans = tuple(
            Backend(name=name, address=Endpoint("127.0.0.1", 0), state=state)
            for name, state in self.backends.items()
            if name not in self.clones
        )
        return Observed(
            clones=tuple(
                c.observe(self.pool, self.backends.get(c.name)) for c in self.clones.values()
            ),
            orphan_backends=orphans,
            target_version=self.version,
            base_ready=True,
        )

    def set_backend(self, name: str, state: BackendState | None) -> None:
        if state is None:
            self.backends.pop(name, None)
        else:
            self.backends[name] = state
        clone = self.clones.get(name)
        if clone is not None:
            clone.changed()

    def takes_users(self, clone: SimClone) -> bool:
        """The balancer would send a new user here."""
        return (
            clone.user is None
            and clone.ready
            and self.backends.get(clone.name) is BackendState.READY
        )
