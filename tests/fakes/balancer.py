"""FakeBalancer: a stateful, honest stand-in for HAProxy.

It keeps backends, their states and connections the way HAProxy does, and raises what the
HAProxy adapter raises for the same case (the contract suite, tests/contract/balancer_suite.py,
pins each one): BackendInUseError for removing a backend with connections,
BackendNotFoundError for draining one that does not exist, BadInputError for a name HAProxy
would not take, BalancerError once closed or while "down"; it refuses connecting to a backend
that is not ready or already has its one user (maxconn 1).

Helpers for tests: `connect(name)` / `disconnect(name)` put a user on or off a backend,
`route()` sends a new client through the frontend (least connections, maxconn 1); both
count in the backend's `sessions_total`, as HAProxy's `stot` does;
`add_unmanaged(...)` adds a backend behind imagepipe's back, `crash()` loses every backend
like an HAProxy restart does, `state.reachable = False` makes every call fail as if its
machine were cut off (until it is set back), `reopen()` is a new adapter on the same
balancer (a keeper restart), and `calls` records what was asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imagepipe.errors import BackendInUseError, BackendNotFoundError, BadInputError, BalancerError
from imagepipe.pool.model import Backend, BackendState, Endpoint
from imagepipe.pool.ports import Balancer

MAXCONN = 1
# the names the HAProxy adapter accepts (imagepipe.balancers.haproxy.runtime.check_name)
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass
class _Server:
    address: Endpoint
    state: BackendState
    connections: int = 0
    sessions_total: int = 0  # connections passed to it since it was added (HAProxy's stot)


@dataclass
class FakeBalancerState:
    """What the balancer process holds; shared by every adapter opened on it."""

    running: bool = True
    reachable: bool = True  # False: nothing answers at all (its machine or link is down)
    frontend_ensured: int = 0
    servers: dict[str, _Server] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)


class FakeBalancer:
    def __init__(self, state: FakeBalancerState | None = None, *, running: bool = True) -> None:
        self.state = state if state is not None else FakeBalancerState(running=running)
        self.closed = False

    @property
    def running(self) -> bool:
        return self.state.running

    @property
    def calls(self) -> list[tuple[str, ...]]:
        return self.state.calls

    @property
    def _servers(self) -> dict[str, _Server]:
        return self.state.servers

    def reopen(self) -> FakeBalancer:
        """A new adapter on the same balancer, as after a keeper restart."""
        return FakeBalancer(self.state)

    # -- Balancer port ---------------------------------------------------------------------

    def ensure_frontend(self) -> None:
        self._check_open()
        self._check_reachable()
        self.calls.append(("ensure_frontend",))
        self.state.running = True
        self.state.frontend_ensured += 1

    def list_backends(self) -> list[Backend]:
        self._check_up()
        return [
            Backend(
                name=name,
                address=s.address,
                state=s.state,
                connections=s.connections,
                sessions_total=s.sessions_total,
            )
            for name, s in sorted(self._servers.items())
        ]

    def enable(self, name: str, address: Endpoint) -> None:
        self._check_up()
        _check_name(name)
        self.calls.append(("enable", name, str(address)))
        server = self._servers.get(name)
        if server is None:
            self._servers[name] = _Server(address, BackendState.READY)
            return
        server.address = address
        server.state = BackendState.READY

    def drain(self, name: str) -> None:
        self._check_up()
        _check_name(name)
        self.calls.append(("drain", name))
        self._get(name).state = BackendState.DRAIN

    def remove(self, name: str) -> None:
        self._check_up()
        _check_name(name)
        self.calls.append(("remove", name))
        server = self._servers.get(name)
        if server is None:
            return
        if server.connections:
            raise BackendInUseError(
                f"backend {name} still has {server.connections} connection(s): drain it and "
                "remove it once they have ended"
            )
        del self._servers[name]

    def close(self) -> None:
        self.closed = True

    # -- test helpers ----------------------------------------------------------------------

    def connect(self, name: str) -> None:
        """A user reaches this backend: only a ready one with a free slot takes them."""
        self._check_up()
        server = self._get(name)
        if server.state is not BackendState.READY:
            raise BalancerError(f"backend {name} is {server.state.value}: no new connections")
        if server.connections >= MAXCONN:
            raise BalancerError(f"backend {name} already has its {MAXCONN} connection(s)")
        server.connections += 1
        server.sessions_total += 1

    def disconnect(self, name: str) -> None:
        self._check_up()
        server = self._get(name)
        if server.connections == 0:
            raise BalancerError(f"backend {name} has no connection to end")
        server.connections -= 1

    def route(self) -> str | None:
        """A new client on the frontend: the ready backend with fewest connections and a free
        slot gets it (ties by name); None when every desktop is busy (HAProxy would queue)."""
        self._check_up()
        candidates = [
            (s.connections, name)
            for name, s in self._servers.items()
            if s.state is BackendState.READY and s.connections < MAXCONN
        ]
        if not candidates:
            return None
        _, name = min(candidates)
        self._servers[name].connections += 1
        self._servers[name].sessions_total += 1
        return name

    def add_unmanaged(
        self, name: str, address: Endpoint, state: BackendState = BackendState.READY
    ) -> None:
        """Somebody else added a backend (an orphan, as far as imagepipe knows)."""
        self._check_up()
        self._servers[name] = _Server(address, state)

    def crash(self) -> None:
        """The balancer process dies: every backend and connection is gone until
        ensure_frontend() starts it again."""
        self.state.running = False
        self.state.servers.clear()

    # -- internals -------------------------------------------------------------------------

    def _get(self, name: str) -> _Server:
        server = self._servers.get(name)
        if server is None:
            raise BackendNotFoundError(f"the balancer has no backend {name}")
        return server

    def _check_open(self) -> None:
        if self.closed:
            raise BalancerError("the balancer was closed")

    def _check_reachable(self) -> None:
        if not self.state.reachable:
            raise BalancerError("the balancer does not answer (its machine or link is down)")

    def _check_up(self) -> None:
        self._check_open()
        self._check_reachable()
        if not self.running:
            raise BalancerError("the balancer is not running: call ensure_frontend()")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise BadInputError(
            f"backend name {name!r} cannot be used with HAProxy: use letters, digits, '-', '_',"
            " '.' or ':' (at most 100)"
        )


def _conforms(balancer: FakeBalancer) -> Balancer:
    return balancer  # mypy checks that FakeBalancer has the port's shape
