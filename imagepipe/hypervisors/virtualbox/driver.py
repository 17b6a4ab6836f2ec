"""One VirtualBox host through pyvbox: the machine operations the hypervisor adapter and its
warm parents both make, each turning VirtualBox's errors into imagepipe's.

    vb, vbox, api = connect()
    vm = VirtualBoxDriver(vb, vbox, api, wait_for_change=hub.wait_for_change)
    with vm.translate("clone lab-0"): ...            # VBoxError -> imagepipe's error
    machine = vm.find("lab-0")                         # None when there is none
    target = vm.clone(source, "lab-0", "/imagepipe/lab", linked=True)
    with vm.launched(machine, "clone lab-0") as session: ...

As Vagrant's `driver/base.rb`: one place decides success (an IProgress's result code, a
VBoxError's code through facts.error_for); the adapter above it knows pools, clones and
parents, this module only machines.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imagepipe.errors import (
    CloneNotFoundError,
    EnvironmentMissingError,
    HypervisorError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import check_name
from imagepipe.hypervisors.virtualbox.facts import (
    OFF_STATES,
    SAVED_STATES,
    VersionApi,
    error_for,
    version_api,
)
from imagepipe.log import fields

log = logging.getLogger(__name__)

LOCK_SHARED, LOCK_WRITE = 1, 2
CLEANUP_DETACH_HARD_DISKS = 3
CLONE_MODE_MACHINE_STATE = 1
CLONE_OPTION_LINK = 1
FIRMWARE_BIOS = 1  # FirmwareType_BIOS; 2..5 are the EFI kinds


def import_pyvbox() -> Any:
    """The `virtualbox` package, or EnvironmentMissingError saying how to get it."""
    try:
        virtualbox = importlib.import_module("virtualbox")
        # pyvbox finds VirtualBox's own vboxapi (also outside this virtualenv) and yields it
        with virtualbox.import_vboxapi() as vboxapi:
            if not hasattr(vboxapi, "VirtualBoxManager"):
                raise ImportError(f"{vboxapi.__file__} has no VirtualBoxManager")
    except ImportError as exc:
        raise EnvironmentMissingError(
            f"VirtualBox's Python API is not usable ({exc}): pip install 'imagepipe[virtualbox]' "
            "and install VirtualBox 6.1 or 7.x with its SDK (vboxapi), or set "
            "hypervisor.driver: libvirt"
        ) from exc
    return virtualbox


@contextlib.contextmanager
def translated(lib: Any, subject: str) -> Iterator[None]:
    """A VBoxError raised inside becomes imagepipe's error for its result code."""
    try:
        yield
    except HypervisorError:
        raise
    except lib.VBoxError as exc:
        raise error_for(int(exc.value), str(exc.msg), subject) from exc


def connect() -> tuple[Any, Any, VersionApi]:
    """(pyvbox, IVirtualBox, the API pieces of its version), or EnvironmentMissingError
    saying what is missing."""
    vb = import_pyvbox()
    lib = vb.library
    vb.library_ext.IVirtualBox.assert_version = False
    try:
        with translated(lib, "VirtualBox"):
            vbox = vb.VirtualBox()
    except HypervisorError:
        raise
    except Exception as exc:  # vboxapi's own (XPCOM/COM) error: VBoxSVC did not answer
        raise EnvironmentMissingError(
            f"VirtualBox does not answer ({exc}): install VirtualBox and run imagepipe as "
            "the user owning the VMs (VBoxSVC runs per user), or set hypervisor.driver: "
            "libvirt"
        ) from exc
    with translated(lib, "VirtualBox"):
        api = version_api(str(vbox.version))
    return vb, vbox, api


