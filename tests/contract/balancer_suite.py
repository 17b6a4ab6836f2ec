"""The contract every Balancer adapter passes (FakeBalancer and real HAProxy alike).

Use it by subclassing `BalancerContract` in a `Test...` class that provides two fixtures:

- `balancer`: a fresh, empty balancer whose frontend is up;
- `harness`: a `BalancerHarness` for that balancer: desktop addresses that accept
  connections, clients that connect through the frontend, and a way to add a backend
  behind imagepipe's back.

Errors every adapter raises for the same case (docs/contracts.md has the table):
BackendNotFoundError for drain of a backend the balancer does not have (enable adds it, remove
succeeds), BackendInUseError for remove while clients are connected (nothing changes),
BadInputError for a backend name that could smuggle a command (nothing changes), BalancerError
for any call on a closed adapter. Enable cancels a drain; drain, enable and remove are
idempotent. Each backend's `sessions_total` counts the clients the frontend passed to it
since it was added: enable keeps it, remove and enable again starts it over at 0 (the
keeper's evidence of sessions it did not see, README "Dirty until reset").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pytest

from imagepipe.errors import (
    BackendInUseError,
    BackendNotFoundError,
    BadInputError,
    BalancerError,
)
from imagepipe.pool.model import Backend, BackendState, Endpoint
from imagepipe.pool.ports import Balancer
from imagepipe.record import replace


class ClientConnection(Protocol):
    @property
    def landed_on(self) -> Endpoint | None:
        """The desktop that took this client; None when it is still waiting (queued)."""
        ...

    def alive(self) -> bool:
        """A round trip through the balancer to the desktop still works."""
        ...

    def close(self) -> None: ...


class BalancerHarness(Protocol):
    def desktop(self, index: int) -> Endpoint:
        """Address of a desktop that accepts connections (index 0, 1, 2, ...)."""
        ...

    def connect(self) -> ClientConnection:
        """A new client connecting to the frontend, as a user would."""
        ...

    def add_unmanaged(self, name: str, address: Endpoint) -> None:
        """Add a ready backend without going through the adapter."""
        ...

    def reopen(self) -> Balancer:
        """A new adapter on the same balancer, as after a keeper restart."""
        ...

    def eventually(self, check: Callable[[], bool], what: str) -> None:
        """Assert `check` becomes true (a real balancer may need a moment)."""
        ...


def by_name(balancer: Balancer) -> dict[str, Backend]:
    return {b.name: b for b in balancer.list_backends()}


def listed(balancer: Balancer) -> list[Backend]:
    """The backends as the cases below compare them: name, address, state, connections
    (the session counter has cases of its own)."""
    return [replace(b, sessions_total=None) for b in balancer.list_backends()]


def sessions_total(balancer: Balancer, name: str) -> int | None:
    return by_name(balancer)[name].sessions_total


class BalancerContract:
    def test_a_new_balancer_has_no_backends(self, balancer: Balancer) -> None:
        assert balancer.list_backends() == []

    def test_ensure_frontend_twice_is_harmless(self, balancer: Balancer) -> None:
        balancer.ensure_frontend()
        balancer.ensure_frontend()
        assert balancer.list_backends() == []

    def test_enabled_backend_is_listed_ready_with_its_address(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.READY, 0)]

    def test_enabling_twice_keeps_one_ready_backend(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-1", harness.desktop(0))
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.READY, 0)]

    def test_enabling_with_a_new_address_moves_the_backend(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-1", harness.desktop(1))
        assert by_name(balancer)["lab-1"].address == harness.desktop(1)
        client = harness.connect()
        assert client.landed_on == harness.desktop(1)
        client.close()

    def test_a_client_reaches_a_ready_desktop_and_is_counted(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        assert client.landed_on == harness.desktop(0)
        assert client.alive()
        assert by_name(balancer)["lab-1"].connections == 1
        client.close()
        harness.eventually(
            lambda: by_name(balancer)["lab-1"].connections == 0, "connection count back to 0"
        )

    def test_one_desktop_never_gets_two_users(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-2", harness.desktop(1))
        first, second = harness.connect(), harness.connect()
        assert {first.landed_on, second.landed_on} == {harness.desktop(0), harness.desktop(1)}
        assert [b.connections for b in balancer.list_backends()] == [1, 1]
        first.close()
        second.close()

    def test_a_second_client_waits_rather_than_share_a_desktop(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        first = harness.connect()
        second = harness.connect()
        assert first.landed_on == harness.desktop(0)
        assert second.landed_on is None
        assert by_name(balancer)["lab-1"].connections >= 1
        second.close()
        first.close()

    def test_drained_backend_keeps_its_open_connection(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        balancer.drain("lab-1")
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.DRAIN, 1)]
        assert client.alive()
        client.close()

    def test_drained_backend_gets_no_new_clients(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-2", harness.desktop(1))
        balancer.drain("lab-1")
        client = harness.connect()
        assert client.landed_on == harness.desktop(1)
        client.close()

    def test_draining_twice_is_harmless(self, balancer: Balancer, harness: BalancerHarness) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.drain("lab-1")
        balancer.drain("lab-1")
        assert by_name(balancer)["lab-1"].state is BackendState.DRAIN

    def test_draining_a_missing_backend_says_it_is_missing_and_adds_nothing(
        self, balancer: Balancer
    ) -> None:
        with pytest.raises(BackendNotFoundError, match="lab-9"):
            balancer.drain("lab-9")
        assert balancer.list_backends() == []

    def test_draining_a_removed_backend_says_it_is_missing(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.remove("lab-1")
        with pytest.raises(BackendNotFoundError, match="lab-1"):
            balancer.drain("lab-1")
        assert balancer.list_backends() == []

    def test_enabling_a_drained_backend_keeps_its_open_connection(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        balancer.drain("lab-1")
        balancer.enable("lab-1", harness.desktop(0))
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.READY, 1)]
        assert client.alive()
        client.close()

    def test_enabling_a_drained_backend_makes_it_ready_again(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.drain("lab-1")
        balancer.enable("lab-1", harness.desktop(0))
        assert by_name(balancer)["lab-1"].state is BackendState.READY
        client = harness.connect()
        assert client.landed_on == harness.desktop(0)
        client.close()

    def test_drain_is_read_back_by_a_new_adapter(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-2", harness.desktop(1))
        balancer.drain("lab-1")
        balancer.close()
        again = harness.reopen()
        again.ensure_frontend()
        assert {b.name: b.state for b in again.list_backends()} == {
            "lab-1": BackendState.DRAIN,
            "lab-2": BackendState.READY,
        }

    def test_removing_an_idle_backend_takes_it_out(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.enable("lab-2", harness.desktop(1))
        balancer.drain("lab-1")
        balancer.remove("lab-1")
        assert [b.name for b in balancer.list_backends()] == ["lab-2"]

    def test_removing_a_backend_with_a_live_connection_is_refused(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        balancer.drain("lab-1")
        with pytest.raises(BackendInUseError, match="connection"):
            balancer.remove("lab-1")
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.DRAIN, 1)]
        assert client.alive()
        client.close()
        harness.eventually(
            lambda: by_name(balancer)["lab-1"].connections == 0, "the session to end"
        )
        balancer.remove("lab-1")
        assert balancer.list_backends() == []

    def test_removing_a_ready_backend_with_a_live_connection_is_refused(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        with pytest.raises(BackendInUseError, match="lab-1"):
            balancer.remove("lab-1")
        assert listed(balancer) == [Backend("lab-1", harness.desktop(0), BackendState.READY, 1)]
        assert client.alive()
        client.close()

    def test_removing_a_missing_backend_succeeds(self, balancer: Balancer) -> None:
        balancer.remove("lab-9")
        assert balancer.list_backends() == []

    def test_removing_twice_succeeds(self, balancer: Balancer, harness: BalancerHarness) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.remove("lab-1")
        balancer.remove("lab-1")
        assert balancer.list_backends() == []

    def test_a_removed_backend_enabled_again_is_ready_and_takes_clients(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.drain("lab-1")
        balancer.remove("lab-1")
        balancer.enable("lab-1", harness.desktop(1))
        assert listed(balancer) == [Backend("lab-1", harness.desktop(1), BackendState.READY, 0)]
        client = harness.connect()
        assert client.landed_on == harness.desktop(1)
        client.close()

    @pytest.mark.parametrize(
        "name", ["lab 1", "lab-1\nshow info", "lab-1\n", "", "lab/1", "a" * 101]
    )
    @pytest.mark.parametrize("operation", ["enable", "drain", "remove"])
    def test_a_backend_name_that_could_smuggle_a_command_is_refused(
        self, balancer: Balancer, harness: BalancerHarness, name: str, operation: str
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        before = balancer.list_backends()
        calls: dict[str, Callable[[], None]] = {
            "enable": lambda: balancer.enable(name, harness.desktop(1)),
            "drain": lambda: balancer.drain(name),
            "remove": lambda: balancer.remove(name),
        }
        with pytest.raises(BadInputError):
            calls[operation]()
        assert balancer.list_backends() == before

    @pytest.mark.parametrize("operation", ["list", "enable", "drain", "remove", "frontend"])
    def test_a_closed_adapter_refuses_every_call(
        self, balancer: Balancer, harness: BalancerHarness, operation: str
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        balancer.close()
        calls: dict[str, Callable[[], object]] = {
            "list": balancer.list_backends,
            "enable": lambda: balancer.enable("lab-2", harness.desktop(1)),
            "drain": lambda: balancer.drain("lab-1"),
            "remove": lambda: balancer.remove("lab-1"),
            "frontend": balancer.ensure_frontend,
        }
        with pytest.raises(BalancerError, match="closed"):
            calls[operation]()
        assert {b.name for b in harness.reopen().list_backends()} == {"lab-1"}

    def test_a_backend_added_behind_our_back_is_listed_and_can_be_removed(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        harness.add_unmanaged("stray-7", harness.desktop(1))
        assert {b.name for b in balancer.list_backends()} == {"lab-1", "stray-7"}
        balancer.remove("stray-7")
        assert [b.name for b in balancer.list_backends()] == ["lab-1"]

    # ---- the session counter: evidence of sessions the keeper did not see ---------------

    def test_a_client_through_the_frontend_is_counted_in_sessions_total(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        assert sessions_total(balancer, "lab-1") == 0
        client = harness.connect()
        assert client.landed_on == harness.desktop(0)
        harness.eventually(lambda: sessions_total(balancer, "lab-1") == 1, "stot 1")
        client.close()
        harness.eventually(
            lambda: by_name(balancer)["lab-1"].connections == 0, "connection count back to 0"
        )
        assert sessions_total(balancer, "lab-1") == 1, "a counter, not the open connections"

    def test_enabling_an_existing_backend_keeps_its_session_count(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        harness.eventually(lambda: sessions_total(balancer, "lab-1") == 1, "stot 1")
        client.close()
        harness.eventually(
            lambda: by_name(balancer)["lab-1"].connections == 0, "connection count back to 0"
        )
        balancer.enable("lab-1", harness.desktop(0))
        balancer.drain("lab-1")
        balancer.enable("lab-1", harness.desktop(0))
        balancer.close()
        again = harness.reopen()
        again.ensure_frontend()
        assert sessions_total(again, "lab-1") == 1

    def test_a_removed_backend_enabled_again_counts_from_zero(
        self, balancer: Balancer, harness: BalancerHarness
    ) -> None:
        balancer.enable("lab-1", harness.desktop(0))
        client = harness.connect()
        harness.eventually(lambda: sessions_total(balancer, "lab-1") == 1, "stot 1")
        client.close()
        harness.eventually(
            lambda: by_name(balancer)["lab-1"].connections == 0, "connection count back to 0"
        )
        balancer.drain("lab-1")
        balancer.remove("lab-1")
        balancer.enable("lab-1", harness.desktop(0))
        assert sessions_total(balancer, "lab-1") == 0
