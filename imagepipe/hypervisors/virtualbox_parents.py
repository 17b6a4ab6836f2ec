"""Warm parents of the VirtualBox adapter (instant desktops), the VirtualBox way.

    parents = WarmParents(adapter)
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
RETRY_AFTER seconds; meanwhile desktops are cloned from the version's snapshot and boot.
A parent pins its version's snapshot (VirtualBox keeps a disk that has children): once a newer
version of its image has a parent and no clone links to the older one any more, the older
parent is removed (looked at most once a minute).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagepipe.errors import FatalHypervisorError, HypervisorError
from imagepipe.hypervisors.virtualbox_facts import (
    PARENT_GROUP,
    PARENT_IMAGE,
    PARENT_KEY,
    PARENT_SNAPSHOT,
    PARENT_VERSION,
    PROP_NO_USERS,
    RUNNING_STATES,
    WarmKey,
)
from imagepipe.log import fields

if TYPE_CHECKING:
    from imagepipe.hypervisors.virtualbox import VirtualBoxHypervisor

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # seconds a parent may take until its Guest Additions report
RETRY_AFTER = 600.0  # seconds before a parent that failed is tried again
POLL = 0.1  # seconds between looks at a booting parent
RETIRE_EVERY = 60.0  # seconds between looks for parents of older versions to remove
CLONE_MODE_MACHINE_STATE = 1
CLONE_OPTION_LINK = 1
CLEANUP_DETACH_HARD_DISKS = 3
LOCK_SHARED = 1


class WarmParents:
    """Makes and finds warm parents on one VirtualBox host; one build per key at a time."""

    def __init__(self, hv: VirtualBoxHypervisor, *, boot_timeout: float = BOOT_TIMEOUT) -> None:
        self._hv = hv
        self._boot_timeout = boot_timeout
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._failed: dict[str, float] = {}  # key name -> monotonic time of the failure
        self._said: set[str] = set()
        self._retired_at = -RETIRE_EVERY

    def ensure(self, key: WarmKey, source: Any) -> Any | None:
        """The parent's online snapshot (an ISnapshot) for `key`, made now from `source` (the
        version's snapshot machine) when there is none. None when it cannot be made: said
        once in the log; the caller clones the version's snapshot and the desktop boots."""
        with self._lock_for(key.name):
            try:
                found = self._complete(key)
            except HypervisorError as exc:
                self.say_once(f"make:{key.name}", f"no warm parent for {key}: {exc}")
                return None
            if found is not None:
                self._retire_older(key)
                return found
            failed = self._failed.get(key.name)
            if failed is not None and time.monotonic() - failed < RETRY_AFTER:
                return None
            started = time.monotonic()
            try:
                snapshot = self._make(key, source)
            except HypervisorError as exc:
                self._failed[key.name] = time.monotonic()
                with contextlib.suppress(HypervisorError):
                    self._remove(key.name)
                self.say_once(
                    f"make:{key.name}", f"no warm parent for {key}; desktops boot instead: {exc}"
                )
                return None
            self._failed.pop(key.name, None)
            self._retired_at = -RETIRE_EVERY  # a new parent: look at the older ones now
            self._retire_older(key)
            log.info(
                "warm parent made",
                extra=fields(
                    image=key.image,
                    version=key.version,
                    parent=key.name,
                    seconds=round(time.monotonic() - started, 2),
                ),
            )
            return snapshot

    def say_once(self, what: str, message: str) -> None:
        """Log a fallback to boot once per reason, not once per desktop."""
        with self._guard:
            if what in self._said:
                return
            self._said.add(what)
        log.warning(message, extra=fields(action="fallback"))

    # -- finding, making, removing -----------------------------------------------------------

    def _parent(self, key: WarmKey) -> Any | None:
        """The machine named after the key, or None; refused when imagepipe did not make it."""
        hv = self._hv
        machine = hv._find(key.name)
        if machine is None:
            return None
        with hv._translate(f"warm parent {key.name}"):
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
        hv = self._hv
        if hv._state(machine, key.name) != "PoweredOff":
            return None
        try:
            with hv._translate(f"warm parent {key.name}"):
                snapshot = machine.find_snapshot(PARENT_SNAPSHOT)
                online = bool(snapshot.online)
        except HypervisorError:
            return None
        return snapshot if online else None

    def _make(self, key: WarmKey, source: Any) -> Any:
        hv = self._hv
        lib, vbox, name = hv._lib, hv._vbox, key.name
        subject = f"warm parent {name}"
        if self._parent(key) is not None:  # left incomplete (a crash while it was made)
            self._remove(name)
        with hv._translate(subject):
            settings = Path(str(vbox.compose_machine_filename(name, PARENT_GROUP, "", "")))
        hv._remove_leftovers(settings.parent, name)
        with hv._translate(subject):
            args = hv.api.create_machine_args(str(settings), name, PARENT_GROUP)
            target = lib.IMachine(vbox._call("createMachine", in_p=args))
            progress = source.clone_to(
                target,
                lib.CloneMode(CLONE_MODE_MACHINE_STATE),
                [lib.CloneOptions(CLONE_OPTION_LINK)],
            )
        hv._wait(progress, subject)
        with hv._translate(subject):
            target.memory_size = key.memory_mb
            target.cpu_count = key.cpus
            target.vrde_server.enabled = False  # nobody connects to a parent
            target.set_extra_data(PARENT_KEY, key.fingerprint)
            target.set_extra_data(PARENT_IMAGE, key.image)
            target.set_extra_data(PARENT_VERSION, str(key.version))
            for dmi, value in hv._parent_dmi(target, name, key.image, key.version).items():
                target.set_extra_data(dmi, value)
            target.save_settings()
            vbox.register_machine(target)
            machine = vbox.find_machine(name)
        session = hv._vb.Session()
        with hv._translate(subject):
            progress = machine.launch_vm_process(session, "headless", [])
        try:
            hv._wait(progress, subject)
        finally:
            with contextlib.suppress(lib.VBoxError):
                session.unlock_machine()
        self._wait_ready(machine, key)
        with hv._session(machine, name, LOCK_SHARED) as control, hv._translate(subject):
            # online: the guest pauses, its memory goes to the snapshot's state file
            progress, _ = control.machine.take_snapshot(PARENT_SNAPSHOT, str(key), True)
            hv._wait(progress, subject)
        hv._power_down(machine, name)
        if not hv._wait_off(machine, name, 60.0):
            raise FatalHypervisorError(f"{subject} did not power off after its snapshot")
        snapshot = self._complete(key)
        if snapshot is None:
            raise FatalHypervisorError(f"{subject} has no online snapshot after taking it")
        return snapshot

    def _wait_ready(self, machine: Any, key: WarmKey) -> None:
        """Until the Guest Additions report (the same readiness as a desktop's)."""
        hv = self._hv
        deadline = time.monotonic() + self._boot_timeout
        while True:
            with hv._translate(f"warm parent {key.name}"):
                reported = bool(str(machine.get_guest_property_value(PROP_NO_USERS)))
            if reported:
                return
            if hv._state(machine, key.name) not in RUNNING_STATES:
                raise FatalHypervisorError(
                    f"the guest of {key} stopped before its Guest Additions reported"
                )
            if time.monotonic() > deadline:
                raise FatalHypervisorError(
                    f"the guest of {key} did not report through its Guest Additions within "
                    f"{self._boot_timeout:.0f} s"
                )
            hv._hub.wait_for_change(POLL)

    def _retire_older(self, key: WarmKey) -> None:
        """Remove the parents of older versions of the key's image that no clone links to
        (best effort: one that cannot be removed now is looked at again later)."""
        now = time.monotonic()
        with self._guard:
            if now - self._retired_at < RETIRE_EVERY:
                return
            self._retired_at = now
        hv = self._hv
        try:
            with hv._translate("warm parents"):
                machines = list(hv._vbox.get_machines_by_groups([PARENT_GROUP]))
        except HypervisorError:
            return
        for machine in machines:
            try:
                with hv._translate("warm parent"):
                    name = str(machine.name)
                    image = str(machine.get_extra_data(PARENT_IMAGE))
                    version = str(machine.get_extra_data(PARENT_VERSION))
                    if image != key.image or not version.isdigit():
                        continue
                    if int(version) >= key.version:
                        continue
                with self._lock_for(name):
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
        hv = self._hv
        with hv._translate("warm parent"):
            try:
                snapshot = machine.find_snapshot(PARENT_SNAPSHOT)
            except hv._lib.VBoxError:
                return False  # never completed: nothing can link to it
            own = {str(a.medium.id_p) for a in _disks(machine.medium_attachments)}
            return any(
                str(child.id_p) not in own
                for a in _disks(snapshot.machine.medium_attachments)
                for child in a.medium.children
            )

    def _remove(self, name: str) -> None:
        hv = self._hv
        machine = hv._find(name)
        if machine is None:
            return
        hv._power_down(machine, name)
        hv._wait_off(machine, name, 30.0)
        with hv._translate(f"warm parent {name}"):
            media = machine.unregister(hv._lib.CleanupMode(CLEANUP_DETACH_HARD_DISKS))
            progress = machine.delete_config(media)
        hv._wait(progress, f"warm parent {name}")

    @contextlib.contextmanager
    def _lock_for(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield


def _disks(attachments: Any) -> list[Any]:
    """The attachments that hold a medium."""
    return [a for a in attachments if getattr(a.medium, "_i", None) is not None]
