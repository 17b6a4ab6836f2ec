"""The contract every Hypervisor adapter keeps (imagepipe.pool.ports).

Subclass `HypervisorContract` in a test module and provide two fixtures:

    class TestFakeHypervisor(HypervisorContract):
        @pytest.fixture
        def hypervisor(self) -> Iterator[Hypervisor]: ...   # clean up every clone it made
        @pytest.fixture
        def base_image(self) -> BaseImage: ...              # a base clones can be made from

Optionally override `contract_pool` (the pool name every clone of a test uses; unique per
test by default so a real host never sees a collision) and `display_port` (a free TCP port).
The suite never waits for a guest to boot: it checks what the port promises.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable

import pytest

from imagepipe.errors import CloneNotFoundError, InvalidStateError
from imagepipe.pool.model import BaseImage, CloneInfo, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import Hypervisor, HypervisorEvent

MiB = 1024**2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class HypervisorContract:
    """Behaviour every adapter must show. Subclasses provide `hypervisor` and `base_image`."""

    @pytest.fixture
    def hypervisor(self) -> Hypervisor:
        raise NotImplementedError("a contract test class must provide the hypervisor fixture")

    @pytest.fixture
    def base_image(self) -> BaseImage:
        raise NotImplementedError("a contract test class must provide the base_image fixture")

    @pytest.fixture
    def contract_pool(self) -> str:
        return "ct" + secrets.token_hex(3)

    @pytest.fixture
    def make_spec(self, base_image: BaseImage, contract_pool: str) -> Callable[..., CloneSpec]:
        def make(slot: int = 1, mode: CloneMode = CloneMode.LINKED) -> CloneSpec:
            return CloneSpec(
                name=f"{contract_pool}-{slot}",
                pool=contract_pool,
                slot=slot,
                base=base_image,
                mode=mode,
                cpus=1,
                memory=128 * MiB,
                display=Endpoint("127.0.0.1", free_port()),
            )

        return make

    @staticmethod
    def _listed(hv: Hypervisor, name: str) -> CloneInfo | None:
        return next((c for c in hv.list_clones() if c.name == name), None)

    # -- create and list ------------------------------------------------------------------

    def test_a_created_clone_is_listed_with_its_pool_image_version_and_slot(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec(slot=3)
        created = hypervisor.create_clone(spec)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None
        assert (listed.pool, listed.slot, listed.image, listed.version) == (
            spec.pool,
            3,
            spec.base.image,
            spec.base.version,
        )
        assert created.name == listed.name == spec.name
        assert listed.power is Power.SHUTOFF
        assert listed.ready is False

    def test_creating_the_same_clone_twice_succeeds_and_leaves_one_clone(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        again = hypervisor.create_clone(spec)
        assert again.name == spec.name
        assert [c.name for c in hypervisor.list_clones()].count(spec.name) == 1

    def test_a_full_clone_is_listed_like_a_linked_one(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec(slot=2, mode=CloneMode.FULL)
        hypervisor.create_clone(spec)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.slot == 2

    def test_a_complete_powered_off_base_is_ready_for_cloning(
        self, hypervisor: Hypervisor, base_image: BaseImage
    ) -> None:
        assert hypervisor.base_ready(base_image) is True

    # -- power ----------------------------------------------------------------------------

    def test_start_powers_the_clone_on_and_starting_it_again_succeeds(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.start(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.RUNNING

    def test_stop_powers_the_clone_off_and_stopping_it_again_succeeds(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.stop(spec.name, timeout=1.0)
        hypervisor.stop(spec.name, timeout=1.0)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF

    def test_reset_leaves_the_clone_running(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.reset(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.RUNNING

    def test_suspend_and_resume_a_running_clone(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.suspend(spec.name)
        hypervisor.suspend(spec.name)
        suspended = self._listed(hypervisor, spec.name)
        hypervisor.resume(spec.name)
        hypervisor.resume(spec.name)
        resumed = self._listed(hypervisor, spec.name)
        assert suspended is not None and suspended.power is Power.SUSPENDED
        assert resumed is not None and resumed.power is Power.RUNNING

    def test_suspending_a_powered_off_clone_is_refused_as_invalid_state(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        with pytest.raises(InvalidStateError):
            hypervisor.suspend(spec.name)

    # -- delete ---------------------------------------------------------------------------

    def test_delete_removes_a_running_clone_and_deleting_it_again_succeeds(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.delete(spec.name)
        hypervisor.delete(spec.name)
        assert self._listed(hypervisor, spec.name) is None

    def test_deleting_a_clone_that_never_existed_succeeds(
        self, hypervisor: Hypervisor, contract_pool: str
    ) -> None:
        hypervisor.delete(f"{contract_pool}-99")

    @pytest.mark.parametrize(
        "operation",
        ["start", "stop", "reset", "suspend", "resume", "display", "sessions"],
    )
    def test_operations_on_a_missing_clone_raise_clone_not_found(
        self, hypervisor: Hypervisor, contract_pool: str, operation: str
    ) -> None:
        name = f"{contract_pool}-98"
        calls: dict[str, Callable[[], object]] = {
            "start": lambda: hypervisor.start(name),
            "stop": lambda: hypervisor.stop(name, timeout=1.0),
            "reset": lambda: hypervisor.reset(name),
            "suspend": lambda: hypervisor.suspend(name),
            "resume": lambda: hypervisor.resume(name),
            "display": lambda: hypervisor.display(name),
            "sessions": lambda: hypervisor.sessions(name),
        }
        with pytest.raises(CloneNotFoundError):
            calls[operation]()

    # -- display, sessions, events ----------------------------------------------------------

    def test_display_is_the_endpoint_the_clone_was_created_with(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        assert hypervisor.display(spec.name) == spec.display
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.display == spec.display

    def test_an_idle_clone_has_no_session(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        stopped = hypervisor.sessions(spec.name)
        hypervisor.start(spec.name)
        running = hypervisor.sessions(spec.name)
        assert not stopped.active
        assert not running.connected and running.users == ()

    def test_a_closed_subscription_gets_no_more_events(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        events: list[HypervisorEvent] = []
        subscription = hypervisor.subscribe(events.append)
        subscription.close()
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.stop(spec.name, timeout=1.0)
        assert events == []
