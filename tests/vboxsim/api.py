"""The simulated VirtualBox Main API objects that pyvbox touches, with VBoxSVC's state.

Objects look like the XPCOM bindings: camelCase attributes and methods, enums as ints, arrays
as lists, errors as SimCOMError(errno, msg). Behaviour follows VirtualBox.xidl:

- machine states and transitions (PoweredOff/Saved/Aborted -> Starting -> Running <-> Paused,
  Stopping -> PoweredOff, Saving -> Saved, Restoring, RestoringSnapshot, Snapshotting);
- session locks: one write lock per machine (a running VM's process holds it); Shared either
  takes the write lock or links to the existing session; lockMachine on a write-locked
  machine -> VBOX_E_INVALID_OBJECT_STATE; launchVMProcess on a locked machine -> the same;
  settings change only through a session's mutable machine (else E_ACCESSDENIED);
- IProgress completing asynchronously; an asynchronous failure is reported in resultCode and
  errorInfo, never raised by waitForCompletion;
- snapshots with differencing media (real qcow2 overlays made with qemu-img); linked clones
  are differencing media on a snapshot's medium; unregister + deleteConfig removes them;
- saved states as VirtualBox keeps them (SnapshotImpl.cpp, MachineImplCloneVM.cpp): a snapshot
  of a running machine is online (the VM process saves its state into the snapshot's state
  file and goes on running on a new differencing disk); a snapshot of a Saved machine shares
  the machine's state file; restoring an online snapshot leaves the machine Saved on the
  snapshot's state file; cloneTo(MachineState) of a snapshot with a state file copies the file
  into the clone's Snapshots folder and the clone is Saved; a state file is deleted only when
  neither the machine nor any of its snapshots uses it any more;
- registration, extra data, guest properties (TRANSIENT/TRANSRESET ones vanish at power off);
- IEventSource with passive listeners (getEvent / eventProcessed; getEvent on an unregistered
  listener -> VBOX_E_OBJECT_NOT_FOUND).

A running machine is a `VMProcess` (tests/vboxsim/process.py): a real QEMU guest or, for
fast tests, an in-memory one.
"""

from __future__ import annotations

import itertools
import queue
import shutil
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.vboxsim import codes as C
from tests.vboxsim.codes import SimCOMError

ONLINE = ("Running", "Paused", "Stuck", "Starting", "Stopping", "Saving", "Restoring")
OFFLINE = ("PoweredOff", "Saved", "Aborted", "AbortedSaved", "Teleported")
MUTABLE = ("PoweredOff", "Aborted", "Teleported")
SAVED = ("Saved", "AbortedSaved")


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- processes -------------------------------------------------------------------------------


