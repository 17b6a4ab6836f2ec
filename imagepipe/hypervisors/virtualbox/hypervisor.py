"""The VirtualBox hypervisor adapter through pyvbox (PyPI `virtualbox`) and VirtualBox's
`vboxapi`: clones are machines `<pool>-<slot>` in group /imagepipe/<pool>.

    hv = VirtualBoxHypervisor()

A clone is a linked clone of its image version's snapshot on the base VM (CloneOptions.Link),
or a full clone for `clone: full`, with a snapshot `imagepipe-clean` taken right after cloning;
reset restores it. Pool, image, version, slot, mode and display live in the machine's extra
data (imagepipe/...), so list_clones() rebuilds everything from VirtualBox. VRDE listens on
the pool's port; sessions come from one passive event listener (events.py). No guest
password is used anywhere. Version differences (6.1 / 7.0 / 7.1) are in facts.py.

Instant desktops (CloneSpec.start = restore): the clone is a linked clone of its version's
warm parent's online snapshot (parents.py), so VirtualBox makes it Saved with a copy
of the parent's memory; its `imagepipe-clean` snapshot, taken while Saved, shares that state
file. `start` launches it, which resumes the parent's running guest; a reset restores the clean
snapshot (Saved again) and launches it. Then the guest is told its name (ClonePrep) through the
transient guest property /imagepipe/identity/hostname; its clock is set by the Guest
Additions' VBoxService, which does it after every restore. Whenever that cannot be done, the
clone boots, said once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagepipe.errors import (
    BaseMissingError,
    BusyError,
    CloneNotFoundError,
    DisplayInUseError,
    FatalHypervisorError,
    HypervisorError,
    InvalidStateError,
    NotOurCloneError,
)
from imagepipe.hypervisors.common import check_name, port_free, power_of
from imagepipe.hypervisors.virtualbox.driver import (
    LOCK_SHARED,
    LOCK_WRITE,
    VirtualBoxDriver,
    connect,
)
from imagepipe.hypervisors.virtualbox.events import CloneSessions, EventHub
from imagepipe.hypervisors.virtualbox.facts import (
    BASE_SNAPSHOT,
    CLEAN_SNAPSHOT,
    EXTRA_KEYS,
    GROUP_ROOT,
    OFF_STATES,
    POWER,
    PROP_IDENTITY,
    PROP_NO_USERS,
    PROP_STARTED_BY,
    PROP_USERS,
    PROP_USERS_LIST,
    SAVED_STATES,
    CloneMeta,
    base_vm_name,
    dmi_extra_data,
    memory_mb,
    parse_meta,
    parse_users,
    pool_group,
    started_by,
    warm_key,
)
from imagepipe.hypervisors.virtualbox.parents import WarmParents
from imagepipe.log import fields
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneMode,
    CloneSpec,
    Endpoint,
    GuestSession,
    Power,
    StartMode,
)
from imagepipe.pool.ports import HypervisorEvent, Subscription

log = logging.getLogger(__name__)
LIVE_STATES = frozenset({"Running", "Paused", "Starting", "Restoring", "Stuck", "Saving"})
NOTICE_PROPERTY = "/imagepipe/notice"  # notify_users: a rollout's deadline warning


class VirtualBoxHypervisor:
    """imagepipe.pool.ports.Hypervisor on VirtualBox 6.1 / 7.x through pyvbox."""

    def __init__(self, *, stop_poll: float = 0.2, parent_boot_timeout: float = 300.0) -> None:
        vb, vbox, self.api = connect()
        self._names: dict[str, str] = {}  # machine id -> clone name
        self._meta: dict[str, CloneMeta] = {}  # machine id -> metadata (never changes)
        self._lock = threading.Lock()
        self._import_lock = threading.Lock()
        self._hub = EventHub(self.api, self._name_of)
        self._vm = VirtualBoxDriver(
            vb, vbox, self.api, wait_for_change=self._hub.wait_for_change, stop_poll=stop_poll
        )
        self._parents = WarmParents(self._vm, boot_timeout=parent_boot_timeout)
        with self._vm.translate("VirtualBox events"):
            self._hub.start(self._vm.lib, vbox.event_source)
        log.info("VirtualBox connected", extra=fields(version=self.api.version))

    # -- plumbing ---------------------------------------------------------------------------

    def _our(self, name: str) -> tuple[Any, CloneMeta]:
        machine = self._vm.find(name)
        if machine is None:
            raise CloneNotFoundError(f"clone {name} does not exist in VirtualBox")
        meta = self._meta_of(machine)
        if meta is None:
            raise NotOurCloneError(
                f"VirtualBox machine {name} was not made by imagepipe (no imagepipe extra "
                "data); imagepipe leaves it alone: rename it or change the pool name"
            )
        return machine, meta

    def _meta_of(self, machine: Any) -> CloneMeta | None:
        with self._vm.translate("machine"):
            machine_id = str(machine.id_p)
            if machine_id in self._meta:
                return self._meta[machine_id]
            if not any(str(g).startswith(GROUP_ROOT + "/") for g in machine.groups):
                return None
            meta = parse_meta({k: str(machine.get_extra_data(k)) for k in EXTRA_KEYS})
            if meta is not None:
                with self._lock:
                    self._meta[machine_id] = meta
                    self._names[machine_id] = str(machine.name)
            return meta

    def _name_of(self, machine_id: str) -> str | None:
        with self._lock:
            if machine_id in self._names:
                return self._names[machine_id]
        try:
            with self._vm.translate("machine"):
                machine = self._vm.vbox.find_machine(machine_id)
        except HypervisorError:
            return None
        return str(machine.name) if self._meta_of(machine) is not None else None

    # -- the port ------------------------------------------------------------------------------

    def list_clones(self) -> list[CloneInfo]:
        clones: list[CloneInfo] = []
        with self._vm.translate("VirtualBox"):
            machines = self._vm.vbox.machines
        for machine in machines:
            try:
                with self._vm.translate("machine"):
                    if not bool(machine.accessible):  # settings file missing or unreadable
                        continue
                meta = self._meta_of(machine)
                if meta is None:
                    continue
                name = str(machine.name)
                clones.append(self._info(machine, name, meta))
            except CloneNotFoundError:
                continue  # unregistered between the two calls
        return sorted(clones, key=lambda c: (c.pool, c.slot))

    def _info(self, machine: Any, name: str, meta: CloneMeta) -> CloneInfo:
        state = self._vm.state(machine, name)
        power = power_of(state, POWER)
        if state in SAVED_STATES and self._pristine(machine, name):
            power = Power.SHUTOFF  # its parent's memory, never run: off, ready to start
        ready = power.value == "running" and self._facts(machine, name).agent
        how = None
        if power in (Power.RUNNING, Power.SUSPENDED):
            with self._vm.translate(f"clone {name}"):
                how = started_by(str(machine.get_guest_property_value(PROP_STARTED_BY)))
        return CloneInfo(
            name=name,
            pool=meta.pool,
            slot=meta.slot,
            image=meta.image,
            version=meta.version,
            power=power,
            display=meta.display,
            ready=ready,
            started_by=how,
        )

    def _facts(self, machine: Any, name: str) -> CloneSessions:
        """From the event cache; read once from the properties after a restart."""
        known = self._hub.known(name)
        if known is not None:
            return known
        with self._vm.translate(f"clone {name}"):
            users_list = str(machine.get_guest_property_value(PROP_USERS_LIST))
            count = str(machine.get_guest_property_value(PROP_USERS))
            agent = bool(str(machine.get_guest_property_value(PROP_NO_USERS)))
        client, since = self._vrde_client(machine, name)
        facts = CloneSessions(parse_users(users_list, count), agent, client, since)
        self._hub.seed(name, facts)
        return self._hub.known(name) or facts

    def _vrde_client(self, machine: Any, name: str) -> tuple[str | None, float | None]:
        """VRDEServerInfo of the running VM, through a shared session on it."""
        if self._vm.state(machine, name) not in ("Running", "Paused"):
            return None, None
        with (
            contextlib.suppress(BusyError, InvalidStateError),
            self._vm.locked(machine, name, LOCK_SHARED) as session,
        ):
            info = session.console.vrde_server_info
            if bool(info.active) and str(info.client_ip):
                return str(info.client_ip), int(info.begin_time) / 1000
        return None, None

    def base_ready(self, base: BaseImage) -> bool:
        """The base VM exists (imported from the version's OVF once if need be), is powered
        off, no session holds it, and the snapshot exists."""
        try:
            self._ready_base(base)
        except (BaseMissingError, InvalidStateError, BusyError, CloneNotFoundError):
            return False
        return True

    def _ready_base(self, base: BaseImage) -> tuple[Any, str, str]:
        """(machine, name, snapshot) of a base clones can be made from now, or why not:
        BaseMissingError (VM or snapshot gone), InvalidStateError (running or locked)."""
        label = f"image {base.image} v{base.version}"
        found = self._base(base)
        if found is None:
            raise BaseMissingError(
                f"{label}: its base VM {base.vm or '(none)'} is not in VirtualBox and "
                f"{base.directory} holds no OVF to import; rebuild it (imagepipe build "
                f"{base.image}) or register a VM (imagepipe images import {base.image} "
                "--from-vm VM)"
            )
        machine, vm, snapshot = found
        with self._vm.translate(f"base VM {vm}"):
            state = self._vm.state(machine, vm)
            locked = int(machine.session_state) != 1  # SessionState.Unlocked
        if state != "PoweredOff" or locked:
            raise InvalidStateError(
                f"{label}: base VM {vm} is {state}{' and locked by a session' if locked else ''}"
                "; clones are made only while it is powered off with no session"
            )
        try:
            with self._vm.translate(f"base VM {vm}"):
                machine.find_snapshot(snapshot)
        except CloneNotFoundError as exc:
            raise BaseMissingError(
                f"{label}: base VM {vm} has no snapshot {snapshot}; rebuild the version or "
                f"import the VM again (imagepipe images import {base.image} --from-vm {vm})"
            ) from exc
        return machine, vm, snapshot

    def _base(self, base: BaseImage) -> tuple[Any, str, str] | None:
        """(machine, name, snapshot) of a version's base VM: the VM the registry names, else
        imagepipe-<image>-v<N>, else that VM imported now from the version's OVF."""
        if base.vm is not None:
            machine = self._vm.find(base.vm)
            if machine is not None:
                return machine, base.vm, base.snapshot or ""
        name = base_vm_name(base.image, base.version)
        with self._import_lock:
            machine = self._vm.find(name)
            if machine is None:
                machine = self._import_ovf(base, name)
            if machine is None:
                return None
            return machine, name, BASE_SNAPSHOT

    def _import_ovf(self, base: BaseImage, name: str) -> Any | None:
        """Import the version's OVF (a virtualbox-iso build in the image store) as `name`
        with a snapshot clones link to. None when the version has no OVF."""
        ovfs = sorted(base.directory.glob("*.ovf")) if base.directory.is_dir() else []
        if not ovfs:
            return None
        subject = f"base VM {name} from {ovfs[0]}"
        with self._vm.translate(subject):
            appliance = self._vm.vbox.create_appliance()
            # pyvbox's read() waits without looking at the result: check it here
            progress = self._vm.lib.IProgress(appliance._call("read", in_p=[str(ovfs[0])]))
        self._vm.wait(progress, subject)
        with self._vm.translate(subject):
            appliance.interpret()
            (description,) = appliance.virtual_system_descriptions[:1]
            description.set_name(name)
            progress = appliance.import_machines([])
        self._vm.wait(progress, subject)
        with self._vm.translate(subject):
            machine = self._vm.vbox.find_machine(name)
        self._take_snapshot(machine, name, BASE_SNAPSHOT)
        log.info("base VM imported", extra=fields(image=base.image, vm=name, action="import"))
        return machine

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        name = check_name(spec.name)
        meta = CloneMeta(
            spec.pool, spec.base.image, spec.base.version, spec.slot, spec.mode, spec.display
        )
        existing = self._vm.find(name)
        if existing is not None:
            return self._existing_clone(existing, name, meta)
        base, base_name, snapshot_name = self._ready_base(spec.base)
        self._refuse_taken_port(name, spec.display, subject=f"port {spec.display.port}")
        with self._vm.translate(f"base VM {base_name}"):
            snapshot = base.find_snapshot(snapshot_name)
            source = snapshot.machine
        parent = self._warm_parent(spec, base, snapshot, source)
        if parent is not None:
            with self._vm.translate(f"clone {name}"):
                source = parent.machine  # Saved with the parent's memory once cloned
        linked = spec.mode is not CloneMode.FULL
        target = self._vm.clone(source, name, pool_group(spec.pool), linked=linked)
        with self._vm.translate(f"clone {name}"):
            if parent is None:  # a restored clone has its parent's shape (the key holds it)
                target.memory_size = memory_mb(spec.memory)
                target.cpu_count = spec.cpus
            vrde = target.vrde_server
            vrde.enabled = True
            vrde.set_vrde_property("TCP/Ports", str(spec.display.port))
            vrde.set_vrde_property("TCP/Address", spec.display.host)
            for key, value in meta.extra_data().items():
                target.set_extra_data(key, value)
            dmi = dmi_extra_data(
                name, spec.base.image, spec.base.version, efi=self._vm.boots_efi(target)
            )
            for key, value in dmi.items():
                target.set_extra_data(key, value)
        machine = self._vm.register(target, name)
        self._take_clean_snapshot(machine, name)
        log.info("clone created", extra=fields(pool=spec.pool, clone=name, action="create"))
        return self._info(machine, name, meta)

    # -- instant desktops --------------------------------------------------------------------

    def _warm_parent(self, spec: CloneSpec, base: Any, snapshot: Any, source: Any) -> Any | None:
        """The online snapshot of the version's warm parent for this shape (made now, once),
        or None: the pool boots its desktops, or no parent can be made (said once)."""
        if spec.start is not StartMode.RESTORE:
            return None
        with self._vm.translate(f"image {spec.base.image} v{spec.base.version}"):
            key = warm_key(
                image=spec.base.image,
                version=spec.base.version,
                cpus=spec.cpus,
                memory_mb=memory_mb(spec.memory),
                base_vm_id=str(base.id_p),
                base_snapshot_id=str(snapshot.id_p),
                virtualbox=self.api.version,
            )
        return self._parents.ensure(key, source)

    def _pristine(self, machine: Any, name: str) -> bool:
        """Saved on its clean snapshot's state file: the warm parent's memory, never run
        since it was cloned or reset (a suspended desktop's state is a file of its own)."""
        try:
            with self._vm.translate(f"clone {name}"):
                state = str(machine.state_file_path)
                if not state:
                    return False
                clean = machine.find_snapshot(CLEAN_SNAPSHOT)
                return str(clean.machine.state_file_path) == state
        except CloneNotFoundError:
            return False

    def _resume_clean(self, machine: Any, name: str, meta: CloneMeta) -> None:
        """Launch a pristine clone: VirtualBox resumes its parent's guest. When that fails,
        said once, its saved state is dropped and it boots."""
        started = time.monotonic()
        try:
            self._launch(machine, name, meta, StartMode.RESTORE)
        except (DisplayInUseError, BusyError, BaseMissingError):
            raise
        except HypervisorError as exc:
            self._parents.say_once(
                f"restore:{meta.image}:{meta.version}",
                f"resuming {name} from the warm parent of {meta.image} v{meta.version} "
                f"failed; its desktops boot instead: {exc}",
            )
            self._vm.power_down(machine, name)  # Saved: its saved state is discarded
            self._launch(machine, name, meta, StartMode.BOOT)
            return
        log.info(
            "clone restored",
            extra=fields(
                pool=meta.pool,
                clone=name,
                action="restore",
                seconds=round(time.monotonic() - started, 2),
            ),
        )

    def _prep(self, session: Any, name: str, how: StartMode | None) -> None:
        """Through the launching session, once the VM runs: how it started (for status) and,
        after a restore, its name for the guest (ClonePrep). Said once when refused."""
        if how is None:
            return
        try:
            with self._vm.translate(f"clone {name}"):
                running = session.machine
                running.set_guest_property(PROP_STARTED_BY, how.value, "RDONLYGUEST")
                if how is StartMode.RESTORE:
                    running.set_guest_property(PROP_IDENTITY, name, "TRANSIENT,RDONLYGUEST")
        except HypervisorError as exc:
            self._parents.say_once("prep", f"a started clone did not take its name ({name}): {exc}")

    def _existing_clone(self, machine: Any, name: str, meta: CloneMeta) -> CloneInfo:
        have = self._meta_of(machine)
        if have is None:
            raise NotOurCloneError(
                f"a VirtualBox machine named {name} exists and imagepipe did not make it; "
                "rename or remove it, or change the pool name"
            )
        if have.pool != meta.pool:
            raise NotOurCloneError(
                f"{name} is a clone of pool {have.pool}; pool {meta.pool} leaves it alone: "
                "give each pool its own name"
            )
        if (have.image, have.version, have.slot) != (meta.image, meta.version, meta.slot):
            raise InvalidStateError(
                f"clone {name} already exists for {have.image} v{have.version} (pool "
                f"{have.pool}, slot {have.slot}); delete it before creating it for "
                f"{meta.image} v{meta.version}"
            )
        try:
            with self._vm.translate(f"clone {name}"):
                machine.find_snapshot(CLEAN_SNAPSHOT)
        except CloneNotFoundError:  # a create cut short after registering: finish it
            self._take_clean_snapshot(machine, name)
        return self._info(machine, name, have)

    def _take_clean_snapshot(self, machine: Any, name: str) -> None:
        self._take_snapshot(machine, name, CLEAN_SNAPSHOT)

    def _take_snapshot(self, machine: Any, name: str, snapshot: str) -> None:
        """Offline (a Saved clone's snapshot shares its state file: the parent's memory).
        pause=true: VirtualBox refuses pause=false (a live snapshot) unless it runs."""
        with self._vm.locked(machine, name, LOCK_WRITE) as session, self._vm.translate(name):
            progress, _ = session.machine.take_snapshot(snapshot, "", True)
            self._vm.wait(progress, name)

    def _refuse_taken_port(self, name: str, display: Endpoint, *, subject: str) -> None:
        """VRDE would start without listening on a taken port: refuse before (another
        program holds it, or a running clone has it)."""
        for clone in self.list_clones():
            if (
                clone.name != name
                and clone.display == display
                and clone.power in (Power.RUNNING, Power.SUSPENDED, Power.OTHER)
            ):
                machine = self._vm.find(clone.name)
                if machine is not None and self._vm.state(machine, clone.name) in LIVE_STATES:
                    raise DisplayInUseError(
                        f"clone {name}: VRDE {subject} ({display}) is used by running clone "
                        f"{clone.name}; give each pool its own display.port_range"
                    )
        if not port_free(display):
            raise DisplayInUseError(
                f"clone {name}: VRDE {subject} ({display}) is held by another program; stop it "
                "or give the pool a free display.port_range"
            )

    def start(self, name: str) -> None:
        machine, meta = self._our(name)
        state = self._vm.state(machine, name)
        if state in ("Running", "Starting", "Restoring"):
            return
        if state in SAVED_STATES and self._pristine(machine, name):
            self._resume_clean(machine, name, meta)
            return
        if state in SAVED_STATES or state == "Paused":
            raise InvalidStateError(f"clone {name} is suspended ({state}): resume it instead")
        self._launch(machine, name, meta, StartMode.BOOT)

    def _launch(
        self, machine: Any, name: str, meta: CloneMeta, how: StartMode | None = None
    ) -> None:
        """Launch headless; `how` it starts is recorded (None: resuming a suspended clone
        keeps what it had)."""
        self._refuse_taken_port(name, meta.display, subject="port")
        with self._vm.launched(machine, f"clone {name}") as session:
            self._prep(session, name, how)
        log.info("clone started", extra=fields(pool=meta.pool, clone=name, action="start"))

    def stop(self, name: str, timeout: float) -> None:
        machine, meta = self._our(name)
        state = self._vm.state(machine, name)
        if state in OFF_STATES or (state in SAVED_STATES and self._pristine(machine, name)):
            return
        if state in SAVED_STATES:
            with (
                self._vm.locked(machine, name, LOCK_WRITE) as session,
                self._vm.translate(f"clone {name}"),
            ):
                session.machine.discard_saved_state(True)
            return
        if state == "Running":
            with (
                self._vm.locked(machine, name, LOCK_SHARED) as session,
                self._vm.translate(f"clone {name}"),
            ):
                session.console.power_button()
            if self._vm.wait_off(machine, name, timeout):
                log.info("clone stopped", extra=fields(pool=meta.pool, clone=name, action="stop"))
                return
        self._vm.power_down(machine, name)
        log.info("clone powered off", extra=fields(pool=meta.pool, clone=name, action="stop"))

    def reset(self, name: str) -> None:
        machine, meta = self._our(name)
        self._vm.power_down(machine, name)
        self._vm.wait_off(machine, name, 30.0)
        with (
            self._vm.locked(machine, name, LOCK_WRITE) as session,
            self._vm.translate(f"clone {name}"),
        ):
            mutable = session.machine
            snapshot = mutable.find_snapshot(CLEAN_SNAPSHOT)
            progress = mutable.restore_snapshot(snapshot)
            self._vm.wait(progress, f"clone {name}")
        self._hub.forget(name)
        if self._vm.state(machine, name) in SAVED_STATES:  # an online clean snapshot: resume it
            self._resume_clean(machine, name, meta)
        else:
            self._launch(machine, name, meta, StartMode.BOOT)
        log.info("clone reset", extra=fields(pool=meta.pool, clone=name, action="reset"))

    def suspend(self, name: str) -> None:
        """Save the machine's state to disk (VirtualBox's suspend, like the original tool)."""
        machine, meta = self._our(name)
        state = self._vm.state(machine, name)
        if state in SAVED_STATES and not self._pristine(machine, name):
            return
        if state not in ("Running", "Paused"):
            raise InvalidStateError(f"clone {name} is off ({state}), so it cannot be suspended")
        with (
            self._vm.locked(machine, name, LOCK_SHARED) as session,
            self._vm.translate(f"clone {name}"),
        ):
            progress = session.machine.save_state()
            self._vm.wait(progress, f"clone {name}")
        log.info("clone suspended", extra=fields(pool=meta.pool, clone=name, action="suspend"))

    def resume(self, name: str) -> None:
        machine, _ = self._our(name)
        state = self._vm.state(machine, name)
        if state == "Running":
            return
        if state == "Paused":
            with (
                self._vm.locked(machine, name, LOCK_SHARED) as session,
                self._vm.translate(f"clone {name}"),
            ):
                session.console.resume()
            return
        if state not in SAVED_STATES or self._pristine(machine, name):
            raise InvalidStateError(f"clone {name} is off ({state}), so it cannot be resumed")
        self._launch(machine, name, self._our(name)[1])

    def delete(self, name: str) -> None:
        check_name(name)
        machine = self._vm.find(name)
        if machine is None:
            self._hub.forget(name)
            return
        if self._meta_of(machine) is None:
            raise NotOurCloneError(
                f"VirtualBox machine {name} was not made by imagepipe; refusing to delete it"
            )
        self._vm.power_down(machine, name)
        self._vm.wait_off(machine, name, 30.0)
        with contextlib.suppress(CloneNotFoundError):  # unregistered by somebody else meanwhile
            self._vm.delete(machine, f"clone {name}")
        with self._lock:
            machine_id = next((k for k, v in self._names.items() if v == name), None)
            if machine_id is not None:
                self._names.pop(machine_id, None)
                self._meta.pop(machine_id, None)
        self._hub.forget(name)
        log.info("clone deleted", extra=fields(clone=name, action="delete"))

    def display(self, name: str) -> Endpoint | None:
        return self._our(name)[1].display

    def sessions(self, name: str) -> GuestSession:
        machine, _ = self._our(name)
        state = self._vm.state(machine, name)
        if state not in ("Running", "Paused"):
            return GuestSession()
        facts = self._facts(machine, name)
        users = facts.users if state == "Running" else ()  # a paused guest reports nobody
        return GuestSession(client=facts.client, connected_since=facts.since, users=users)

    def notify_users(self, name: str, text: str) -> None:
        """A message to the desktop's user: the transient guest property /imagepipe/notice
        (a watcher in the image shows it: `VBoxControl guestproperty wait /imagepipe/notice`)."""
        machine, _ = self._our(name)
        if self._vm.state(machine, name) != "Running":
            raise InvalidStateError(f"clone {name} is not running: nobody can see a message")
        with self._vm.locked(machine, name, LOCK_SHARED) as session, self._vm.translate(name):
            session.machine.set_guest_property(NOTICE_PROPERTY, text, "TRANSIENT,RDONLYGUEST")

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> Subscription:
        return self._hub.subscribe(callback)

    def close(self) -> None:
        self._hub.stop()

    # -- images --------------------------------------------------------------------------------

    def describe_vm(self, vm: str) -> VmSnapshot:
        """The VM and its current snapshot, to register as an image version; refuses a VM
        without a snapshot (clones are linked to one)."""
        machine = self._vm.find(vm)
        if machine is None:
            raise CloneNotFoundError(f"VirtualBox has no machine named {vm}")
        with self._vm.translate(f"VM {vm}"):
            current = machine.current_snapshot
            if getattr(current, "_i", None) is None:
                raise FatalHypervisorError(
                    f"VM {vm} has no snapshot: power it off and take one (VBoxManage snapshot "
                    f"{vm} take clean) before importing it"
                )
            return VmSnapshot(
                vm=str(machine.name),
                vm_id=str(machine.id_p),
                snapshot=str(current.id_p),
                snapshot_name=str(current.name),
            )


@dataclass(frozen=True)
class VmSnapshot:
    vm: str
    vm_id: str
    snapshot: str  # id: a later snapshot with the same name is another version
    snapshot_name: str

    @property
    def fingerprint(self) -> str:
        return f"virtualbox-vm:{self.vm_id}:{self.snapshot}"
