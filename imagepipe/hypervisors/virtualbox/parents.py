"""Warm parents of the VirtualBox adapter (instant desktops), the VirtualBox way.

    parents = WarmParents(driver)                             # the host's VirtualBoxDriver
    snapshot = parents.ensure(key, base_snapshot_machine)   # made once; None: desktops boot

A parent is a machine `imagepipe-warm-<key>` in group /imagepipe-warm: a linked clone of the
version's snapshot with the pool's shape, booted headless until its Guest Additions report
(the `ready` of a desktop), then given an online snapshot `imagepipe-warm`
(IMachine.takeSnapshot on the running machine, pause=true: the memory is saved in the
snapshot's state file and the snapshot's disk is frozen), then powered off. A clone is a
linked clone of that snapshot (cloneTo, CloneMode.MachineState): VirtualBox copies the
snapshot's state file into the clone, which is Saved; launching it resumes the parent's
running guest.

A parent that cannot be made is said once in the log per key and tried again after
RETRY_AFTER seconds (hypervisors/common.py's WarmBook, the same as libvirt's); meanwhile
desktops are cloned from the version's snapshot and boot.
A parent pins its version's snapshot (VirtualBox keeps a disk that has children): once a newer
version of its image has a parent and no clone links to the older one any more, the older
parent is removed (looked at most once a minute).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from imagepipe.errors import FatalHypervisorError, HypervisorError
from imagepipe.hypervisors.common import WarmBook, WarmKey
from imagepipe.hypervisors.virtualbox.driver import LOCK_SHARED, VirtualBoxDriver
from imagepipe.hypervisors.virtualbox.facts import (
    PARENT_GROUP,
    PARENT_IMAGE,
    PARENT_KEY,
    PARENT_SNAPSHOT,
    PARENT_VERSION,
    PROP_NO_USERS,
    RUNNING_STATES,
    dmi_extra_data,
)
from imagepipe.log import fields

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # seconds a parent may take until its Guest Additions report
POLL = 0.1  # seconds between looks at a booting parent


class WarmParents:
    """Makes and finds warm parents on one VirtualBox host; one build per key at a time."""

    def __init__(
        self,
        vm: VirtualBoxDriver,
        *,
        boot_timeout: float = BOOT_TIMEOUT,
        book: WarmBook | None = None,
    ) -> None:
        self._vm = vm
        self._boot_timeout = boot_timeout
        self._book = book or WarmBook()

    def ensure(self, key: WarmKey, source: Any) -> Any | None:
        """The parent's online snapshot (an ISnapshot) for `key`, made now from `source` (the
        version's snapshot machine) when there is none. None when it cannot be made: said
        once in the log; the caller clones the version's snapshot and the desktop boots."""
        with self._book.lock(key.name):
            try:
                found = self._complete(key)
            except HypervisorError as exc:
                self.say_once(f"make:{key.name}", f"no warm parent for {key}: {exc}")
                return None
            if found is not None:
                self._retire_older(key)
                return found
            if self._book.waiting(key.name):
                return None
            started = self._book.now()
            try:
                snapshot = self._make(key, source)
            except HypervisorError as exc:
                self._book.failed(key.name)
                with contextlib.suppress(HypervisorError):
                    self._remove(key.name)
                self.say_once(
                    f"make:{key.name}", f"no warm parent for {key}; desktops boot instead: {exc}"
                )
                return None
            self._book.made(key, started)
            self._book.tidy_soon()  # a new parent: look at the older ones now
            self._retire_older(key)
            return snapshot

    def say_once(self, what: str, message: str) -> None:
        """Log a fallback to boot once per reason, not once per desktop."""
        self._book.say_once(what, message)

    # -- finding, making, removing -----------------------------------------------------------

    def _parent(self, key: WarmKey) -> Any | None:
        """The machine named after the key, or None; refused when imagepipe did not make it."""
        vm = self._vm
        machine = vm.find(key.name)
        if machine is None:
            return None
        with vm.translate(f"warm parent {key.name}"):
            mark = str(machine.get_extra_data(PARENT_KEY))
        if mark != key.fingerprint:
            raise FatalHypervisorError(
                f"a VirtualBox machine named {key.name} exists and is not the warm parent "
                f"imagepipe made for {key}; remove or rename it"
            )
        return machine

    def _complete(self, key: WarmKey) -> Any | None:
        """The parent's online snapshot when the parent is complete (powered off, snapshot
        with a saved state), else None."""
        machine = self._parent(key)
        if machine is None:
            return None
        vm = self._vm
        if vm.state(machine, key.name) != "PoweredOff":
            return None
        try:
            with vm.translate(f"warm parent {key.name}"):
                snapshot = machine.find_snapshot(PARENT_SNAPSHOT)
                online = bool(snapshot.online)
        except HypervisorError:
            return None
        return snapshot if online else None

    def _make(self, key: WarmKey, source: Any) -> Any:
        vm, name = self._vm, key.name
        subject = f"warm parent {name}"
        if self._parent(key) is not None:  # left incomplete (a crash while it was made)
            self._remove(name)
        target = vm.clone(source, name, PARENT_GROUP, linked=True, subject=subject)
        with vm.translate(subject):
            target.memory_size = key.memory_mib
            target.cpu_count = key.cpus
            target.vrde_server.enabled = False  # nobody connects to a parent
            target.set_extra_data(PARENT_KEY, key.fingerprint)
            target.set_extra_data(PARENT_IMAGE, key.image)
            target.set_extra_data(PARENT_VERSION, str(key.version))
            # its restored clones' screens show the image and version from it (their name
            # comes from ClonePrep)
            dmi = dmi_extra_data(name, key.image, key.version, efi=vm.boots_efi(target))
            for item, value in dmi.items():
                target.set_extra_data(item, value)
        machine = vm.register(target, name, subject)
        vm.launch(machine, subject)
        self._wait_ready(machine, key)
        with vm.locked(machine, name, LOCK_SHARED) as control, vm.translate(subject):
            # online: the guest pauses, its memory goes to the snapshot's state file
            progress, _ = control.machine.take_snapshot(PARENT_SNAPSHOT, str(key), True)
            vm.wait(progress, subject)
        vm.power_down(machine, name)
        if not vm.wait_off(machine, name, 60.0):
            raise FatalHypervisorError(f"{subject} did not power off after its snapshot")
        snapshot = self._complete(key)
        if snapshot is None:
            raise FatalHypervisorError(f"{subject} has no online snapshot after taking it")
        return snapshot

    def _wait_ready(self, machine: Any, key: WarmKey) -> None:
        """Until the Guest Additions report (the same readiness as a desktop's)."""
        vm = self._vm
        deadline = time.monotonic() + self._boot_timeout
        while True:
            with vm.translate(f"warm parent {key.name}"):
                reported = bool(str(machine.get_guest_property_value(PROP_NO_USERS)))
            if reported:
                return
            if vm.state(machine, key.name) not in RUNNING_STATES:
                raise FatalHypervisorError(
                    f"the guest of {key} stopped before its Guest Additions reported"
                )
            if time.monotonic() > deadline:
                raise FatalHypervisorError(
                    f"the guest of {key} did not report through its Guest Additions within "
                    f"{self._boot_timeout:.0f} s"
                )
            vm.wait_for_change(POLL)

    def _retire_older(self, key: WarmKey) -> None:
        """Remove the parents of older versions of the key's image that no clone links to
        (best effort: one that cannot be removed now is looked at again later)."""
        if not self._book.tidy_due():
            return
        vm = self._vm
        try:
            with vm.translate("warm parents"):
                machines = list(vm.vbox.get_machines_by_groups([PARENT_GROUP]))
        except HypervisorError:
            return
        for machine in machines:
            try:
                with vm.translate("warm parent"):
                    name = str(machine.name)
                    image = str(machine.get_extra_data(PARENT_IMAGE))
                    version = str(machine.get_extra_data(PARENT_VERSION))
                    if image != key.image or not version.isdigit():
                        continue
                    if int(version) >= key.version:
                        continue
                with self._book.lock(name):
                    if self._linked(machine):
                        continue
                    self._remove(name)
                log.info(
                    "warm parent removed",
                    extra=fields(image=image, version=int(version), parent=name),
                )
            except HypervisorError as exc:
                log.info("warm parent kept", extra=fields(error=str(exc)))

    def _linked(self, machine: Any) -> bool:
        """A clone links to the parent's snapshot: its disk has a differencing child other
        than the parent's own current disk."""
        vm = self._vm
        with vm.translate("warm parent"):
            try:
                snapshot = machine.find_snapshot(PARENT_SNAPSHOT)
            except vm.lib.VBoxError:
                return False  # never completed: nothing can link to it
            own = {str(a.medium.id_p) for a in _disks(machine.medium_attachments)}
            return any(
                str(child.id_p) not in own
                for a in _disks(snapshot.machine.medium_attachments)
                for child in a.medium.children
            )

    def _remove(self, name: str) -> None:
        vm = self._vm
        machine = vm.find(name)
        if machine is None:
            return
        vm.power_down(machine, name)
        vm.wait_off(machine, name, 30.0)
        vm.delete(machine, f"warm parent {name}")


def _disks(attachments: Any) -> list[Any]:
    """The attachments that hold a medium."""
    return [a for a in attachments if getattr(a.medium, "_i", None) is not None]