class VMProcess(Protocol):
    """What VBoxHeadless does for the simulator: run the guest behind the VRDE port."""

    def start(self, restore_from: Path | None) -> None: ...
    def power_button(self) -> None: ...
    def kill(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def save(self, path: Path) -> None: ...
    def snapshot(self, state: Path, disk: Path) -> None: ...
    def guest_property(self, name: str, value: str) -> None: ...


ProcessFactory = Callable[["Host", "MachineData"], VMProcess]


class MemoryProcess:
    """A VM process without a guest: the power button powers it off at once; its Guest
    Additions report (nobody logged in) as soon as it runs."""

    def __init__(self, host: Host, machine: MachineData) -> None:
        self.host, self.machine = host, machine

    def start(self, restore_from: Path | None) -> None:
        if restore_from is not None and not restore_from.is_file():
            raise RuntimeError(f"saved state {restore_from} is missing")
        self.host.guest_users(self.machine, [])

    def power_button(self) -> None:
        threading.Thread(target=self.host.process_ended, args=(self.machine, True)).start()

    def kill(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def save(self, path: Path) -> None:
        path.write_text("saved state\n")

    def snapshot(self, state: Path, disk: Path) -> None:
        state.write_text("saved state\n")

    def guest_property(self, name: str, value: str) -> None:
        pass


# -- progress, errors, events ---------------------------------------------------------------


class ErrorInfo:
    def __init__(self, code: int, text: str) -> None:
        self.resultCode = code - (1 << 32) if code >= (1 << 31) else code
        self.text = text


class Progress:
    """IProgress: the work runs on a thread; failures land in resultCode/errorInfo."""

    def __init__(self, description: str, work: Callable[[], None]) -> None:
        self.description = description
        self.operationDescription = description
        self.operation, self.operationCount = 0, 1
        self.percent, self.timeRemaining = 0, -1
        self.cancelable, self.canceled = False, False
        self.completed = False
        self.resultCode = 0
        self.errorInfo: ErrorInfo | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(work,), daemon=True).start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except SimCOMError as exc:
            self.errorInfo = ErrorInfo(exc.errno & 0xFFFFFFFF, exc.msg)
            self.resultCode = exc.errno
        except Exception as exc:  # a bug in the simulator must still complete the progress
            self.errorInfo = ErrorInfo(C.E_FAIL, f"simulator: {exc!r}")
            self.resultCode = self.errorInfo.resultCode
        self.percent, self.completed = 100, True
        self._done.set()

    def waitForCompletion(self, timeout: int) -> None:
        self._done.wait(None if timeout < 0 else timeout / 1000)

    def waitForOperationCompletion(self, operation: int, timeout: int) -> None:
        self.waitForCompletion(timeout)


_event_ids = itertools.count(1)


class Event:
    """IEvent and the specific event interfaces (queryInterface returns the same object)."""

    def __init__(self, source: EventSource, type_: int, **attrs: Any) -> None:
        self.type = type_
        self.source = source
        self.waitable = False
        self.id = next(_event_ids)
        for key, value in attrs.items():
            setattr(self, key, value)

    def setProcessed(self) -> None:
        pass

    def waitProcessed(self, timeout: int) -> bool:
        return True


class Listener:
    def __init__(self) -> None:
        self.id = uuidlib.uuid4().hex

    def handleEvent(self, event: Event) -> None:
        raise SimCOMError(C.E_FAIL, "a passive listener has no handleEvent")


class EventSource:
    """IEventSource with passive listeners (the mode pyvbox and the web service use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, tuple[frozenset[int], queue.Queue[Event]]] = {}

    def createListener(self) -> Listener:
        return Listener()

    def registerListener(self, listener: Listener, interesting: list[int], active: bool) -> None:
        if active:
            raise SimCOMError(C.E_INVALIDARG, "the simulator supports passive listeners only")
        with self._lock:
            if listener.id in self._queues:
                raise SimCOMError(C.E_INVALIDARG, "listener already registered")
            self._queues[listener.id] = (frozenset(int(t) for t in interesting), queue.Queue())

    def unregisterListener(self, listener: Listener) -> None:
        with self._lock:
            if self._queues.pop(listener.id, None) is None:
                raise SimCOMError(C.VBOX_E_OBJECT_NOT_FOUND, "listener was never registered")

    def getEvent(self, listener: Listener, timeout: int) -> Event | None:
        with self._lock:
            entry = self._queues.get(listener.id)
        if entry is None:
            raise SimCOMError(C.VBOX_E_OBJECT_NOT_FOUND, "Listener was unregistered")
        try:
            return entry[1].get(timeout=max(timeout, 0) / 1000 if timeout >= 0 else None)
        except queue.Empty:
            return None

    def eventProcessed(self, listener: Listener, event: Event) -> None:
        with self._lock:
            if listener.id not in self._queues:
                raise SimCOMError(C.VBOX_E_OBJECT_NOT_FOUND, "Listener was unregistered")

    def fireEvent(self, event: Event, timeout: int) -> bool:
        with self._lock:
            targets = [q for kinds, q in self._queues.values() if _wants(kinds, event.type)]
        for target in targets:
            target.put(event)
        return True

    def fire(self, type_: int, **attrs: Any) -> None:
        self.fireEvent(Event(self, type_, **attrs), 0)


def _wants(kinds: frozenset[int], type_: int) -> bool:
    if type_ in kinds or C.EVENT_ANY in kinds:
        return True
    return C.EVENT_MACHINE_EVENT in kinds and type_ in C.MACHINE_EVENTS


# -- media and snapshots ------------------------------------------------------------------------


class Medium:
    """IMedium: a qcow2 file; a differencing medium's backing file is its parent."""

    def __init__(self, host: Host, location: Path, parent: Medium | None) -> None:
        self.id = str(uuidlib.uuid4())
        self.location = str(location)
        self.name = location.name
        self.parent = parent
        self.children: list[Medium] = []
        self.state = C.MEDIUM_CREATED
        self.format = "qcow2"
        self.machineIds: list[str] = []
        self._host = host
        if parent is not None:
            parent.children.append(self)

    @property
    def base(self) -> Medium:
        return self if self.parent is None else self.parent.base

    def deleteStorage(self) -> Progress:
        if self.children:
            raise SimCOMError(
                C.VBOX_E_OBJECT_IN_USE, f"Medium '{self.location}' has differencing children"
            )
        if self.machineIds:
            raise SimCOMError(C.VBOX_E_OBJECT_IN_USE, f"Medium '{self.location}' is attached")

        def work() -> None:
            Path(self.location).unlink(missing_ok=True)
            self._host.forget_medium(self)

        return Progress(f"Deleting {self.name}", work)

    def close(self) -> None:
        if self.children or self.machineIds:
            raise SimCOMError(C.VBOX_E_OBJECT_IN_USE, f"Medium '{self.location}' is in use")
        self._host.forget_medium(self)


@dataclass
class SnapshotData:
    id: str
    name: str
    description: str
    medium: Medium  # the disk as it was when the snapshot was taken (read-only parent)
    machine: MachineData
    parent: SnapshotData | None
    children: list[SnapshotData] = field(default_factory=list)
    time_stamp: int = field(default_factory=_now_ms)
    state_file: Path | None = None  # an online snapshot's saved state (may be shared)


class Snapshot:
    def __init__(self, data: SnapshotData) -> None:
        self._d = data
        self.id, self.name, self.description = data.id, data.name, data.description
        self.timeStamp = data.time_stamp

    @property
    def online(self) -> bool:
        """Taken while running or Saved: the snapshot has a saved state."""
        return self._d.state_file is not None

    @property
    def machine(self) -> Machine:
        return Machine(self._d.machine, mutable=False, snapshot=self._d)

    @property
    def parent(self) -> Snapshot | None:
        return Snapshot(self._d.parent) if self._d.parent else None

    @property
    def children(self) -> list[Snapshot]:
        return [Snapshot(c) for c in self._d.children]

    @property
    def childrenCount(self) -> int:
        return len(self._d.children)


# -- machines -------------------------------------------------------------------------------


@dataclass
class Boot:
    """How the simulator boots the guest (a real VirtualBox boots its BIOS; this is the
    simulator's stand-in for the tiny image: direct kernel boot under QEMU)."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""


@dataclass
class MachineData:
    id: str
    name: str
    settings_file: Path
    groups: list[str]
    os_type: str
    state: str = "PoweredOff"
    registered: bool = False
    memory_mb: int = 128
    cpus: int = 1
    vrde_enabled: bool = False
    vrde_properties: dict[str, str] = field(default_factory=lambda: {"TCP/Ports": "3389"})
    extra: dict[str, str] = field(default_factory=dict)
    guest_props: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    disk: Medium | None = None
    snapshots: list[SnapshotData] = field(default_factory=list)
    current_snapshot: SnapshotData | None = None
    boot: Boot = field(default_factory=Boot)
    firmware_type: int = C.FIRMWARE_BIOS
    write_lock: Session | None = None
    shared: list[Session] = field(default_factory=list)
    process: VMProcess | None = None
    process_session: Session | None = None
    saved_state: Path | None = None
    console: Console | None = None
    stopping: bool = False
    last_state_change: int = field(default_factory=_now_ms)


class FirmwareSettings:
    """IFirmwareSettings (VirtualBox 7.1): the machine's firmware type, read-only here."""

    def __init__(self, data: MachineData) -> None:
        self._d = data

    @property
    def firmwareType(self) -> int:
        return self._d.firmware_type


class VRDEServer:
    def __init__(self, data: MachineData, mutable: bool) -> None:
        object.__setattr__(self, "_d", data)
        object.__setattr__(self, "_mutable", mutable)

    @property
    def enabled(self) -> bool:
        return bool(self._d.vrde_enabled)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._mutable:
            raise SimCOMError(C.E_ACCESSDENIED, "The machine is not mutable (no session)")
        if name == "enabled":
            self._d.vrde_enabled = bool(value)
            return
        raise SimCOMError(C.E_INVALIDARG, f"IVRDEServer has no settable attribute {name}")

    authType = 1  # AuthType.Null
    authTimeout = 5000
    allowMultiConnection = False
    reuseSingleConnection = False
    VRDEExtPack = "Oracle VM VirtualBox Extension Pack"

    def setVRDEProperty(self, key: str, value: str) -> None:
        if not self._mutable:
            raise SimCOMError(C.E_ACCESSDENIED, "The machine is not mutable (no session)")
        self._d.vrde_properties[key] = value

    def getVRDEProperty(self, key: str) -> str:
        return self._d.vrde_properties.get(key, "")

    @property
    def VRDEProperties(self) -> list[str]:
        return sorted(self._d.vrde_properties)


class VRDEServerInfo:
    def __init__(self) -> None:
        self.active = False
        self.port = -1
        self.numberOfClients = 0
        self.beginTime = 0
        self.endTime = 0
        self.bytesSent = self.bytesSentTotal = self.bytesReceived = self.bytesReceivedTotal = 0
        self.user = self.domain = self.clientName = self.clientIP = ""
        self.clientVersion = 0
        self.encryptionStyle = 0


class Console:
    """IConsole of a running VM (reached through a session locked on it)."""

    def __init__(self, host: Host, data: MachineData) -> None:
        self._host, self._d = host, data
        self.eventSource = EventSource()
        self.VRDEServerInfo = VRDEServerInfo()

    @property
    def machine(self) -> Machine:
        return Machine(self._d, mutable=True)

    @property
    def state(self) -> int:
        return self._host.state_value(self._d.state)

    def powerDown(self) -> Progress:
        return self._host.power_down(self._d)

    def powerButton(self) -> None:
        self._host.power_button(self._d)

    def pause(self) -> None:
        self._host.pause(self._d)

    def resume(self) -> None:
        self._host.resume(self._d)

    def reset(self) -> None:
        self._host.require_state(self._d, ("Running",), "reset")


_MUTABLE = {"memorySize": "memory_mb", "CPUCount": "cpus", "groups": "groups", "name": "name"}


class Machine:
    """IMachine. `mutable` = the session's machine object (settings may change)."""

    def __init__(
        self, data: MachineData, *, mutable: bool, snapshot: SnapshotData | None = None
    ) -> None:
        object.__setattr__(self, "_d", data)
        object.__setattr__(self, "_mutable", mutable)
        object.__setattr__(self, "_snapshot", snapshot)
        object.__setattr__(self, "_host", HOSTS.current())

    # attributes
    @property
    def id(self) -> str:
        return self._d.id

    @property
    def name(self) -> str:
        return self._d.name

    @property
    def groups(self) -> list[str]:
        return list(self._d.groups)

    @property
    def memorySize(self) -> int:
        return self._d.memory_mb

    @property
    def CPUCount(self) -> int:
        return self._d.cpus

    @property
    def accessible(self) -> bool:
        return True

    @property
    def state(self) -> int:
        return self._host.state_value(self._d.state)

    @property
    def lastStateChange(self) -> int:
        return self._d.last_state_change

    @property
    def sessionState(self) -> int:
        return C.SESSION_LOCKED if self._d.write_lock is not None else C.SESSION_UNLOCKED

    @property
    def sessionName(self) -> str:
        return "headless" if self._d.process is not None else ""

    @property
    def settingsFilePath(self) -> str:
        return str(self._d.settings_file)

    @property
    def stateFilePath(self) -> str:
        if self._snapshot is not None:  # a snapshot's machine: the snapshot's state file
            state = self._snapshot.state_file
            return str(state) if state else ""
        return str(self._d.saved_state) if self._d.saved_state else ""

    @property
    def currentSnapshot(self) -> Snapshot | None:
        cur = self._d.current_snapshot
        return Snapshot(cur) if cur else None

    @property
    def snapshotCount(self) -> int:
        return len(self._d.snapshots)

    @property
    def VRDEServer(self) -> VRDEServer:
        return VRDEServer(self._d, self._mutable)

    @property
    def firmwareType(self) -> int:
        if self._host.version_at_least(7, 1):
            raise AttributeError("VirtualBox 7.1 moved IMachine.firmwareType to firmwareSettings")
        return self._d.firmware_type

    @property
    def firmwareSettings(self) -> FirmwareSettings:
        if not self._host.version_at_least(7, 1):
            raise AttributeError("IMachine.firmwareSettings is new in VirtualBox 7.1")
        return FirmwareSettings(self._d)

    @property
    def mediumAttachments(self) -> list[MediumAttachment]:
        if self._snapshot is not None:  # a snapshot's machine: the disk as it was then
            return [MediumAttachment(self._snapshot.medium)]
        return [MediumAttachment(self._d.disk)] if self._d.disk else []

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _MUTABLE:
            raise SimCOMError(C.E_INVALIDARG, f"IMachine attribute {name} is read-only")
        if not self._mutable:
            raise SimCOMError(
                C.E_ACCESSDENIED,
                f"The machine '{self._d.name}' is not mutable: lock it with a session first",
            )
        if name in ("memorySize", "CPUCount") and self._d.state not in MUTABLE:
            raise SimCOMError(  # MutableStateDep: not even Saved (the state holds the memory)
                C.VBOX_E_INVALID_VM_STATE, f"The machine is not mutable (state is {self._d.state})"
            )
        setattr(self._d, _MUTABLE[name], list(value) if name == "groups" else value)

    # locking and launching
    def lockMachine(self, session: Session, lockType: int) -> None:
        self._host.lock_machine(self._d, session, int(lockType))

    def launchVMProcess(self, session: Session, name: str, environmentChanges: list[str]) -> Any:
        if not isinstance(environmentChanges, list):
            raise SimCOMError(C.E_INVALIDARG, "environmentChanges must be a safe array")
        return self._host.launch(self._d, session, name)

    # settings
    def saveSettings(self) -> None:
        if not self._mutable:
            raise SimCOMError(C.E_ACCESSDENIED, "saveSettings needs a locked session")
        self._host.write_settings(self._d)

    def discardSettings(self) -> None:
        pass

    def getExtraData(self, key: str) -> str:
        return self._d.extra.get(key, "")

    def setExtraData(self, key: str, value: str) -> None:
        self._host.set_extra(self._d, key, value)

    def getExtraDataKeys(self) -> list[str]:
        return sorted(self._d.extra)

    # guest properties
    def getGuestProperty(self, name: str) -> tuple[str, int, str]:
        return self._d.guest_props.get(name, ("", 0, ""))

    def getGuestPropertyValue(self, property: str) -> str:
        return self._d.guest_props.get(property, ("", 0, ""))[0]

    def getGuestPropertyTimestamp(self, property: str) -> int:
        return self._d.guest_props.get(property, ("", 0, ""))[1]

    def setGuestProperty(self, property: str, value: str, flags: str) -> None:
        self._host.set_guest_property(self._d, property, value, flags)

    def setGuestPropertyValue(self, property: str, value: str) -> None:
        self._host.set_guest_property(self._d, property, value, "")

    def deleteGuestProperty(self, name: str) -> None:
        self._host.set_guest_property(self._d, name, "", "")

    def enumerateGuestProperties(
        self, patterns: str
    ) -> tuple[list[str], list[str], list[int], list[str]]:
        items = sorted(
            (k, v)
            for k, v in self._d.guest_props.items()
            if not patterns or any(_glob(k, p) for p in patterns.split("|"))
        )
        return (
            [k for k, _ in items],
            [v[0] for _, v in items],
            [v[1] for _, v in items],
            [v[2] for _, v in items],
        )

    # snapshots, state, clones
    def findSnapshot(self, nameOrId: str) -> Snapshot:
        for snap in self._d.snapshots:
            if nameOrId in ("", snap.id, snap.name):
                return Snapshot(snap)
        raise SimCOMError(
            C.VBOX_E_OBJECT_NOT_FOUND,
            f"Could not find a snapshot named '{nameOrId}' in machine '{self._d.name}'",
        )

    def takeSnapshot(self, name: str, description: str, pause: bool) -> tuple[Progress, str]:
        self._require_session("takeSnapshot")
        return self._host.take_snapshot(self._d, name, description, bool(pause))

    def restoreSnapshot(self, snapshot: Snapshot) -> Progress:
        self._require_session("restoreSnapshot")
        return self._host.restore_snapshot(self._d, snapshot._d)

    def saveState(self) -> Progress:
        self._require_session("saveState")
        return self._host.save_state(self._d)

    def discardSavedState(self, fRemoveFile: bool) -> None:
        self._require_session("discardSavedState")
        self._host.discard_saved_state(self._d)

    def cloneTo(self, target: Machine, mode: int, options: list[int]) -> Progress:
        if self._mutable:  # MachineCloneVM::start
            raise SimCOMError(C.E_INVALIDARG, "The source machine is mutable")
        return self._host.clone_to(self._d, self._snapshot, target._d, [int(o) for o in options])

    def unregister(self, cleanupMode: int) -> list[Medium]:
        return self._host.unregister(self._d, int(cleanupMode))

    def deleteConfig(self, media: list[Medium]) -> Progress:
        return self._host.delete_config(self._d, media)

    def _require_session(self, what: str) -> None:
        if not self._mutable:
            raise SimCOMError(
                C.E_ACCESSDENIED, f"{what}: the machine '{self._d.name}' is not locked"
            )


class MediumAttachment:
    def __init__(self, medium: Medium | None) -> None:
        self.medium = medium
        self.controller, self.port, self.device = "SATA", 0, 0
        self.type = C.DEVICE_HARD_DISK


def _glob(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


class Session:
    """ISession (from VirtualBoxManager.getSessionObject)."""

    def __init__(self) -> None:
        self.state = C.SESSION_UNLOCKED
        self.type = C.SESSION_TYPE_NULL
        self.name = ""
        self._machine: MachineData | None = None

    @property
    def machine(self) -> Machine | None:
        if self._machine is None:
            return None
        return Machine(self._machine, mutable=True)

    @property
    def console(self) -> Console | None:
        if self._machine is None:
            return None
        return self._machine.console

    def unlockMachine(self) -> None:
        HOSTS.current().unlock(self)


# -- the server ----------------------------------------------------------------------------------


class Host:
    """VBoxSVC: the registry of machines and media, and the global event source."""

    def __init__(
        self,
        home: Path,
        *,
        version: str = "6.1.50",
        process_factory: ProcessFactory = MemoryProcess,
    ) -> None:
        self.home = home
        self.version = version
        self.revision = 161033
        self.process_factory = process_factory
        self.lock = threading.RLock()
        self.machines: dict[str, MachineData] = {}  # registered, by id
        self.media: dict[str, Medium] = {}  # by location
        self.event_source = EventSource()
        self.extra: dict[str, str] = {}
        self.states = C.machine_states(version)
        self.vbox = VirtualBox(self)
        home.mkdir(parents=True, exist_ok=True)

    # helpers for tests (what an administrator or Packer would have done) -------------------

    def create_base_vm(
        self,
        name: str,
        disk: Path,
        *,
        boot: Boot | None = None,
        snapshot: str | None = "clean",
        memory_mb: int = 128,
        firmware_type: int = C.FIRMWARE_BIOS,
    ) -> MachineData:
        """A registered, powered-off VM with `disk` attached and, optionally, a snapshot."""
        with self.lock:
            data = self._new_machine(name, ["/"], "Other_64")
            data.memory_mb = memory_mb
            data.firmware_type = firmware_type
            data.disk = self.open_medium(disk)
            data.disk.machineIds.append(data.id)
            data.boot = boot or Boot()
            self._register(data)
        if snapshot:
            session = Session()
            Machine(data, mutable=False).lockMachine(session, C.LOCK_WRITE)
            progress, _ = session.machine.takeSnapshot(snapshot, "", True)  # type: ignore[union-attr]
            progress.waitForCompletion(-1)
            session.unlockMachine()
        return data

    def by_name(self, name: str) -> MachineData:
        with self.lock:
            for data in self.machines.values():
                if data.name == name:
                    return data
        raise KeyError(name)

    def open_medium(self, path: Path) -> Medium:
        with self.lock:
            found = self.media.get(str(path))
            if found is None:
                found = Medium(self, path, None)
                self.media[str(path)] = found
            return found

    def forget_medium(self, medium: Medium) -> None:
        with self.lock:
            self.media.pop(medium.location, None)
            if medium.parent is not None and medium in medium.parent.children:
                medium.parent.children.remove(medium)

    def shutdown(self) -> None:
        """Power off every running machine (test teardown)."""
        for data in list(self.machines.values()):
            if data.process is not None:
                self.power_down(data).waitForCompletion(-1)

    # state -----------------------------------------------------------------------------------

    def state_value(self, name: str) -> int:
        return self.states[name]

    def set_state(self, data: MachineData, state: str) -> None:
        with self.lock:
            if data.state == state:
                return
            data.state = state
            data.last_state_change = _now_ms()
        self.event_source.fire(
            C.EVENT_MACHINE_STATE_CHANGED, machineId=data.id, state=self.states[state]
        )

    def require_state(self, data: MachineData, allowed: tuple[str, ...], what: str) -> None:
        if data.state not in allowed:
            raise SimCOMError(
                C.VBOX_E_INVALID_VM_STATE,
                f"Invalid machine state: {data.state} (must be {' or '.join(allowed)}) "
                f"for {what} of '{data.name}'",
            )

    # sessions --------------------------------------------------------------------------------

    def lock_machine(self, data: MachineData, session: Session, lock_type: int) -> None:
        with self.lock:
            if not data.registered:
                raise SimCOMError(C.E_FAIL, f"The machine '{data.name}' is not registered")
            if session.state != C.SESSION_UNLOCKED:
                raise SimCOMError(C.VBOX_E_INVALID_OBJECT_STATE, "The given session is busy")
            if data.write_lock is not None:
                if lock_type == C.LOCK_WRITE:
                    raise SimCOMError(
                        C.VBOX_E_INVALID_OBJECT_STATE,
                        f"The machine '{data.name}' is already locked for a session "
                        "(or being unlocked)",
                    )
                data.shared.append(session)
                session.type = C.SESSION_TYPE_SHARED
            else:
                data.write_lock = session
                session.type = C.SESSION_TYPE_WRITE
            session.state = C.SESSION_LOCKED
            session._machine = data
        self.event_source.fire(
            C.EVENT_SESSION_STATE_CHANGED, machineId=data.id, state=C.SESSION_LOCKED
        )

    def unlock(self, session: Session) -> None:
        with self.lock:
            data = session._machine
            if session.state != C.SESSION_LOCKED or data is None:
                raise SimCOMError(
                    C.VBOX_E_INVALID_SESSION_STATE,
                    f"The session is not locked (session state: {session.state})",
                )
            if data.write_lock is session:
                data.write_lock = None
            elif session in data.shared:
                data.shared.remove(session)
            session.state, session.type, session._machine = C.SESSION_UNLOCKED, 0, None
        self.event_source.fire(
            C.EVENT_SESSION_STATE_CHANGED, machineId=data.id, state=C.SESSION_UNLOCKED
        )

    # power ------------------------------------------------------------------------------------

    def launch(self, data: MachineData, session: Session, name: str) -> Progress:
        with self.lock:
            if name not in ("headless", "gui", "sdl", "separate", ""):
                raise SimCOMError(C.E_INVALIDARG, f"Invalid frontend name: '{name}'")
            if not data.registered:
                raise SimCOMError(C.E_FAIL, f"The machine '{data.name}' is not registered")
            if session.state != C.SESSION_UNLOCKED:
                raise SimCOMError(C.VBOX_E_INVALID_OBJECT_STATE, "The given session is busy")
            if data.write_lock is not None:
                raise SimCOMError(
                    C.VBOX_E_INVALID_OBJECT_STATE,
                    f"The machine '{data.name}' is already locked by a session (or being "
                    "locked or unlocked)",
                )
            self.require_state(data, OFFLINE, "launchVMProcess")
            restore = data.saved_state
            vm_session = Session()
            vm_session.state, vm_session.type, vm_session._machine = (
                C.SESSION_LOCKED,
                C.SESSION_TYPE_WRITE,
                data,
            )
            data.write_lock = vm_session
            data.process_session = vm_session
            data.console = Console(self, data)
            data.stopping = False
            session.state, session.type, session._machine = (
                C.SESSION_SPAWNING,
                C.SESSION_TYPE_REMOTE,
                data,
            )
            data.shared.append(session)
            process = self.process_factory(self, data)
            data.process = process
        self.set_state(data, "Restoring" if restore else "Starting")

        def work() -> None:
            try:
                process.start(restore)
            except Exception as exc:
                self.process_ended(data, False)
                raise SimCOMError(C.VBOX_E_VM_ERROR, f"The VM process failed: {exc}") from exc
            with self.lock:
                data.saved_state = None
                if restore is not None:
                    self._release_state(data, restore)
                session.state = C.SESSION_LOCKED
                if data.vrde_enabled and data.console is not None:
                    port = data.vrde_properties.get("TCP/Ports", "3389")
                    data.console.VRDEServerInfo.port = int(port.split(",")[0].split("-")[0])
            self.set_state(data, "Running")

        return Progress(f"Starting virtual machine {data.name}", work)

    def process_ended(self, data: MachineData, clean: bool) -> None:
        """The VM process exited: the guest powered off (clean) or it died (Aborted)."""
        with self.lock:
            if data.process is None:
                return
            data.process = None
            final = "PoweredOff" if clean or data.stopping else "Aborted"
            if data.saved_state is not None:
                final = "Saved"
            self._close_vm_sessions(data)
            for key in [k for k, v in data.guest_props.items() if "TRANS" in v[2].upper()]:
                del data.guest_props[key]
        self.set_state(data, final)

    def _close_vm_sessions(self, data: MachineData) -> None:
        if data.process_session is not None and data.write_lock is data.process_session:
            data.write_lock = None
        data.process_session = None
        # the clients' remote sessions stay Locked until they unlock (VBoxManage controlvm
        # poweroff unlocks afterwards), but no longer hold the machine
        data.shared.clear()
        data.console = None

    def power_down(self, data: MachineData) -> Progress:
        with self.lock:
            self.require_state(data, ("Running", "Paused", "Stuck", "Starting"), "powerDown")
            process = data.process
            data.stopping = True
        self.set_state(data, "Stopping")

        def work() -> None:
            if process is not None:
                process.kill()
            self.process_ended(data, True)

        return Progress(f"Powering off {data.name}", work)

    def power_button(self, data: MachineData) -> None:
        self.require_state(data, ("Running",), "powerButton")
        assert data.process is not None
        data.process.power_button()

    def pause(self, data: MachineData) -> None:
        self.require_state(data, ("Running",), "pause")
        assert data.process is not None
        data.process.pause()
        self.set_state(data, "Paused")

    def resume(self, data: MachineData) -> None:
        self.require_state(data, ("Paused",), "resume")
        assert data.process is not None
        data.process.resume()
        self.set_state(data, "Running")

    def save_state(self, data: MachineData) -> Progress:
        with self.lock:
            self.require_state(data, ("Running", "Paused"), "saveState")
            process = data.process
        self.set_state(data, "Saving")

        def work() -> None:
            path = self._state_file(data)
            assert process is not None
            with self.lock:
                data.saved_state = path  # the VM process ends as it finishes saving
            try:
                process.save(path)
            except Exception:
                with self.lock:
                    data.saved_state = None
                raise
            self.process_ended(data, True)

        return Progress(f"Saving the state of {data.name}", work)

    def discard_saved_state(self, data: MachineData) -> None:
        self.require_state(data, ("Saved", "AbortedSaved"), "discardSavedState")
        with self.lock:
            state, data.saved_state = data.saved_state, None
            if state is not None:
                self._release_state(data, state)
        self.set_state(data, "PoweredOff")

    def _state_file(self, data: MachineData) -> Path:
        """A new saved-state file in the machine's Snapshots folder (VirtualBox names them by
        time: never the name of a file a snapshot may still share)."""
        folder = data.settings_file.parent / "Snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{{{uuidlib.uuid4()}}}.sav"

    def _release_state(self, data: MachineData, state: Path) -> None:
        """SessionMachine::i_releaseSavedStateFile: delete a state file the machine no longer
        uses unless one of its snapshots shares it."""
        if state == data.saved_state or any(s.state_file == state for s in data.snapshots):
            return
        state.unlink(missing_ok=True)

    # snapshots and media ------------------------------------------------------------------

    def _qemu_img(self, *args: str) -> None:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=120)

    def _differencing(self, parent: Medium, folder: Path) -> Medium:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{{{uuidlib.uuid4()}}}.qcow2"
        self._qemu_img(
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", parent.location, str(path)
        )
        medium = Medium(self, path, parent)
        with self.lock:
            self.media[str(path)] = medium
        return medium

    def take_snapshot(
        self, data: MachineData, name: str, description: str, pause: bool = True
    ) -> tuple[Progress, str]:
        """Offline (PoweredOff, Aborted), offline sharing the state file (Saved), or online
        (Running, Paused: the VM process saves its state into the snapshot's state file and
        runs on a new differencing disk; pause=False is a live snapshot, Running only)."""
        if not pause and data.state != "Running":
            raise SimCOMError(
                C.VBOX_E_INVALID_VM_STATE,
                "Cannot take a live snapshot of a virtual machine unless it is running.",
            )
        self.require_state(
            data, ("PoweredOff", "Saved", "Aborted", "Running", "Paused"), "takeSnapshot"
        )
        snap_id = str(uuidlib.uuid4())
        before = data.state
        online = before in ("Running", "Paused")
        process = data.process
        self.set_state(data, ("OnlineSnapshotting" if pause else "LiveSnapshotting") if online
                       else "Snapshotting")  # fmt: skip

        def work() -> None:
            try:
                if data.disk is None:
                    raise SimCOMError(C.VBOX_E_INVALID_VM_STATE, "no hard disk to snapshot")
                frozen = data.disk
                new = self._differencing(frozen, data.settings_file.parent / "Snapshots")
                state = data.saved_state if before in SAVED else None
                if online:
                    state = self._state_file(data)
                    assert process is not None
                    try:
                        process.snapshot(state, Path(new.location))
                    except Exception as exc:
                        state.unlink(missing_ok=True)
                        Path(new.location).unlink(missing_ok=True)
                        self.forget_medium(new)
                        raise SimCOMError(
                            C.VBOX_E_VM_ERROR, f"Failed to save the machine state: {exc}"
                        ) from exc
                frozen.machineIds.remove(data.id)
                new.machineIds.append(data.id)
                snap = SnapshotData(
                    snap_id, name, description, frozen, data, data.current_snapshot,
                    state_file=state,
                )  # fmt: skip
                with self.lock:
                    if data.current_snapshot is not None:
                        data.current_snapshot.children.append(snap)
                    data.snapshots.append(snap)
                    data.current_snapshot = snap
                    data.disk = new
            finally:
                self.set_state(data, before)

        return Progress(f"Taking snapshot {name}", work), snap_id

    def restore_snapshot(self, data: MachineData, snap: SnapshotData) -> Progress:
        self.require_state(data, ("PoweredOff", "Saved", "Aborted"), "restoreSnapshot")
        if snap.machine is not data:
            raise SimCOMError(C.E_INVALIDARG, "the snapshot belongs to another machine")
        self.set_state(data, "RestoringSnapshot")

        def work() -> None:
            try:
                old = data.disk
                new = self._differencing(snap.medium, data.settings_file.parent / "Snapshots")
                with self.lock:
                    data.disk = new
                    new.machineIds.append(data.id)
                    data.current_snapshot = snap
                    previous, data.saved_state = data.saved_state, snap.state_file
                    if previous is not None:
                        self._release_state(data, previous)
                if old is not None and old is not snap.medium:
                    old.machineIds.remove(data.id)
                    Path(old.location).unlink(missing_ok=True)
                    self.forget_medium(old)
            finally:
                # an online snapshot: Saved on the snapshot's (shared) state file
                self.set_state(data, "Saved" if data.saved_state else "PoweredOff")

        return Progress(f"Restoring snapshot {snap.name}", work)

    def clone_to(
        self,
        source: MachineData,
        snapshot: SnapshotData | None,
        target: MachineData,
        options: list[int],
    ) -> Progress:
        if target.registered:
            raise SimCOMError(C.E_INVALIDARG, "the target machine must not be registered yet")
        linked = C.CLONE_OPTION_LINK in options
        if linked and snapshot is None:
            raise SimCOMError(C.E_INVALIDARG, "Linked clone can only be created from a snapshot")
        origin = snapshot.medium if snapshot is not None else source.disk
        if origin is None:
            raise SimCOMError(C.VBOX_E_OBJECT_NOT_FOUND, f"'{source.name}' has no hard disk")
        # MachineState mode: the source's saved state becomes the clone's current state
        state = snapshot.state_file if snapshot is not None else source.saved_state

        def work() -> None:
            folder = target.settings_file.parent
            folder.mkdir(parents=True, exist_ok=True)
            if linked:
                disk = self._differencing(origin, folder / "Snapshots")
            else:
                path = folder / f"{target.name}-disk1.qcow2"
                self._qemu_img("convert", "-q", "-O", "qcow2", origin.location, str(path))
                disk = Medium(self, path, None)
                with self.lock:
                    self.media[str(path)] = disk
            copied = None
            if state is not None:
                copied = folder / "Snapshots" / state.name
                copied.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(state, copied)
                except OSError as exc:
                    raise SimCOMError(
                        C.VBOX_E_IPRT_ERROR,
                        f"Could not copy state file '{state}' to '{copied}' ({exc})",
                    ) from exc
            with self.lock:
                target.disk = disk
                disk.machineIds.append(target.id)
                target.memory_mb, target.cpus = source.memory_mb, source.cpus
                target.boot = source.boot
                target.os_type = source.os_type
                target.firmware_type = source.firmware_type
                target.saved_state = copied
                if copied is not None:  # "If the target machine has saved state we MUST
                    target.state = "Saved"  # adjust the machine state"
            self.write_settings(target)

        return Progress(f"Cloning {source.name}", work)

    # registration ---------------------------------------------------------------------------

    def _new_machine(self, name: str, groups: list[str], os_type: str) -> MachineData:
        group = groups[0] if groups else "/"
        folder = self.home / group.strip("/") / name
        return MachineData(
            id=str(uuidlib.uuid4()),
            name=name,
            settings_file=folder / f"{name}.vbox",
            groups=list(groups) or ["/"],
            os_type=os_type,
        )

    def _register(self, data: MachineData) -> None:
        with self.lock:
            if any(m.name == data.name for m in self.machines.values()):
                raise SimCOMError(
                    C.VBOX_E_OBJECT_IN_USE, f"A machine named '{data.name}' already exists"
                )
            data.registered = True
            self.machines[data.id] = data
            self.write_settings(data)
        self.event_source.fire(C.EVENT_MACHINE_REGISTERED, machineId=data.id, registered=True)

    def version_at_least(self, major: int, minor: int) -> bool:
        have = tuple(int(part) for part in self.version.split(".")[:2])
        return have >= (major, minor)

    def write_settings(self, data: MachineData) -> None:
        data.settings_file.parent.mkdir(parents=True, exist_ok=True)
        data.settings_file.write_text(f'<VirtualBox><Machine name="{data.name}"/></VirtualBox>\n')

    def unregister(self, data: MachineData, mode: int) -> list[Medium]:
        with self.lock:
            if not data.registered:
                raise SimCOMError(C.VBOX_E_OBJECT_NOT_FOUND, f"'{data.name}' is not registered")
            if data.write_lock is not None or data.shared:
                raise SimCOMError(
                    C.VBOX_E_INVALID_OBJECT_STATE,
                    f"Cannot unregister the machine '{data.name}' while it is locked",
                )
            if data.snapshots and mode == C.CLEANUP_UNREGISTER_ONLY:
                raise SimCOMError(
                    C.VBOX_E_INVALID_OBJECT_STATE,
                    f"Cannot unregister the machine '{data.name}' because it has "
                    f"{len(data.snapshots)} snapshots",
                )
            media: list[Medium] = []
            if mode != C.CLEANUP_UNREGISTER_ONLY:
                if data.disk is not None:
                    data.disk.machineIds.remove(data.id)
                    media.append(data.disk)
                for snap in reversed(data.snapshots):
                    media.append(snap.medium)
                data.disk = None
                data.snapshots.clear()
                data.current_snapshot = None
            data.registered = False
            del self.machines[data.id]
        self.event_source.fire(C.EVENT_MACHINE_REGISTERED, machineId=data.id, registered=False)
        return media if mode in (C.CLEANUP_DETACH_HARD_DISKS, C.CLEANUP_FULL) else []

    def delete_config(self, data: MachineData, media: list[Medium]) -> Progress:
        if data.registered:
            raise SimCOMError(
                C.VBOX_E_INVALID_VM_STATE, f"'{data.name}' must be unregistered first"
            )

        def work() -> None:
            for medium in media:
                if medium.children:
                    continue  # still a parent of other machines' disks: VirtualBox keeps it
                Path(medium.location).unlink(missing_ok=True)
                self.forget_medium(medium)
            if data.saved_state:
                data.saved_state.unlink(missing_ok=True)
            shutil.rmtree(data.settings_file.parent, ignore_errors=True)

        return Progress(f"Deleting {data.name}", work)

    # extra data and guest properties ----------------------------------------------------------

    def set_extra(self, data: MachineData, key: str, value: str) -> None:
        with self.lock:
            if value:
                data.extra[key] = value
            else:
                data.extra.pop(key, None)
        self.event_source.fire(C.EVENT_EXTRA_DATA_CHANGED, machineId=data.id, key=key, value=value)

    def set_guest_property(self, data: MachineData, name: str, value: str, flags: str) -> None:
        with self.lock:
            if data.state not in ONLINE and "TRANS" in flags.upper():
                raise SimCOMError(
                    C.VBOX_E_INVALID_VM_STATE, "transient properties need a running machine"
                )
            if value:
                data.guest_props[name] = (value, time.time_ns(), flags)
            elif data.guest_props.pop(name, None) is None:
                return
        self.event_source.fire(
            C.EVENT_GUEST_PROPERTY_CHANGED,
            machineId=data.id,
            name=name,
            value=value,
            flags=flags,
            fWasDeleted=not value,
        )
        process = data.process
        if process is not None and data.state in ONLINE:
            process.guest_property(name, value)  # what a `guestproperty wait` in it sees

    # the VRDE server inside the VM process -------------------------------------------------

    def vrde_client(self, data: MachineData, address: str | None) -> None:
        """A remote-desktop client connected (address) or disconnected (None), as the VRDE
        server in the VM process sees it: VRDEServerInfo changes, an OnVRDEServerInfoChanged
        event on the console's event source, and the /VirtualBox/HostInfo/VRDP guest
        properties (whose changes reach IVirtualBox's event source)."""
        console = data.console
        if console is None:
            return
        info = console.VRDEServerInfo
        with self.lock:
            if address is not None:
                info.active, info.numberOfClients = True, info.numberOfClients + 1
                info.beginTime, info.endTime, info.clientIP = _now_ms(), 0, address
                info.clientName = f"client-{address}"
            else:
                info.active, info.endTime = False, _now_ms()
        console.eventSource.fire(C.EVENT_VRDE_SERVER_INFO_CHANGED)
        client = "/VirtualBox/HostInfo/VRDP/Client/1"
        if address is not None:
            self.set_guest_property(data, f"{client}/IPAddr", address, "RDONLYGUEST,TRANSIENT")
            self.set_guest_property(data, f"{client}/Name", info.clientName, "RDONLYGUEST")
            self.set_guest_property(
                data, "/VirtualBox/HostInfo/VRDP/ActiveClient", "1", "RDONLYGUEST,TRANSIENT"
            )
        else:
            self.set_guest_property(data, f"{client}/IPAddr", "", "")
            self.set_guest_property(data, f"{client}/Name", "", "")
            self.set_guest_property(data, "/VirtualBox/HostInfo/VRDP/ActiveClient", "0", "")

    def guest_users(self, data: MachineData, users: list[str] | None) -> None:
        """What VBoxService in the guest writes: users logged in (None = no agent yet)."""
        flags = "TRANSRESET,TRANSIENT"
        if users is None:
            return
        listed = ",".join(users)
        props = data.guest_props
        if props.get("/VirtualBox/GuestInfo/OS/LoggedInUsersList", ("",))[0] != listed or (
            "/VirtualBox/GuestInfo/OS/NoLoggedInUsers" not in props
        ):
            self.set_guest_property(
                data, "/VirtualBox/GuestInfo/OS/LoggedInUsersList", listed, flags
            )
            self.set_guest_property(
                data, "/VirtualBox/GuestInfo/OS/LoggedInUsers", str(len(users)), flags
            )
            self.set_guest_property(
                data,
                "/VirtualBox/GuestInfo/OS/NoLoggedInUsers",
                "false" if users else "true",
                flags,
            )


class Host_:
    """Which simulated host `vboxapi` talks to (one per test)."""

    def __init__(self) -> None:
        self._host: Host | None = None

    def use(self, host: Host | None) -> None:
        self._host = host

    def current(self) -> Host:
        if self._host is None:
            raise SimCOMError(C.E_FAIL, "no simulated VirtualBox host is running (VBoxSVC)")
        return self._host


HOSTS = Host_()


class VirtualBox:
    """IVirtualBox."""

    def __init__(self, host: Host) -> None:
        self._host = host

    @property
    def version(self) -> str:
        return self._host.version

    @property
    def versionNormalized(self) -> str:
        return self._host.version

    @property
    def revision(self) -> int:
        return self._host.revision

    @property
    def APIVersion(self) -> str:
        major, minor = self._host.version.split(".")[:2]
        return f"{major}_{minor}"

    @property
    def homeFolder(self) -> str:
        return str(self._host.home)

    @property
    def eventSource(self) -> EventSource:
        return self._host.event_source

    @property
    def machines(self) -> list[Machine]:
        with self._host.lock:
            return [Machine(d, mutable=False) for d in self._host.machines.values()]

    @property
    def machineGroups(self) -> list[str]:
        return sorted({g for d in self._host.machines.values() for g in d.groups})

    def getExtraData(self, key: str) -> str:
        return self._host.extra.get(key, "")

    def setExtraData(self, key: str, value: str) -> None:
        self._host.extra[key] = value

    def findMachine(self, nameOrId: str) -> Machine:
        with self._host.lock:
            for data in self._host.machines.values():
                if nameOrId in (data.id, data.name):
                    return Machine(data, mutable=False)
        raise SimCOMError(
            C.VBOX_E_OBJECT_NOT_FOUND, f"Could not find a registered machine named '{nameOrId}'"
        )

    def getMachinesByGroups(self, groups: list[str]) -> list[Machine]:
        with self._host.lock:
            return [
                Machine(d, mutable=False)
                for d in self._host.machines.values()
                if set(d.groups) & set(groups)
            ]

    def composeMachineFilename(
        self, name: str, group: str, createFlags: str, baseFolder: str
    ) -> str:
        base = Path(baseFolder) if baseFolder else self._host.home
        return str(base / group.strip("/") / name / f"{name}.vbox")

    def createMachine(self, settingsFile: str, name: str, *args: Any) -> Machine:
        major = int(self._host.version.split(".")[0])
        minor = int(self._host.version.split(".")[1])
        # 6.1: groups, osTypeId, flags; 7.0: + cipher, passwordId, password;
        # 7.1: platform architecture after name, then the 7.0 parameters
        expected = 3 if major < 7 else (6 if minor == 0 else 7)
        if len(args) != expected:
            raise TypeError(
                f"createMachine of VirtualBox {self._host.version} takes {expected + 2} "
                f"arguments, got {len(args) + 2}"
            )
        if expected == 7:
            args = args[1:]
        groups, os_type, flags = args[0], args[1], args[2]
        if not name:
            raise SimCOMError(C.E_INVALIDARG, "Invalid machine name: empty")
        for group in groups:
            if not str(group).startswith("/"):
                raise SimCOMError(C.E_INVALIDARG, f"Invalid machine group '{group}'")
        data = self._host._new_machine(name, list(groups), os_type)
        if settingsFile:
            data.settings_file = Path(settingsFile)
        if data.settings_file.exists() and "forceOverwrite=1" not in flags:
            raise SimCOMError(
                C.VBOX_E_FILE_ERROR, f"Machine settings file '{data.settings_file}' already exists"
            )
        for flag in flags.split(","):
            if flag.startswith("UUID="):
                data.id = flag[5:]
        return Machine(data, mutable=True)

    def registerMachine(self, machine: Machine) -> None:
        self._host._register(machine._d)

    def createAppliance(self) -> Appliance:
        return Appliance(self._host)

    def openMedium(self, location: str, deviceType: int, accessMode: int, forceNewUuid: bool):  # type: ignore[no-untyped-def]
        path = Path(location)
        if not path.is_file():
            raise SimCOMError(C.VBOX_E_FILE_ERROR, f"Could not find file for the medium '{path}'")
        return self._host.open_medium(path)


# -- OVF import ---------------------------------------------------------------------------------

DESC_NAME, DESC_CPU, DESC_MEMORY, DESC_DISK = 3, 12, 13, 18
_OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"


class VirtualSystemDescription:
    """IVirtualSystemDescription of one VirtualSystem in an OVF: name, CPUs, memory, disk."""

    def __init__(self, name: str, cpus: int, memory_mb: int, disk: Path) -> None:
        self._types = [DESC_NAME, DESC_CPU, DESC_MEMORY, DESC_DISK]
        self._ovf = [name, str(cpus), str(memory_mb), str(disk)]
        self._vbox = list(self._ovf)
        self._enabled = [True] * 4

    def getDescription(self) -> tuple[list[int], list[str], list[str], list[str], list[str]]:
        return (list(self._types), [""] * 4, list(self._ovf), list(self._vbox), [""] * 4)

    def setFinalValues(
        self, enabled: list[bool], vBoxValues: list[str], extraConfigValues: list[str]
    ) -> None:
        if not len(enabled) == len(vBoxValues) == len(extraConfigValues) == len(self._types):
            raise SimCOMError(C.E_INVALIDARG, "setFinalValues needs one value per description")
        self._enabled, self._vbox = list(enabled), list(vBoxValues)

    def getValuesByType(self, type: int, which: int) -> list[str]:
        values = self._ovf if which == 1 else self._vbox
        return [v for t, v in zip(self._types, values, strict=True) if t == int(type)]

    @property
    def count(self) -> int:
        return len(self._types)


class Appliance:
    """IAppliance: read an OVF (read/interpret), import its virtual systems as machines."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.path = ""
        self.virtualSystemDescriptions: list[VirtualSystemDescription] = []
        self.machines: list[str] = []
        self._parsed: list[VirtualSystemDescription] = []

    def read(self, file: str) -> Progress:
        self.path = file

        def work() -> None:
            import xml.etree.ElementTree as ET

            try:
                root = ET.parse(file).getroot()
            except (OSError, ET.ParseError) as exc:
                raise SimCOMError(C.VBOX_E_FILE_ERROR, f"Could not read OVF {file}: {exc}") from exc
            files = {f.get(f"{_OVF}id"): f.get(f"{_OVF}href") for f in root.iter(f"{_OVF}File")}
            disks = {
                d.get(f"{_OVF}diskId"): files.get(d.get(f"{_OVF}fileRef"))
                for d in root.iter(f"{_OVF}Disk")
            }
            for system in root.iter(f"{_OVF}VirtualSystem"):
                name = system.get(f"{_OVF}id") or "imported"
                href = next(iter(disks.values()), None)
                if href is None:
                    raise SimCOMError(C.VBOX_E_FILE_ERROR, f"OVF {file} has no disk")
                disk = Path(file).parent / href
                self._parsed.append(VirtualSystemDescription(name, 1, 128, disk))

        return Progress(f"Reading appliance {file}", work)

    def interpret(self) -> None:
        self.virtualSystemDescriptions = list(self._parsed)

    def getWarnings(self) -> list[str]:
        return []

    def importMachines(self, options: list[int]) -> Progress:
        if not self.virtualSystemDescriptions:
            raise SimCOMError(C.VBOX_E_INVALID_OBJECT_STATE, "interpret() the appliance first")

        def work() -> None:
            for vsd in self.virtualSystemDescriptions:
                name, cpus, memory, disk = vsd._vbox
                data = self._host._new_machine(name, ["/"], "Other_64")
                data.cpus, data.memory_mb = int(cpus), int(memory)
                data.settings_file.parent.mkdir(parents=True, exist_ok=True)
                target = data.settings_file.parent / f"{name}-disk001.qcow2"
                self._host._qemu_img("convert", "-q", "-O", "qcow2", disk, str(target))
                data.disk = self._host.open_medium(target)
                data.disk.machineIds.append(data.id)
                self._host._register(data)
                self.machines.append(data.id)

        return Progress(f"Importing appliance {self.path}", work)
