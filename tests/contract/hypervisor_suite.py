"""The contract every Hypervisor adapter keeps (imagepipe.pool.ports).

Subclass `HypervisorContract` in a test module and provide three fixtures:

    class TestFakeHypervisor(HypervisorContract):
        @pytest.fixture
        def hypervisor(self) -> Iterator[Hypervisor]: ...   # clean up every clone it made
        @pytest.fixture
        def base_image(self) -> BaseImage: ...              # a base clones can be made from
        @pytest.fixture
        def foreign_vm(self, contract_pool) -> Iterator[ForeignVM]: ...
            # a powered-off VM named f"{contract_pool}-7" that imagepipe did not make
            # (no imagepipe metadata); remove it afterwards
        @pytest.fixture
        def base_in_use(self, base_image) -> BaseInUse: ...
            # a context manager: base_image is running (a VM writes it) inside the block

Optionally override `contract_pool` (the pool name every clone of a test uses; unique per
test by default so a real host never sees a collision), `occupy_display` (by default a real
socket listens on the endpoint: "another program holds the port") and `missing_base` (a base
whose files are gone; by default `base_image` moved to a directory that does not exist).
The suite never waits for a guest to boot: it checks what the port promises.

Errors every adapter raises for the same case (docs/contracts.md has the table):
CloneNotFoundError when no VM of that name exists (delete succeeds instead),
NotOurCloneError when one exists that imagepipe did not make or another pool owns (never
touched, never success), InvalidStateError when the power state does not fit (start while
suspended, suspend/resume while off, a create over this pool's clone of another version),
BaseMissingError when the base is gone, DisplayInUseError when the display port is taken.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import pytest

from imagepipe.errors import (
    BaseMissingError,
    CloneNotFoundError,
    DisplayInUseError,
    InvalidStateError,
    NotOurCloneError,
)
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneMode,
    CloneSpec,
    Endpoint,
    Power,
    StartMode,
)
from imagepipe.pool.ports import Hypervisor, HypervisorEvent, Notifier
from imagepipe.record import replace

MiB = 1024**2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ForeignVM(Protocol):
    """A VM on the same host that imagepipe did not make."""

    @property
    def name(self) -> str: ...

    def power(self) -> Power | None:
        """Its power state now; None once it no longer exists."""
        ...


OccupyDisplay = Callable[[Endpoint], AbstractContextManager[None]]
BaseInUse = Callable[[], AbstractContextManager[None]]

# every call of the port that names one clone, with the arguments the suite uses
NAMED_OPERATIONS = ["start", "stop", "reset", "suspend", "resume", "delete", "display", "sessions"]


def call(hv: Hypervisor, operation: str, name: str) -> object:
    """Run one named operation of the port on `name`."""
    calls: dict[str, Callable[[], object]] = {
        "start": lambda: hv.start(name),
        "stop": lambda: hv.stop(name, timeout=1.0),
        "reset": lambda: hv.reset(name),
        "suspend": lambda: hv.suspend(name),
        "resume": lambda: hv.resume(name),
        "delete": lambda: hv.delete(name),
        "display": lambda: hv.display(name),
        "sessions": lambda: hv.sessions(name),
    }
    return calls[operation]()


@contextlib.contextmanager
def listening(endpoint: Endpoint) -> Iterator[None]:
    """Another program listens on the endpoint while the block runs."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.bind((endpoint.host, endpoint.port))
        holder.listen(1)
        yield


