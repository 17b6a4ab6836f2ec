"""FakeHypervisor: an in-memory hypervisor that behaves like the real ones.

Stateful and honest: it keeps clones with their power state, display, session and "dirty"
disk; it raises the same typed errors the adapters raise for the same case (the contract
suite, tests/contract/hypervisor_suite.py, pins each one): CloneNotFoundError for a name no VM
has, NotOurCloneError for a VM imagepipe did not make or another pool's clone,
InvalidStateError for a power state that does not fit, BaseMissingError for a base that is
gone, DisplayInUseError for a display port another program or a running clone holds. It
delivers events through subscribe(). Test controls drive what a user or the guest would do:

    hv = FakeHypervisor(clock=lambda: now)
    hv.add_base(base)                       # a registered, powered-off base image
    hv.remove_base(base)                    # its files are gone
    hv.add_foreign("lab-3")                 # a VM with that name that imagepipe did not make
    hv.occupy(Endpoint("127.0.0.1", 5901))  # another program listens on that display port
    hv.boot_ticks = 2                       # a started clone is ready after two tick() calls
    hv.fail_next("create_clone", BusyError("locked"))
    hv.connect("lab-0", "10.0.0.7")         # a VNC client connects
    hv.login("lab-0", "alice"); hv.logout("lab-0", "alice")
    hv.power_off_inside("lab-0")            # the user shut the desktop down

FakeHosts is the same hypervisor spread over several hosts (the Hosts port): each clone
lives on the host its CloneSpec names, a host holds the versions uploaded to it, and a host
can be cut off and brought back:

    hv = FakeHosts(clock=..., host_names=("h1", "h2", "h3"))
    hv.cut("h2")       # its clones keep running (and can be used) but are not listed;
                       # every call about them fails as an unreachable host's would
    hv.reconnect("h2")
    hv.upload_calls = 2        # ensure_version is True on the 2nd call for a version
    hv.no_upload.add("h3")     # h3 never gets a version it lacks
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagepipe.errors import (
    BadInputError,
    BaseMissingError,
    BusyError,
    CloneNotFoundError,
    DisplayInUseError,
    HypervisorError,
    InvalidStateError,
    NotOurCloneError,
)
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneMode,
    CloneSpec,
    Endpoint,
    GuestSession,
    HostSpec,
    HostState,
    HostUpload,
    Power,
)
from imagepipe.pool.ports import EventKind, HypervisorEvent
from imagepipe.record import replace


@dataclass
class _Clone:
    spec: CloneSpec
    power: Power = Power.SHUTOFF
    boot_ticks_left: int = 0
    session: GuestSession = field(default_factory=GuestSession)
    dirty: bool = False  # changes since the base (a user's traces)


@dataclass
class _Subscription:
    owner: FakeHypervisor
    callback: Callable[[HypervisorEvent], None]
    open: bool = True

    def close(self) -> None:
        self.open = False
        self.owner._unsubscribe(self)


@dataclass
class FakeHypervisor:
    """Implements imagepipe.pool.ports.Hypervisor in memory."""

    clock: Callable[[], float] = field(default=lambda: 0.0)
    boot_ticks: int = 0  # tick() calls between start and ready; 0 = ready at once
    clones: dict[str, _Clone] = field(default_factory=dict)
    bases: dict[tuple[str, int], bool] = field(default_factory=dict)  # -> powered off
    calls: list[tuple[str, str]] = field(default_factory=list)  # (operation, clone name)
    foreign: dict[str, Power] = field(default_factory=dict)  # VMs imagepipe did not make
    occupied: set[Endpoint] = field(default_factory=set)  # ports other programs listen on
    never_ready: set[tuple[str, int]] = field(default_factory=set)  # broken versions' guests
    # running clones whose guest agent does not answer in time (a late reply on a loaded
    # host): list_clones reports their readiness unknown (ready=None), sessions() their
    # users unread
    late_agents: set[str] = field(default_factory=set)
    notices: list[tuple[str, str]] = field(default_factory=list)  # notify_users (clone, text)
    closed: bool = False
    _failures: dict[str, deque[HypervisorError]] = field(default_factory=lambda: defaultdict(deque))
    _blockers: dict[str, threading.Event] = field(default_factory=dict)
    _subs: list[_Subscription] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # ---- test controls ---------------------------------------------------------------

    def add_base(self, base: BaseImage, *, powered_off: bool = True) -> None:
        """Register a base image; clones can be made from it while it is powered off."""
        self.bases[(base.image, base.version)] = powered_off

    def remove_base(self, base: BaseImage) -> None:
        """The base image's files are deleted: no clone of that version can be made."""
        self.bases.pop((base.image, base.version), None)

    def add_foreign(self, name: str, power: Power = Power.SHUTOFF) -> None:
        """A VM named `name` that imagepipe did not make (no imagepipe metadata)."""
        self.foreign[name] = power

    def occupy(self, display: Endpoint) -> None:
        """Another program listens on this display port."""
        self.occupied.add(display)

    def release(self, display: Endpoint) -> None:
        self.occupied.discard(display)

    def fail_next(self, operation: str, error: HypervisorError, times: int = 1) -> None:
        """Make the next `times` calls of `operation` (e.g. "create_clone") raise `error`."""
        for _ in range(times):
            self._failures[operation].append(error)

    def block(self, operation: str) -> threading.Event:
        """Make `operation` wait until the returned event is set (for timeout tests)."""
        gate = threading.Event()
        self._blockers[operation] = gate
        return gate

    def tick(self) -> None:
        """Time passes inside the guests: booting clones get closer to ready."""
        with self._lock:
            for name, clone in self.clones.items():
                if clone.power is Power.RUNNING and clone.boot_ticks_left > 0:
                    clone.boot_ticks_left -= 1
                    if clone.boot_ticks_left == 0:
                        self._emit(EventKind.AGENT_CHANGED, name, detail="up")

    def connect(self, name: str, client: str) -> None:
        """A remote-desktop client connects to the clone's display."""
        with self._lock:
            clone = self._running(name)
            clone.session = replace(clone.session, client=client, connected_since=self.clock())
            clone.dirty = True
        self._emit(EventKind.SESSION_CONNECTED, name, client=client)

    def disconnect(self, name: str) -> None:
        """The remote-desktop client goes away (the user may still be logged in)."""
        with self._lock:
            clone = self._get(name)
            client = clone.session.client
            clone.session = replace(clone.session, client=None, connected_since=None)
        self._emit(EventKind.SESSION_DISCONNECTED, name, client=client)

    def login(self, name: str, user: str) -> None:
        with self._lock:
            clone = self._running(name)
            clone.session = replace(clone.session, users=(*clone.session.users, user))
            clone.dirty = True
        self._emit(EventKind.AGENT_CHANGED, name, detail=f"login {user}")

    def logout(self, name: str, user: str) -> None:
        with self._lock:
            clone = self._get(name)
            users = tuple(u for u in clone.session.users if u != user)
            clone.session = replace(clone.session, users=users)
        self._emit(EventKind.AGENT_CHANGED, name, detail=f"logout {user}")

    def power_off_inside(self, name: str) -> None:
        """The guest shuts itself down: every session ends."""
        with self._lock:
            clone = self._get(name)
            clone.power = Power.SHUTOFF
            clone.session = GuestSession()
        self._emit(EventKind.STATE_CHANGED, name, detail="shutoff")

    def remove_behind_our_back(self, name: str) -> None:
        """Someone deleted the clone with another tool."""
        with self._lock:
            self.clones.pop(name, None)

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)

    # ---- the Hypervisor port ---------------------------------------------------------

    def list_clones(self) -> list[CloneInfo]:
        self._enter("list_clones", "")
        with self._lock:
            return [self._info(c) for c in sorted(self.clones.values(), key=lambda c: c.spec.name)]

    def base_ready(self, base: BaseImage) -> bool:
        self._enter("base_ready", base.image)
        return self.bases.get((base.image, base.version), False)

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        self._enter("create_clone", spec.name)
        with self._lock:
            if spec.name in self.foreign:
                raise NotOurCloneError(_not_ours(spec.name))
            existing = self.clones.get(spec.name)
            if existing is not None:
                return self._existing_clone(existing, spec)
            key = (spec.base.image, spec.base.version)
            if key not in self.bases:
                raise BaseMissingError(
                    f"image {spec.base.image} v{spec.base.version} has no base disk in "
                    f"{spec.base.directory}: rebuild the version or retire it"
                )
            if not self.bases[key]:
                raise InvalidStateError(
                    f"base image {spec.base.image} v{spec.base.version} is running; "
                    "clones are made only from a powered-off base"
                )
            self._refuse_taken_display(spec.name, spec.display)
            clone = _Clone(spec=spec)
            self.clones[spec.name] = clone
            return self._info(clone)

    def _existing_clone(self, existing: _Clone, spec: CloneSpec) -> CloneInfo:
        """create_clone of a name that exists: fine when it is the same clone (libvirt's
        rules: another pool's clone is not ours; this pool's of another version conflicts)."""
        have = existing.spec
        if _same_identity(have, spec):
            return self._info(existing)
        if have.pool != spec.pool:
            raise NotOurCloneError(
                f"clone {spec.name} belongs to pool {have.pool}, not {spec.pool}; imagepipe "
                "leaves it alone: give the pools names that do not overlap"
            )
        raise InvalidStateError(
            f"clone {spec.name} already exists for {have.base.image} v{have.base.version} "
            f"(pool {have.pool}, slot {have.slot}); delete it before creating it for "
            f"{spec.base.image} v{spec.base.version}"
        )

    def _check_base_of(self, clone: _Clone) -> None:
        base = clone.spec.base
        if (base.image, base.version) not in self.bases:
            raise BaseMissingError(
                f"clone {clone.spec.name}: the base of {base.image} v{base.version} is gone "
                f"from {base.directory}; delete the clone (the pool makes it again from the "
                "current version) or restore the version's files"
            )

    def _refuse_taken_display(self, name: str, display: Endpoint) -> None:
        held = display in self.occupied or any(
            c.spec.display == display and c.power is not Power.SHUTOFF and c.spec.name != name
            for c in self.clones.values()
        )
        if held:
            raise DisplayInUseError(
                f"clone {name}: display port {display} is already in use by another program; "
                "stop it or give the pool a free display.port_range in its pool file"
            )

    def start(self, name: str) -> None:
        self._enter("start", name)
        with self._lock:
            clone = self._get(name)
            if clone.power is Power.RUNNING:
                return
            if clone.power is Power.SUSPENDED:
                raise InvalidStateError(
                    f"clone {name} is suspended; resume it instead of starting it"
                )
            if clone.spec.mode is CloneMode.LINKED:
                self._check_base_of(clone)
            self._refuse_taken_display(name, clone.spec.display)
            clone.power = Power.RUNNING
            clone.boot_ticks_left = self.boot_ticks
        self._emit(EventKind.STATE_CHANGED, name, detail="running")

    def stop(self, name: str, timeout: float) -> None:
        self._enter("stop", name)
        with self._lock:
            clone = self._get(name)
            if clone.power is Power.SHUTOFF:
                return
            clone.power = Power.SHUTOFF
            clone.session = GuestSession()
        self._emit(EventKind.STATE_CHANGED, name, detail="shutoff")

    def reset(self, name: str) -> None:
        self._enter("reset", name)
        with self._lock:
            clone = self._get(name)
            # like libvirt: power off, then a fresh disk from the base, then start
            clone.power = Power.SHUTOFF
            clone.session = GuestSession()
            self._check_base_of(clone)
            clone.dirty = False
            self._refuse_taken_display(name, clone.spec.display)
            clone.power = Power.RUNNING
            clone.boot_ticks_left = self.boot_ticks
        self._emit(EventKind.STATE_CHANGED, name, detail="reset")

    def suspend(self, name: str) -> None:
        self._enter("suspend", name)
        with self._lock:
            clone = self._get(name)
            if clone.power is Power.SUSPENDED:
                return
            if clone.power is not Power.RUNNING:
                raise InvalidStateError(f"{name} is {clone.power}; only a running clone suspends")
            clone.power = Power.SUSPENDED
        self._emit(EventKind.STATE_CHANGED, name, detail="suspended")

    def resume(self, name: str) -> None:
        self._enter("resume", name)
        with self._lock:
            clone = self._get(name)
            if clone.power is Power.RUNNING:
                return
            if clone.power is not Power.SUSPENDED:
                raise InvalidStateError(f"{name} is {clone.power}, not suspended; start it instead")
            clone.power = Power.RUNNING
        self._emit(EventKind.STATE_CHANGED, name, detail="running")

    def delete(self, name: str) -> None:
        self._enter("delete", name)
        with self._lock:
            if name in self.foreign:
                raise NotOurCloneError(_not_ours(name))
            if self.clones.pop(name, None) is None:
                return
        self._emit(EventKind.STATE_CHANGED, name, detail="deleted")

    def notify_users(self, name: str, text: str) -> None:
        """Show `text` inside the running clone (the deadline warning)."""
        self._enter("notify_users", name)
        with self._lock:
            self._running(name)
            self.notices.append((name, text))

    def display(self, name: str) -> Endpoint | None:
        self._enter("display", name)
        with self._lock:
            return self._get(name).spec.display

    def sessions(self, name: str) -> GuestSession:
        self._enter("sessions", name)
        with self._lock:
            clone = self._get(name)
            if clone.power is Power.SUSPENDED:
                # the display still holds its client; the paused guest's agent lists nobody
                return replace(clone.session, users=())
            if clone.power is not Power.RUNNING:
                return GuestSession()
            if name in self.late_agents:  # the agent's list of users comes too late
                return replace(clone.session, users=(), users_unread=True)
            return clone.session

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> _Subscription:
        sub = _Subscription(owner=self, callback=callback)
        with self._lock:
            self._subs.append(sub)
        return sub

    def close(self) -> None:
        with self._lock:
            for sub in list(self._subs):
                sub.open = False
            self._subs.clear()
            self.closed = True

    # ---- internals -------------------------------------------------------------------

    def _enter(self, operation: str, name: str) -> None:
        with self._lock:
            self.calls.append((operation, name))
            queue = self._failures.get(operation)
            error = queue.popleft() if queue else None
            gate = self._blockers.pop(operation, None)
        if gate is not None:
            gate.wait()
        if error is not None:
            raise error

    def _get(self, name: str) -> _Clone:
        clone = self.clones.get(name)
        if clone is None:
            if name in self.foreign:
                raise NotOurCloneError(_not_ours(name))
            raise CloneNotFoundError(f"clone {name} does not exist on this host")
        return clone

    def _running(self, name: str) -> _Clone:
        clone = self._get(name)
        if clone.power is not Power.RUNNING:
            raise InvalidStateError(f"{name} is {clone.power}; nobody can use it")
        return clone

    def _info(self, clone: _Clone) -> CloneInfo:
        spec = clone.spec
        running = clone.power is Power.RUNNING
        ready: bool | None = (
            running
            and clone.boot_ticks_left == 0
            and (spec.base.image, spec.base.version) not in self.never_ready
        )
        if running and spec.name in self.late_agents:
            ready = None
        return CloneInfo(
            name=spec.name,
            pool=spec.pool,
            slot=spec.slot,
            image=spec.base.image,
            version=spec.base.version,
            power=clone.power,
            display=spec.display,
            ready=ready,
            host=spec.host,
        )

    def _emit(
        self, kind: EventKind, name: str, *, client: str | None = None, detail: str = ""
    ) -> None:
        event = HypervisorEvent(
            kind=kind, clone=name, at=self.clock(), client=client, detail=detail
        )
        with self._lock:
            subs = [s for s in self._subs if s.open]
        for sub in subs:
            sub.callback(event)

    def _unsubscribe(self, sub: _Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def is_dirty(self, name: str) -> bool:
        """Whether the clone carries changes a user made since its last reset."""
        return self._get(name).dirty


UPLOAD_SIZE = 8 * 1024 * 1024  # bytes of a version, as FakeHosts reports an upload of it


@dataclass
class FakeHosts(FakeHypervisor):
    """FakeHypervisor over several hosts; also implements imagepipe.pool.ports.Hosts."""

    host_names: tuple[str, ...] = ("h1", "h2", "h3")
    upload_calls: int = 1  # ensure_version calls until an upload is done (1: at once)
    no_upload: set[str] = field(default_factory=set)  # hosts whose uploads never finish
    lost: dict[str, float] = field(default_factory=dict)  # cut-off host -> since
    held: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # host -> versions
    uploading: dict[tuple[str, str, int], int] = field(default_factory=dict)  # -> calls so far

    # ---- test controls ---------------------------------------------------------------

    def cut(self, host: str) -> None:
        """The host's link is cut: its clones run on, unseen."""
        self.lost[host] = self.clock()

    def reconnect(self, host: str) -> None:
        self.lost.pop(host, None)

    def on_host(self, host: str) -> list[str]:
        """The clones that exist on `host` (seen or not)."""
        return sorted(n for n, c in self.clones.items() if c.spec.host == host)

    # ---- pool.ports.HostList (a reload of hosts:) ---------------------------------------

    def set_hosts(self, hosts: Sequence[HostSpec]) -> None:
        self._enter("set_hosts", "")
        self.host_names = tuple(h.name for h in hosts)

    # ---- the Hosts port --------------------------------------------------------------

    def hosts(self) -> list[HostState]:
        self._enter("hosts", "")
        return [
            HostState(
                name=h,
                connected=h not in self.lost,
                since=self.lost.get(h),
                versions=tuple(sorted(self.held.get(h, set()))),
                upload=self._upload_on(h),
            )
            for h in self.host_names
        ]

    def _upload_on(self, host: str) -> HostUpload | None:
        """A version asked for and not held yet: 1 MiB sent per ensure_version call so far,
        of UPLOAD_SIZE (never all of it while not held)."""
        for (where, image, version), calls in self.uploading.items():
            if where == host and (image, version) not in self.held.get(host, set()):
                sent = min(calls * 1024 * 1024, UPLOAD_SIZE - 1)
                return HostUpload(image, version, sent, UPLOAD_SIZE, None)
        return None

    def ensure_version(self, host: str, base: BaseImage) -> bool:
        self._enter("ensure_version", host)
        self._reach(host)
        key = (base.image, base.version)
        if key in self.held.get(host, set()):
            return True
        calls = self.uploading.get((host, *key), 0) + 1
        self.uploading[(host, *key)] = calls
        if host in self.no_upload:
            return False
        if calls >= self.upload_calls:
            self.held.setdefault(host, set()).add(key)
            return True
        return False

    # ---- the Hypervisor port, per host -------------------------------------------------

    def list_clones(self) -> list[CloneInfo]:
        return [c for c in super().list_clones() if c.host not in self.lost]

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        if spec.host not in self.host_names:
            raise BadInputError(f"clone {spec.name}: no host {spec.host!r}")
        self._reach(spec.host)
        if (spec.base.image, spec.base.version) not in self.held.get(spec.host, set()):
            raise BaseMissingError(
                f"host {spec.host} holds no copy of {spec.base.image} v{spec.base.version}"
            )
        return super().create_clone(spec)

    def start(self, name: str) -> None:
        self._reach_clone(name)
        super().start(name)

    def stop(self, name: str, timeout: float) -> None:
        self._reach_clone(name)
        super().stop(name, timeout)

    def reset(self, name: str) -> None:
        self._reach_clone(name)
        super().reset(name)

    def suspend(self, name: str) -> None:
        self._reach_clone(name)
        super().suspend(name)

    def resume(self, name: str) -> None:
        self._reach_clone(name)
        super().resume(name)

    def delete(self, name: str) -> None:
        self._reach_clone(name)
        super().delete(name)

    def sessions(self, name: str) -> GuestSession:
        self._reach_clone(name)
        return super().sessions(name)

    def _reach(self, host: str) -> None:
        if host in self.lost:
            raise BusyError(f"host {host} cannot be reached (keepalive lost)")

    def _reach_clone(self, name: str) -> None:
        clone = self.clones.get(name)
        if clone is not None:
            self._reach(clone.spec.host)


def _not_ours(name: str) -> str:
    return (
        f"domain {name} exists but imagepipe did not make it; imagepipe leaves it alone: "
        "rename or remove it, or change the pool name"
    )


def _same_identity(a: CloneSpec, b: CloneSpec) -> bool:
    return (a.pool, a.slot, a.base.image, a.base.version) == (
        b.pool,
        b.slot,
        b.base.image,
        b.base.version,
    )


# ---- companions for keeper tests: a clock that never sleeps, a registry in memory --------


@dataclass
class FakeClock:
    """imagepipe.pool.executor.Clock: sleep() moves time forward instead of waiting."""

    time: float = 1_700_000_000.0
    slept: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        with self._lock:
            return self.time

    def monotonic(self) -> float:
        with self._lock:
            return self.time

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.time += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.time += seconds


@dataclass(frozen=True)
class FakeVersion:
    image: str
    version: int

    def base_image(self) -> BaseImage:
        return BaseImage(
            image=self.image,
            version=self.version,
            directory=Path("/var/lib/imagepipe/images") / self.image / f"v{self.version}",
            disk="disk.qcow2",
        )


@dataclass
class FakeImages:
    """The registry's resolve(): images with versions and channels, in memory."""

    channels: dict[tuple[str, str], int] = field(default_factory=dict)
    versions: dict[str, set[int]] = field(default_factory=dict)
    moves: list[tuple[str, str, int, str]] = field(default_factory=list)  # move_channel calls

    def publish(self, image: str, version: int, channel: str = "latest") -> BaseImage:
        self.versions.setdefault(image, set()).add(version)
        self.channels[(image, channel)] = version
        return FakeVersion(image, version).base_image()

    def resolve(self, image: str, ref: str | int | None = None) -> FakeVersion:
        known = self.versions.get(image)
        if not known:
            raise BadInputError(f"image {image!r} has no registered versions")
        if isinstance(ref, int):
            if ref not in known:
                raise BadInputError(f"{image} has no version {ref}")
            return FakeVersion(image, ref)
        channel = ref or "latest"
        if (image, channel) not in self.channels:
            raise BadInputError(f"{image} has no channel {channel!r}")
        return FakeVersion(image, self.channels[(image, channel)])

    # the Channels port (rollouts)
    def channel_version(self, image: str, channel: str) -> int | None:
        return self.channels.get((image, channel))

    def newest_version(self, image: str) -> int:
        known = self.versions.get(image)
        if not known:
            raise BadInputError(f"image {image!r} has no registered versions")
        return max(known)

    def move_channel(self, image: str, channel: str, version: int, by: str) -> None:
        self.resolve(image, version)
        self.channels[(image, channel)] = version
        self.moves.append((image, channel, version, by))