class VirtualBoxDriver:
    """Machine operations on one VirtualBox host. `wait_for_change(seconds)` returns early
    when an event came (the adapter's event hub), so waits for a state do not spin."""

    def __init__(
        self,
        vb: Any,
        vbox: Any,
        api: VersionApi,
        *,
        wait_for_change: Callable[[float], None],
        stop_poll: float = 0.2,
    ) -> None:
        self.vb = vb
        self.lib = vb.library
        self.vbox = vbox
        self.api = api
        self.wait_for_change = wait_for_change
        self._stop_poll = stop_poll

    def translate(self, subject: str) -> contextlib.AbstractContextManager[None]:
        return translated(self.lib, subject)

    def wait(self, progress: Any, subject: str) -> None:
        """Wait for an IProgress; its failure is in resultCode, never raised by the wait."""
        with self.translate(subject):
            progress.wait_for_completion(-1)
            code = int(progress.result_code)
            if code != 0:
                info = progress.error_info
                raise error_for(code, str(info.text) if info else "failed", subject)

    def find(self, name: str) -> Any | None:
        """The machine of that name (checked against the clone name rule), or None."""
        try:
            with self.translate(f"clone {name}"):
                return self.vbox.find_machine(check_name(name))
        except CloneNotFoundError:
            return None

    def state(self, machine: Any, name: str) -> str:
        with self.translate(f"clone {name}"):
            # the raw value, compared through the host's table: pyvbox's MachineState is
            # 6.1's (names print aliases, 7.x values are shifted, and 7.x's Snapshotting,
            # 23, makes its `state` property raise ValueError)
            return self.api.state_name(int(machine._get_attr("state")))

    @contextlib.contextmanager
    def locked(self, machine: Any, name: str, lock: int) -> Iterator[Any]:
        """A session holding the machine's lock (LOCK_SHARED or LOCK_WRITE)."""
        session = self.vb.Session()
        with self.translate(f"clone {name}"):
            machine.lock_machine(session, self.lib.LockType(lock))
        try:
            yield session
        finally:
            with contextlib.suppress(self.lib.VBoxError):
                session.unlock_machine()

    @contextlib.contextmanager
    def launched(self, machine: Any, subject: str) -> Iterator[Any]:
        """Launch headless and wait until it runs; the launching session, unlocked after."""
        session = self.vb.Session()
        with self.translate(subject):
            # pass a list: pyvbox's default environment="" is refused with a TypeError
            progress = machine.launch_vm_process(session, "headless", [])
        try:
            self.wait(progress, subject)
            yield session
        finally:
            with contextlib.suppress(self.lib.VBoxError):
                session.unlock_machine()

    def launch(self, machine: Any, subject: str) -> None:
        """Launch headless and wait until it runs."""
        with self.launched(machine, subject):
            pass

    def wait_off(self, machine: Any, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state(machine, name) not in OFF_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_for_change(min(left, self._stop_poll))
        return True

    def power_down(self, machine: Any, name: str) -> None:
        """Off now: a saved state is discarded, a running machine powered down."""
        state = self.state(machine, name)
        if state in OFF_STATES:
            return
        if state in SAVED_STATES:
            with (
                self.locked(machine, name, LOCK_WRITE) as session,
                self.translate(f"clone {name}"),
            ):
                session.machine.discard_saved_state(True)
            return
        try:
            with (
                self.locked(machine, name, LOCK_SHARED) as session,
                self.translate(f"clone {name}"),
            ):
                progress = session.console.power_down()
                self.wait(progress, f"clone {name}")
        except InvalidStateError:
            if self.state(machine, name) not in OFF_STATES:
                raise

    def clone(
        self, source: Any, name: str, group: str, *, linked: bool, subject: str | None = None
    ) -> Any:
        """A new machine `name` in `group` cloned from `source` (a snapshot's machine, its
        state with it), not registered yet: the caller sets it up and registers it. Errors
        name `subject` (default: clone <name>)."""
        subject = subject or f"clone {name}"
        with self.translate(subject):
            settings = Path(str(self.vbox.compose_machine_filename(name, group, "", "")))
        self.remove_leftovers(settings.parent, name)
        with self.translate(subject):
            args = self.api.create_machine_args(str(settings), name, group)
            target = self.lib.IMachine(self.vbox._call("createMachine", in_p=args))
            options = [self.lib.CloneOptions(CLONE_OPTION_LINK)] if linked else []
            progress = source.clone_to(
                target, self.lib.CloneMode(CLONE_MODE_MACHINE_STATE), options
            )
        self.wait(progress, subject)
        return target

    def register(self, target: Any, name: str, subject: str | None = None) -> Any:
        """Save a new machine's settings and register it; the registered machine."""
        with self.translate(subject or f"clone {name}"):
            target.save_settings()
            self.vbox.register_machine(target)
            return self.vbox.find_machine(name)

    def delete(self, machine: Any, subject: str) -> None:
        """Unregister the (powered off) machine and delete its files and its own disks."""
        with self.translate(subject):
            media = machine.unregister(self.lib.CleanupMode(CLEANUP_DETACH_HARD_DISKS))
            progress = machine.delete_config(media)
        self.wait(progress, subject)

    def remove_leftovers(self, folder: Path, name: str) -> None:
        """A create cut short before registering leaves the clone's folder (settings, a
        differencing disk) unregistered: remove it, so no orphan disk stays behind."""
        if folder.is_dir() and folder.name == name and folder.parent.name:
            log.warning(
                "removing an unregistered clone's leftovers",
                extra=fields(clone=name, path=str(folder), action="create"),
            )
            shutil.rmtree(folder)

    def boots_efi(self, machine: Any) -> bool:
        """The machine's firmware is EFI (IMachine.firmwareType; from 7.1 on it lives in
        IMachine.firmwareSettings)."""
        holder = machine
        if (self.api.major, self.api.minor) >= (7, 1):
            holder = self.lib.Interface(machine._get_attr("firmwareSettings"))
        return int(holder._get_attr("firmwareType")) != FIRMWARE_BIOS