class HypervisorContract:
    """Behaviour every adapter must show. Subclasses provide `hypervisor` and `base_image`."""

    start: StartMode = StartMode.RESTORE  # how make_spec's clones start

    @pytest.fixture
    def hypervisor(self) -> Hypervisor:
        raise NotImplementedError("a contract test class must provide the hypervisor fixture")

    @pytest.fixture
    def base_image(self) -> BaseImage:
        raise NotImplementedError("a contract test class must provide the base_image fixture")

    @pytest.fixture
    def foreign_vm(self, contract_pool: str) -> ForeignVM:
        raise NotImplementedError(
            "a contract test class must provide the foreign_vm fixture: a powered-off VM "
            f"named {contract_pool}-7 without imagepipe metadata"
        )

    @pytest.fixture
    def base_in_use(self) -> BaseInUse:
        raise NotImplementedError(
            "a contract test class must provide the base_in_use fixture: a context manager "
            "inside which base_image is running (a VM holds its disk for writing)"
        )

    @pytest.fixture
    def contract_pool(self) -> str:
        return "ct" + secrets.token_hex(3)

    @pytest.fixture
    def occupy_display(self) -> OccupyDisplay:
        return listening

    @pytest.fixture
    def missing_base(self, base_image: BaseImage, tmp_path: Path) -> BaseImage:
        return replace(
            base_image,
            version=base_image.version + 1000,
            directory=tmp_path / "gone",
            vm=None if base_image.vm is None else f"{base_image.vm}-gone",
        )

    @pytest.fixture
    def make_spec(self, base_image: BaseImage, contract_pool: str) -> Callable[..., CloneSpec]:
        def make(
            slot: int = 1,
            mode: CloneMode = CloneMode.LINKED,
            *,
            pool: str = contract_pool,
            base: BaseImage = base_image,
            display: Endpoint | None = None,
        ) -> CloneSpec:
            return CloneSpec(
                name=f"{contract_pool}-{slot}",
                pool=pool,
                slot=slot,
                base=base,
                mode=mode,
                cpus=1,
                memory=128 * MiB,
                display=display or Endpoint("127.0.0.1", free_port()),
                start=self.start,
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

    def test_resuming_a_powered_off_clone_is_refused_as_invalid_state(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        with pytest.raises(InvalidStateError, match=spec.name):
            hypervisor.resume(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF

    def test_starting_a_suspended_clone_is_refused_and_leaves_it_suspended(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.suspend(spec.name)
        with pytest.raises(InvalidStateError, match="resume"):
            hypervisor.start(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SUSPENDED

    def test_stop_powers_a_suspended_clone_off(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.suspend(spec.name)
        hypervisor.stop(spec.name, timeout=1.0)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF

    @pytest.mark.parametrize("before", [Power.SHUTOFF, Power.SUSPENDED])
    def test_reset_from_any_power_state_leaves_the_clone_running(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec], before: Power
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        if before is Power.SUSPENDED:
            hypervisor.start(spec.name)
            hypervisor.suspend(spec.name)
        hypervisor.reset(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.RUNNING

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

    def test_delete_removes_a_suspended_clone(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.suspend(spec.name)
        hypervisor.delete(spec.name)
        assert self._listed(hypervisor, spec.name) is None

    def test_a_clone_deleted_and_created_again_is_fresh_and_powered_off(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
        hypervisor.delete(spec.name)
        hypervisor.create_clone(spec)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF

    def test_deleting_a_clone_that_never_existed_succeeds(
        self, hypervisor: Hypervisor, contract_pool: str
    ) -> None:
        hypervisor.delete(f"{contract_pool}-99")

    @pytest.mark.parametrize("operation", [op for op in NAMED_OPERATIONS if op != "delete"])
    def test_operations_on_a_missing_clone_raise_clone_not_found(
        self, hypervisor: Hypervisor, contract_pool: str, operation: str
    ) -> None:
        with pytest.raises(CloneNotFoundError):
            call(hypervisor, operation, f"{contract_pool}-98")

    def test_a_deleted_clone_is_missing_for_every_other_operation(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        hypervisor.delete(spec.name)
        for operation in NAMED_OPERATIONS:
            if operation == "delete":
                continue
            with pytest.raises(CloneNotFoundError):
                call(hypervisor, operation, spec.name)

    # -- messages to the user (optional port: Notifier) -----------------------------------

    @staticmethod
    def _notifier(hv: Hypervisor) -> Notifier:
        if not isinstance(hv, Notifier):
            pytest.skip("this adapter cannot show a message inside a desktop (Notifier)")
        return hv

    def test_a_message_to_a_missing_clone_raises_clone_not_found(
        self, hypervisor: Hypervisor, contract_pool: str
    ) -> None:
        with pytest.raises(CloneNotFoundError):
            self._notifier(hypervisor).notify_users(f"{contract_pool}-98", "hello")

    def test_a_message_to_a_powered_off_clone_is_refused_as_invalid_state(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        notifier = self._notifier(hypervisor)
        spec = make_spec()
        hypervisor.create_clone(spec)
        with pytest.raises(InvalidStateError):
            notifier.notify_users(spec.name, "hello")

    def test_a_message_to_a_vm_imagepipe_did_not_make_is_refused(
        self, hypervisor: Hypervisor, foreign_vm: ForeignVM
    ) -> None:
        with pytest.raises(NotOurCloneError, match=foreign_vm.name):
            self._notifier(hypervisor).notify_users(foreign_vm.name, "hello")

    # -- names imagepipe does not own --------------------------------------------------------

    @pytest.mark.parametrize("operation", NAMED_OPERATIONS)
    def test_a_vm_imagepipe_did_not_make_is_refused_and_left_alone(
        self, hypervisor: Hypervisor, foreign_vm: ForeignVM, operation: str
    ) -> None:
        with pytest.raises(NotOurCloneError, match=foreign_vm.name):
            call(hypervisor, operation, foreign_vm.name)
        assert foreign_vm.power() is Power.SHUTOFF
        assert self._listed(hypervisor, foreign_vm.name) is None

    def test_creating_over_a_vm_imagepipe_did_not_make_is_refused(
        self, hypervisor: Hypervisor, foreign_vm: ForeignVM, make_spec: Callable[..., CloneSpec]
    ) -> None:
        spec = make_spec(slot=7)
        assert spec.name == foreign_vm.name
        with pytest.raises(NotOurCloneError, match=foreign_vm.name):
            hypervisor.create_clone(spec)
        assert foreign_vm.power() is Power.SHUTOFF
        assert self._listed(hypervisor, spec.name) is None

    def test_creating_over_another_pools_clone_is_refused_and_keeps_it(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec], contract_pool: str
    ) -> None:
        theirs = make_spec(pool=f"{contract_pool}x")
        hypervisor.create_clone(theirs)
        try:
            with pytest.raises(NotOurCloneError, match=theirs.name):
                hypervisor.create_clone(make_spec())
            listed = self._listed(hypervisor, theirs.name)
            assert listed is not None and listed.pool == theirs.pool
        finally:
            hypervisor.delete(theirs.name)

    def test_creating_over_this_pools_clone_of_another_version_is_refused(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec], base_image: BaseImage
    ) -> None:
        old = make_spec()
        hypervisor.create_clone(old)
        newer = make_spec(base=replace(base_image, version=base_image.version + 1))
        with pytest.raises(InvalidStateError, match=old.name):
            hypervisor.create_clone(newer)
        listed = self._listed(hypervisor, old.name)
        assert listed is not None and listed.version == base_image.version

    # -- bases ------------------------------------------------------------------------------

    def test_a_base_that_is_gone_is_not_ready_and_no_clone_is_made_from_it(
        self,
        hypervisor: Hypervisor,
        make_spec: Callable[..., CloneSpec],
        missing_base: BaseImage,
    ) -> None:
        spec = make_spec(base=missing_base)
        assert hypervisor.base_ready(missing_base) is False
        with pytest.raises(BaseMissingError, match=f"v{missing_base.version}"):
            hypervisor.create_clone(spec)
        assert self._listed(hypervisor, spec.name) is None

    def test_a_clone_is_made_while_another_clone_of_the_same_base_runs(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec], base_image: BaseImage
    ) -> None:
        first, second = make_spec(slot=1), make_spec(slot=2)
        hypervisor.create_clone(first)
        hypervisor.start(first.name)
        assert hypervisor.base_ready(base_image) is True
        hypervisor.create_clone(second)
        hypervisor.start(second.name)
        assert {c.name: c.power for c in hypervisor.list_clones() if c.pool == first.pool} == {
            first.name: Power.RUNNING,
            second.name: Power.RUNNING,
        }

    def test_a_running_base_is_not_ready_and_no_clone_is_made_from_it(
        self,
        hypervisor: Hypervisor,
        make_spec: Callable[..., CloneSpec],
        base_image: BaseImage,
        base_in_use: BaseInUse,
    ) -> None:
        spec = make_spec()
        with base_in_use():
            assert hypervisor.base_ready(base_image) is False
            with pytest.raises(
                InvalidStateError, match=f"{base_image.image} v{base_image.version}"
            ):
                hypervisor.create_clone(spec)
        assert self._listed(hypervisor, spec.name) is None
        assert hypervisor.base_ready(base_image) is True

    # -- display ports ------------------------------------------------------------------------

    def test_a_clone_is_not_made_on_a_display_port_another_program_holds(
        self,
        hypervisor: Hypervisor,
        make_spec: Callable[..., CloneSpec],
        occupy_display: OccupyDisplay,
    ) -> None:
        spec = make_spec()
        with (
            occupy_display(spec.display),
            pytest.raises(DisplayInUseError, match=str(spec.display.port)),
        ):
            hypervisor.create_clone(spec)
        assert self._listed(hypervisor, spec.name) is None

    def test_a_clone_does_not_start_while_another_program_holds_its_display_port(
        self,
        hypervisor: Hypervisor,
        make_spec: Callable[..., CloneSpec],
        occupy_display: OccupyDisplay,
    ) -> None:
        spec = make_spec()
        hypervisor.create_clone(spec)
        with occupy_display(spec.display), pytest.raises(DisplayInUseError, match=spec.name):
            hypervisor.start(spec.name)
        listed = self._listed(hypervisor, spec.name)
        assert listed is not None and listed.power is Power.SHUTOFF

    def test_a_clone_does_not_start_on_the_display_port_of_a_running_clone(
        self, hypervisor: Hypervisor, make_spec: Callable[..., CloneSpec]
    ) -> None:
        first = make_spec(slot=1)
        second = make_spec(slot=2, display=first.display)
        hypervisor.create_clone(first)
        hypervisor.create_clone(second)
        hypervisor.start(first.name)
        with pytest.raises(DisplayInUseError, match=second.name):
            hypervisor.start(second.name)
        listed = self._listed(hypervisor, second.name)
        assert listed is not None and listed.power is Power.SHUTOFF

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
