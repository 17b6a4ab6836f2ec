"""The libvirt/QEMU hypervisor adapter: clones are domains `<pool>-<slot>` on qcow2 overlays.

    hv = LibvirtHypervisor("qemu:///system", state_dir=Path("/var/lib/imagepipe/libvirt"))

Each clone's pool, image, version and slot live in the domain's <metadata> (namespace
https://imagepipe.dev/xmlns/clone/1), so list_clones() rebuilds everything from the host.
Disks and the console/agent sockets live under state_dir. Sessions come from libvirt graphics
events and, after a restart, from QEMU's `query-vnc`; logged-in users from the guest agent.

Instant desktops (CloneSpec.start = restore): the first clone of an image version and machine
shape makes a warm parent (parents.py); the clone's disk is an overlay on the parent's
frozen disk and it starts by restoring its own copy of the parent's saved state
(state_dir/saves/<name>.save), then the guest agent is told the time and the clone's name.
A reset restores again onto a fresh overlay. Whenever that cannot be done, the clone boots.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagepipe.errors import (
    BaseMissingError,
    CloneNotFoundError,
    DisplayInUseError,
    EnvironmentMissingError,
    FatalHypervisorError,
    HypervisorError,
    HypervisorUnavailableError,
    InvalidStateError,
    NotOurCloneError,
)
from imagepipe.hypervisors.common import WarmKey, check_name, port_free, power_of
from imagepipe.hypervisors.libvirt.disks import disk_usable, make_clone_disk
from imagepipe.hypervisors.libvirt.domain_xml import (
    CloneMetadata,
    DomainFacts,
    DomainPlan,
    domain_xml,
    parse_domain,
    parse_guest_users,
    parse_vnc_clients,
)
from imagepipe.hypervisors.libvirt.errors import (
    ERR_AGENT_UNRESPONSIVE,
    ERR_NO_DOMAIN,
    ERR_OPERATION_INVALID,
    agent_late,
    connection_lost,
    error_of,
    translated,
)
from imagepipe.hypervisors.libvirt.events import EventHub, ensure_event_loop
from imagepipe.hypervisors.libvirt.notify import notify_command
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
from imagepipe.record import replace

if TYPE_CHECKING:  # warm parents are loaded when a desktop is made or restored, not to list
    from imagepipe.hypervisors.libvirt.parents import WarmParent, WarmParents
from imagepipe.pool.ports import HypervisorEvent, Subscription

log = logging.getLogger(__name__)

# virConnectCloseReason
_CLOSE_REASONS = {
    0: "a connection error",
    1: "end of file: libvirtd stopped or restarted",
    2: "keep-alive timeout: libvirtd does not answer",
    3: "closed by this process",
}
# virDomainState
STATE_RUNNING, STATE_BLOCKED, STATE_PAUSED, STATE_SHUTDOWN, STATE_SHUTOFF = 1, 2, 3, 4, 5
STATE_CRASHED, STATE_PMSUSPENDED = 6, 7
POWER = {  # virDomainState -> the port's Power
    STATE_RUNNING: Power.RUNNING,
    STATE_BLOCKED: Power.RUNNING,
    STATE_PAUSED: Power.SUSPENDED,
    STATE_PMSUSPENDED: Power.SUSPENDED,
    STATE_SHUTOFF: Power.SHUTOFF,
    STATE_CRASHED: Power.CRASHED,
}
AGENT_TIMEOUT = 2  # seconds libvirt waits for the guest agent (ping, users)
# seconds close() waits for libvirt to close a connection: libvirt 9.0's client can deadlock
# in virConnectClose when an event arrives during it (the event's domain takes the connection
# back from zero references and disposes it again inside the same call); seen once, hanging a
# process's exit for good
CLOSE_WAIT = 5.0
PREP_TIMEOUT = 5.0  # seconds a restored guest's agent may take to reconnect
# seconds a QEMU monitor command (query-vnc) may take: libvirt waits for QEMU's reply without
# a limit, so a stopped or wedged QEMU would hold the whole pass
MONITOR_TIMEOUT = 10.0
UNIX_PATH_MAX = 107


def import_libvirt() -> tuple[Any, Any]:
    """The libvirt and libvirt_qemu modules, or EnvironmentMissingError saying how to get
    them. Imported on use, so imagepipe runs without libvirt where it is not needed."""
    try:
        libvirt = importlib.import_module("libvirt")
        libvirt_qemu = importlib.import_module("libvirt_qemu")
    except ImportError as exc:
        raise EnvironmentMissingError(
            "libvirt-python is not installed: pip install 'imagepipe[libvirt]' (needs "
            "libvirt-dev and pkg-config; ./install.sh does it)"
        ) from exc
    # libvirt prints every error to stderr by default; ours are raised as typed errors
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    return libvirt, libvirt_qemu


def _ignore_libvirt_error(_opaque: Any, error: Any) -> None:
    """libvirt's error callback: errors reach us as exceptions, so only log at debug."""
    log.debug("libvirt reported an error", extra=fields(error=str(error)))


class LibvirtHypervisor:
    """imagepipe.pool.ports.Hypervisor on libvirt + QEMU (domain type qemu: TCG)."""

    # libvirt keep-alive (interval s, missed answers): a dead libvirtd is noticed after ~20 s
    KEEPALIVE = (5, 3)
    host_name = ""  # CloneInfo.host of its clones ("": the only host)

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._libvirt, self._libvirt_qemu = import_libvirt()
        self.uri = uri
        self.state_dir = Path(state_dir).absolute()
        self._clock = clock
        self._lock = threading.RLock()  # guards the connection
        self._hub = EventHub(clock)
        self._facts: dict[str, DomainFacts] = {}  # domain UUID -> parsed XML
        # clone -> the domain id its agent timeout was set for: one entry per clone, not one
        # per start (a set of (clone, id) grew by one at every reset for the keeper's life)
        self._agent_timeout_set: dict[str, int] = {}
        self._deregister: list[Callable[[], None]] = []  # one per event callback
        # when the connection was found lost (time.monotonic()); None while it works
        self._lost_at: float | None = None
        self._lost_lock = threading.Lock()
        self.monitor_timeout = MONITOR_TIMEOUT
        self._monitor_lock = threading.Lock()
        self._monitor_asks: dict[str, concurrent.futures.Future[str]] = {}  # clone -> its ask
        # set by a subclass's close() that gave up waiting for a hung open: when that open
        # returns, its connection is dropped
        self._closing = False
        ensure_event_loop(self._libvirt)
        self._conn: Any = None
        self._connect()
        self._warm_parents: WarmParents | None = None

    @property
    def _warm(self) -> WarmParents:
        """This host's warm parents, set up when a desktop first needs one."""
        if self._warm_parents is None:
            from imagepipe.hypervisors.libvirt.parents import WarmParents

            self._warm_parents = WarmParents(
                self._libvirt, self._libvirt_qemu, self._connection, self.state_dir
            )
        return self._warm_parents

    # -- connection and events ----------------------------------------------------------

    def _open(self) -> Any:
        """A new connection with keep-alive, the domain event callbacks and a close callback;
        libvirtError when libvirtd does not answer."""
        lv = self._libvirt
        conn = lv.open(self.uri)
        try:
            with contextlib.suppress(lv.libvirtError):
                conn.setKeepAlive(*self.KEEPALIVE)
            self._deregister = self._hub.register(lv, self._libvirt_qemu, conn)
            conn.registerCloseCallback(self._on_close, None)
        except lv.libvirtError:
            with contextlib.suppress(lv.libvirtError):
                conn.close()
            raise
        return conn

    def _connect(self) -> Any:
        """The first connection: EnvironmentMissingError when libvirtd does not answer."""
        lv = self._libvirt
        try:
            conn = self._open()
        except lv.libvirtError as exc:
            raise EnvironmentMissingError(
                f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}; start "
                "libvirtd (./install.sh or scripts/setup-host.sh does it) or set hypervisor.uri"
            ) from exc
        self._conn = conn
        return conn

    def _on_close(self, conn: Any, reason: int, _opaque: Any) -> None:
        """libvirt's close callback (its event loop thread, at once when libvirtd stops or
        restarts): the connection is gone; the next call reconnects."""
        if conn is self._conn:
            self._lost(_CLOSE_REASONS.get(reason, f"close reason {reason}"))

    def _lost(self, why: str) -> None:
        """Say once that the connection is lost, however many calls find it so."""
        with self._lost_lock:
            if self._lost_at is not None:
                return
            self._lost_at = time.monotonic()
        log.warning(
            "libvirt connection lost; desktops keep running, reconnecting on the next call",
            extra=fields(uri=self.uri, reason=why),
        )

    def _connection(self) -> Any:
        """The live connection; after a loss, a new one (HypervisorUnavailableError while
        libvirtd does not answer), with every event callback registered again, once."""
        with self._lock:
            conn = self._conn
            if conn is not None and self._lost_at is None:
                with contextlib.suppress(self._libvirt.libvirtError):
                    if conn.isAlive():
                        return conn
                self._lost("the connection does not answer")
            if conn is not None:
                self._conn = None
                self._drop(conn)
            conn = self._reconnect()
        self._hub.reconnected()  # events were missed while disconnected
        return conn

    def _reconnect(self) -> Any:
        lv = self._libvirt
        try:
            conn = self._open()
        except lv.libvirtError as exc:
            raise HypervisorUnavailableError(self._unanswered(exc.get_error_message())) from exc
        if self._closing:  # close() gave up waiting while libvirt hung in this open
            self._drop(conn)
            raise HypervisorUnavailableError(f"libvirt at {self.uri}: closed")
        self._conn = conn
        with self._lost_lock:
            lost_at, self._lost_at = self._lost_at, None
        self._agent_timeout_set.clear()
        log.info(
            "libvirt connection back; events subscribed again",
            extra=fields(
                uri=self.uri,
                down=round(time.monotonic() - lost_at, 1) if lost_at is not None else None,
            ),
        )
        return conn

    def _unanswered(self, why: str) -> str:
        return (
            f"libvirt at {self.uri} does not answer ({why}); desktops keep running and the "
            "keeper reconnects every pass: start libvirtd (scripts/libvirtd.sh start, or "
            "systemctl start libvirtd)"
        )

    def _drop(self, conn: Any) -> None:
        """Let go of a connection: its callbacks are unregistered, it is closed (errors of a
        connection that is already dead are ignored)."""
        lv = self._libvirt
        with contextlib.suppress(lv.libvirtError):
            conn.unregisterCloseCallback()
        for deregister in self._deregister:
            with contextlib.suppress(lv.libvirtError):
                deregister()
        self._deregister = []

        def close() -> None:
            with contextlib.suppress(lv.libvirtError):
                conn.close()

        closing = threading.Thread(target=close, name="libvirt-close", daemon=True)
        closing.start()
        closing.join(CLOSE_WAIT)
        if closing.is_alive():
            log.warning(
                "a libvirt connection did not close in time; it is left to the process's exit",
                extra=fields(uri=self.uri, waited=CLOSE_WAIT),
            )

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> Subscription:
        return self._hub.subscribe(callback)

    def close(self) -> None:
        self._hub.close()
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                self._drop(conn)

    def _domain_plan(
        self, spec: CloneSpec, meta: CloneMetadata, kernel: Path | None, initrd: Path | None
    ) -> DomainPlan:
        """The domain a clone of `spec` is defined as, on this host's paths."""
        return DomainPlan(
            name=spec.name,
            metadata=meta,
            memory_kib=max(spec.memory // 1024, 65536),
            cpus=spec.cpus,
            disk=self.disk_path(spec.name),
            kernel=kernel,
            initrd=initrd,
            cmdline=spec.base.cmdline,
            display=spec.display,
            console_socket=self.console_path(spec.name),
            agent_socket=self.agent_path(spec.name),
        )

    # -- helpers -------------------------------------------------------------------------

    def _translate(self, subject: str) -> contextlib.AbstractContextManager[None]:
        return translated(self._libvirt, subject)

    def _domain(self, name: str) -> Any:
        check_name(name)
        with self._translate(f"clone {name}"):
            return self._connection().lookupByName(name)

    def _facts_of(self, dom: Any) -> DomainFacts:
        uuid = dom.UUIDString()
        facts = self._facts.get(uuid)
        if facts is None:
            with self._translate(f"clone {dom.name()}"):
                facts = parse_domain(dom.XMLDesc(0))
            self._facts[uuid] = facts
        if facts.metadata is not None:
            self._hub.adopt(facts.name)
        return facts

    def _our_domain(self, name: str) -> tuple[Any, CloneMetadata]:
        """The domain and its metadata; CloneNotFoundError when no domain has that name,
        NotOurCloneError when one has but imagepipe did not make it (it is left alone)."""
        dom = self._domain(name)
        meta = self._facts_of(dom).metadata
        if meta is None:
            raise NotOurCloneError(_not_ours(name))
        return dom, meta

    def _state(self, dom: Any, name: str) -> int:
        with self._translate(f"clone {name}"):
            return int(dom.state()[0])

    def disk_path(self, name: str) -> Path:
        return self.state_dir / "disks" / f"{check_name(name)}.qcow2"

    def console_path(self, name: str) -> Path:
        """Unix socket of the clone's serial console (for tests and the demo)."""
        return self.state_dir / "sockets" / f"{check_name(name)}.console"

    def agent_path(self, name: str) -> Path:
        return self.state_dir / "sockets" / f"{check_name(name)}.agent"

    def saved_state_path(self, name: str) -> Path:
        """The clone's own copy of its warm parent's saved state (instant desktops)."""
        return self.state_dir / "saves" / f"{check_name(name)}.save"

    def _pristine_path(self, name: str) -> Path:
        """Present while the clone's disk is a fresh overlay on its warm parent's disk that no
        guest has run on: only then may the parent's memory be restored onto it."""
        return self.state_dir / "saves" / f"{check_name(name)}.pristine"

    def _info(
        self, name: str, meta: CloneMetadata, state: int, facts: DomainFacts, dom: Any
    ) -> CloneInfo:
        power = power_of(state, POWER)
        ready = power is Power.RUNNING and self._agent_ready(name, dom)
        started_by = None
        if power in (Power.RUNNING, Power.SUSPENDED):
            started_by = StartMode.RESTORE if facts.restored else StartMode.BOOT
        return CloneInfo(
            name=name,
            pool=meta.pool,
            slot=meta.slot,
            image=meta.image,
            version=meta.version,
            power=power,
            display=facts.display,
            ready=ready,
            started_by=started_by,
            host=self.host_name,
        )

    def _prepare_agent(self, name: str, dom: Any) -> None:
        """Give libvirt a short guest agent timeout (its default is to wait forever)."""
        domain_id = int(dom.ID())
        if self._agent_timeout_set.get(name) == domain_id:
            return
        dom.agentSetResponseTimeout(AGENT_TIMEOUT)
        self._agent_timeout_set[name] = domain_id

    def _agent_ready(self, name: str, dom: Any) -> bool | None:
        """From agent lifecycle events; when none was seen (a restart, a `status` process),
        ask with guest-ping: True when it answers, False when libvirt says the agent is not
        connected, the domain is not running or it answers with an error, None (unknown)
        when the reply did not come in AGENT_TIMEOUT s (errors.agent_late)."""
        known = self._hub.agent_up(name)
        if known is not None:
            return known
        try:
            self._prepare_agent(name, dom)
            self._libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', AGENT_TIMEOUT, 0)
        except self._libvirt.libvirtError as exc:
            if connection_lost(exc):  # libvirtd is gone, not the agent
                raise error_of(exc, f"clone {name}") from exc
            if not agent_late(exc.get_error_code() or 0, exc.get_error_message() or ""):
                return False  # no agent (not connected, not running) or an error reply
            log.debug(
                "guest agent did not answer in time; readiness unknown",
                extra=fields(clone=name, error=exc.get_error_message()),
            )
            return None
        self._hub.set_agent_up(name, True)
        return True

    def _refuse_busy_port(self, name: str, display: Endpoint | None) -> None:
        if display is not None and not port_free(display):
            raise DisplayInUseError(
                f"clone {name}: display port {display} is already in use by another program; "
                "stop it or give the pool a free display.port_range in its pool file"
            )

    def _make_disk(self, name: str, meta: CloneMetadata, parent: WarmParent | None = None) -> None:
        """A fresh clone disk from the base, or from the warm parent's frozen disk (then the
        clone is pristine: its parent's memory may be restored onto it); BaseMissingError
        when the base disk is gone."""
        if not meta.base_disk.is_file():
            raise BaseMissingError(_base_gone(name, meta))
        pristine = self._pristine_path(name)
        pristine.unlink(missing_ok=True)
        try:
            make_clone_disk(
                parent.disk if parent else meta.base_disk, self.disk_path(name), meta.mode
            )
        except CloneNotFoundError as exc:  # removed between the check and qemu-img
            raise BaseMissingError(_base_gone(name, meta)) from exc
        if parent is not None:
            pristine.parent.mkdir(parents=True, exist_ok=True)
            pristine.touch()

    # -- instant desktops ------------------------------------------------------------------

    def _host_versions(self) -> tuple[int, int]:
        conn = self._connection()
        with self._translate(f"libvirt at {self.uri}"):
            return int(conn.getLibVersion()), int(conn.getVersion())

    def _warm_key(self, spec: CloneSpec, memory_kib: int, files: list[Path]) -> WarmKey:
        from imagepipe.hypervisors.libvirt.warm import FileStamp, warm_key

        libvirt_version, qemu_version = self._host_versions()
        stamps = []
        for path in files:
            stat = path.stat()
            stamps.append(FileStamp(path, stat.st_size, stat.st_mtime_ns))
        return warm_key(
            image=spec.base.image,
            version=spec.base.version,
            cpus=spec.cpus,
            memory_kib=memory_kib,
            files=stamps,
            cmdline=spec.base.cmdline,
            libvirt_version=libvirt_version,
            qemu_version=qemu_version,
        )

    def _parent_of(self, dom: Any, name: str, meta: CloneMetadata) -> WarmParent | None:
        from imagepipe.hypervisors.libvirt.warm import fitting_parent

        """The warm parent a clone restores from, when it (still) fits this host; the clone's
        own saved state is written now when the parent was made after the clone."""
        parent = fitting_parent(meta, self._warm.load, self._host_versions, self._warm.say_once)
        if parent is None:
            return None
        if not _newer(self.saved_state_path(name), parent.memory):  # none, or an older parent's
            display = self._facts_of(dom).display
            if display is None:
                return None
            self._write_saved_state(dom, name, meta, parent, display)
        return parent if self.saved_state_path(name).is_file() else None

    def _write_saved_state(
        self, dom: Any, name: str, meta: CloneMetadata, parent: WarmParent, display: Endpoint
    ) -> None:
        from imagepipe.hypervisors.libvirt.warm import RestoreIdentity

        who = RestoreIdentity(
            name=name,
            uuid=dom.UUIDString(),
            metadata=meta,
            disk=self.disk_path(name),
            console_socket=self.console_path(name),
            agent_socket=self.agent_path(name),
            display=display,
        )
        try:
            self._warm.write_clone_state(parent, who, self.saved_state_path(name))
        except (HypervisorError, OSError) as exc:
            self.saved_state_path(name).unlink(missing_ok=True)
            self._warm.say_once(
                f"state:{parent.key.name}",
                f"cannot write the saved state of {name} from the warm parent of "
                f"{meta.image} v{meta.version}; desktops boot instead: {exc}",
            )

    def _restore(self, dom: Any, name: str, meta: CloneMetadata) -> bool:
        """Restore the clone from its saved state; False (said once in the log) when libvirt
        refuses, and the caller boots it."""
        started = time.monotonic()
        if not self._restore_from(dom, name, meta, self.saved_state_path(name)):
            return False
        self._pristine_path(name).unlink(missing_ok=True)
        self._restored(dom, name, meta, started)
        return True

    def _restore_from(self, dom: Any, name: str, meta: CloneMetadata, state: Path) -> bool:
        """libvirt restores the clone from the saved state at `state` (a path libvirtd reads);
        False (said once in the log, the domain left shut off) when it refuses."""
        lv = self._libvirt
        try:
            self._connection().restoreFlags(str(state), None, lv.VIR_DOMAIN_SAVE_RUNNING)
        except lv.libvirtError as exc:
            if connection_lost(exc):  # not the saved state's fault: retried
                raise error_of(exc, f"clone {name}") from exc
            self._warm.say_once(
                f"restore:{meta.warm}",
                f"restoring {name} from the warm parent of {meta.image} v{meta.version} "
                f"failed; its desktops boot instead: {exc.get_error_message()}",
            )
            if self._state(dom, name) != STATE_SHUTOFF:
                self._destroy(dom, name)
            return False
        self._facts.pop(dom.UUIDString(), None)
        return True

    def _restored(self, dom: Any, name: str, meta: CloneMetadata, started: float) -> None:
        self._clone_prep(dom, name)
        log.info(
            "clone restored",
            extra=fields(
                pool=meta.pool,
                clone=name,
                action="restore",
                host=self.host_name or None,
                seconds=round(time.monotonic() - started, 2),
            ),
        )

    def _clone_prep(self, dom: Any, name: str) -> None:
        """Tell the restored guest the time (it wakes at the parent's) and its name. libvirt
        reconnects to the guest agent just after a restore: wait a little for it."""
        lv = self._libvirt
        command = {"execute": "imagepipe-set-identity", "arguments": {"hostname": name}}
        deadline = time.monotonic() + PREP_TIMEOUT
        while True:
            try:
                self._prepare_agent(name, dom)
                now = time.time()
                dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
                self._libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), AGENT_TIMEOUT, 0)
                return
            except lv.libvirtError as exc:
                if exc.get_error_code() == ERR_AGENT_UNRESPONSIVE and time.monotonic() < deadline:
                    self._hub.wait_for_change(0.05)
                    continue
                self._warm.say_once(
                    "prep",
                    f"a restored guest did not take the time and its name ({name}): "
                    f"{exc.get_error_message()}",
                )
                return

    # -- the port ------------------------------------------------------------------------

    def list_clones(self) -> list[CloneInfo]:
        conn = self._connection()
        with self._translate(f"libvirt at {self.uri}"):
            stats = conn.getAllDomainStats(self._libvirt.VIR_DOMAIN_STATS_STATE, 0)
        clones: list[CloneInfo] = []
        for dom, values in stats:
            try:
                facts = self._facts_of(dom)
            except CloneNotFoundError:
                continue  # undefined between the two calls
            if facts.metadata is None:
                continue
            state = int(values.get("state.state", 0))
            clones.append(self._info(facts.name, facts.metadata, state, facts, dom))
        live = {dom.UUIDString() for dom, _ in stats}
        for uuid in set(self._facts) - live:
            del self._facts[uuid]
        return sorted(clones, key=lambda c: (c.pool, c.slot))

    def base_ready(self, base: BaseImage) -> bool:
        if base.disk is None or (base.vm is not None and self._base_domain_runs(base.vm)):
            return False
        for extra in (base.kernel, base.initrd):
            if extra is not None and not (base.directory / extra).is_file():
                return False
        return disk_usable(base.directory / base.disk)

    def _base_domain_runs(self, name: str) -> bool:
        """A version imported from a domain (importer.py) is not ready while it runs."""
        try:
            with self._translate(f"domain {name}"):
                return int(self._connection().lookupByName(name).state()[0]) != STATE_SHUTOFF
        except CloneNotFoundError:
            return False

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        name = check_name(spec.name)
        if spec.base.disk is None:
            raise FatalHypervisorError(
                f"image {spec.base.image} v{spec.base.version} has no disk for libvirt; "
                "its image.yml must name artifact.disk"
            )
        base_disk = (spec.base.directory / spec.base.disk).absolute()
        meta = CloneMetadata(
            spec.pool,
            spec.base.image,
            spec.base.version,
            spec.slot,
            spec.mode,
            base_disk,
            start=spec.start,
        )
        existing = self._existing(name)
        if existing is not None:
            return self._existing_clone(name, meta, *existing)
        if not base_disk.is_file():
            raise BaseMissingError(
                f"image {spec.base.image} v{spec.base.version} has no base disk {base_disk}: "
                "rebuild the version (imagepipe build) or retire it"
            )
        if not disk_usable(base_disk):
            raise InvalidStateError(
                f"base image {spec.base.image} v{spec.base.version} is running or incomplete "
                f"({base_disk} is locked by a VM or not a disk image); clones are made only "
                "from a powered-off base: wait for the build or stop the base VM"
            )
        for path in (self.console_path(name), self.agent_path(name)):
            if len(str(path)) > UNIX_PATH_MAX:
                raise FatalHypervisorError(
                    f"state_dir {self.state_dir} is too long for unix sockets ({path}); "
                    "use a shorter directory"
                )
        kernel = self._base_file(spec.base, spec.base.kernel)
        initrd = self._base_file(spec.base, spec.base.initrd)
        self._refuse_busy_port(name, spec.display)
        self.console_path(name).parent.mkdir(parents=True, exist_ok=True)
        plan = self._domain_plan(spec, meta, kernel, initrd)
        parent = None
        if spec.start is StartMode.RESTORE:
            files = [base_disk, *(f for f in (kernel, initrd) if f is not None)]
            key = self._warm_key(spec, plan.memory_kib, files)
            parent = self._warm.ensure(key, domain_xml(plan), base_disk)
            # the key even without a parent: a reset restores once a later create made it
            meta = replace(meta, warm=key.name)
            plan = replace(plan, metadata=meta)
        self._make_disk(name, meta, parent)
        with self._translate(f"clone {name}"):
            dom = self._connection().defineXML(domain_xml(plan))
        if parent is not None:
            self._write_saved_state(dom, name, meta, parent, spec.display)
        facts = self._facts_of(dom)
        log.info("clone created", extra=fields(pool=spec.pool, clone=name, action="create"))
        return self._info(name, meta, STATE_SHUTOFF, facts, dom)

    def _existing(self, name: str) -> tuple[Any, DomainFacts] | None:
        try:
            dom = self._domain(name)
        except CloneNotFoundError:
            return None
        return dom, self._facts_of(dom)

    def _existing_clone(
        self, name: str, meta: CloneMetadata, dom: Any, facts: DomainFacts
    ) -> CloneInfo:
        """create_clone of a clone that exists: fine when it is the same clone, else refused."""
        have = facts.metadata
        if have is None:
            raise NotOurCloneError(_not_ours(name))
        if have.pool != meta.pool:
            raise NotOurCloneError(
                f"clone {name} belongs to pool {have.pool}, not {meta.pool}; imagepipe "
                "leaves it alone: give the pools names that do not overlap"
            )
        if (have.image, have.version, have.slot) != (meta.image, meta.version, meta.slot):
            raise InvalidStateError(
                f"clone {name} already exists for {have.image} v{have.version} (pool "
                f"{have.pool}, slot {have.slot}); delete it before creating it for "
                f"{meta.image} v{meta.version}"
            )
        return self._info(name, have, self._state(dom, name), facts, dom)

    def _base_file(self, base: BaseImage, file: str | None) -> Path | None:
        if file is None:
            return None
        path = (base.directory / file).absolute()
        if not path.is_file():
            raise BaseMissingError(
                f"image {base.image} v{base.version} is missing {path}: rebuild the version "
                "(imagepipe build) or retire it"
            )
        return path

    def start(self, name: str) -> None:
        dom, meta = self._our_domain(name)
        state = self._state(dom, name)
        if state in (STATE_RUNNING, STATE_BLOCKED):
            return
        if state in (STATE_PAUSED, STATE_PMSUSPENDED):
            raise InvalidStateError(f"clone {name} is suspended; resume it instead of starting it")
        if not self.disk_path(name).exists():
            self._make_disk(name, meta)
        elif meta.mode is CloneMode.LINKED and not meta.base_disk.is_file():
            raise BaseMissingError(_base_gone(name, meta))
        self._refuse_busy_port(name, self._facts_of(dom).display)
        if self._pristine_path(name).exists():
            if self._parent_of(dom, name, meta) is not None and self._restore(dom, name, meta):
                return
            self._make_disk(name, meta)  # the parent's disk without its memory: boot the base
        self._facts.pop(dom.UUIDString(), None)
        with self._translate(f"clone {name}"):
            dom.create()
        log.info("clone started", extra=fields(pool=meta.pool, clone=name, action="start"))

    def stop(self, name: str, timeout: float) -> None:
        dom, meta = self._our_domain(name)
        state = self._state(dom, name)
        if state == STATE_SHUTOFF:
            return
        lv = self._libvirt
        if state in (STATE_RUNNING, STATE_BLOCKED):
            # the guest agent when it answers, else the ACPI power button
            agent = self._agent_ready(name, dom) is True  # unknown: the power button
            try:
                if agent:
                    self._prepare_agent(name, dom)
                dom.shutdownFlags(
                    lv.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                    if agent
                    else lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
                )
            except lv.libvirtError as exc:
                if connection_lost(exc):
                    raise error_of(exc, f"clone {name}") from exc
                log.info(
                    "graceful shutdown refused; powering off",
                    extra=fields(clone=name, error=exc.get_error_message()),
                )
        if not self._wait_shutoff(dom, name, timeout if state != STATE_PAUSED else 0.0):
            self._destroy(dom, name)
        self._facts.pop(dom.UUIDString(), None)
        log.info("clone stopped", extra=fields(pool=meta.pool, clone=name, action="stop"))

    def _wait_shutoff(self, dom: Any, name: str, timeout: float) -> bool:
        """Wait for the power-off (woken by lifecycle events); False after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self._state(dom, name) != STATE_SHUTOFF:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._hub.wait_for_change(min(left, 0.5))
        return True

    def _destroy(self, dom: Any, name: str) -> None:
        try:
            dom.destroy()
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() == ERR_OPERATION_INVALID:  # already shut off
                return
            raise error_of(exc, f"clone {name}") from exc

    def reset(self, name: str) -> None:
        dom, meta = self._our_domain(name)
        if self._state(dom, name) != STATE_SHUTOFF:
            self._destroy(dom, name)
        self._make_disk(name, meta, self._parent_of(dom, name, meta))
        self._hub.forget(name)
        self.start(name)
        log.info("clone reset", extra=fields(pool=meta.pool, clone=name, action="reset"))

    def suspend(self, name: str) -> None:
        dom, _ = self._our_domain(name)
        state = self._state(dom, name)
        if state == STATE_PAUSED:
            return
        if state not in (STATE_RUNNING, STATE_BLOCKED):
            raise InvalidStateError(f"clone {name} is not running, so it cannot be suspended")
        with self._translate(f"clone {name}"):
            dom.suspend()

    def resume(self, name: str) -> None:
        dom, _ = self._our_domain(name)
        state = self._state(dom, name)
        if state in (STATE_RUNNING, STATE_BLOCKED):
            return
        if state != STATE_PAUSED:
            raise InvalidStateError(f"clone {name} is not suspended, so it cannot be resumed")
        with self._translate(f"clone {name}"):
            dom.resume()

    def delete(self, name: str) -> None:
        self._undefine_ours(name)
        for path in (
            self.disk_path(name),
            self.console_path(name),
            self.agent_path(name),
            self.saved_state_path(name),
            self._pristine_path(name),
        ):
            path.unlink(missing_ok=True)
        self._hub.forget(name, disown=True)
        log.info("clone deleted", extra=fields(clone=name, action="delete"))

    def _undefine_ours(self, name: str) -> None:
        """Power off and undefine the clone's domain, if there is one; NotOurCloneError for
        a domain imagepipe did not make. Its disks are the caller's to remove."""
        check_name(name)
        existing = self._existing(name)
        if existing is None:
            return
        dom, facts = existing
        if facts.metadata is None:
            raise NotOurCloneError(_not_ours(name))
        if self._state(dom, name) != STATE_SHUTOFF:
            self._destroy(dom, name)
        lv = self._libvirt
        flags = (
            lv.VIR_DOMAIN_UNDEFINE_NVRAM
            | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        try:
            dom.undefineFlags(flags)
        except lv.libvirtError as exc:
            if exc.get_error_code() != ERR_NO_DOMAIN:
                raise error_of(exc, f"clone {name}") from exc

    def display(self, name: str) -> Endpoint | None:
        dom, _ = self._our_domain(name)
        return self._facts_of(dom).display

    def sessions(self, name: str) -> GuestSession:
        dom, _ = self._our_domain(name)
        state = self._state(dom, name)
        if state not in (STATE_RUNNING, STATE_BLOCKED, STATE_PAUSED):
            return GuestSession()
        clients = self._vnc_clients(dom, name)
        users = self._users(dom, name) if state != STATE_PAUSED else ()
        first, since = self._hub.vnc_clients_now(name, clients)
        return GuestSession(
            client=first, connected_since=since, users=users or (), users_unread=users is None
        )

    def notify_users(self, name: str, text: str) -> None:
        """Show `text` inside the running desktop (the guest agent's imagepipe-notify)."""
        dom, _ = self._our_domain(name)
        if self._state(dom, name) != STATE_RUNNING:
            raise InvalidStateError(f"clone {name} is not running: nobody can see a message")
        with self._translate(f"clone {name}"):
            self._prepare_agent(name, dom)
            self._libvirt_qemu.qemuAgentCommand(dom, notify_command(text), AGENT_TIMEOUT, 0)

    def _vnc_clients(self, dom: Any, name: str) -> tuple[str, ...]:
        """The VNC clients QEMU has, asked in a thread of its own and waited for at most
        MONITOR_TIMEOUT: a QEMU that does not answer (stopped, wedged) fails this read (the
        pool is not planned this pass: nothing is decided on a session not read) instead of
        holding the pass. While that question is still unanswered, the next read of the
        same clone fails at once rather than asking again."""
        with self._monitor_lock:
            asked = self._monitor_asks.get(name)
            if asked is None or asked.done():
                asked = self._monitor_asks[name] = concurrent.futures.Future()
                thread = threading.Thread(
                    target=self._ask_monitor,
                    args=(asked, dom, name),
                    name=f"query-vnc-{name}",
                    daemon=True,
                )
                thread.start()
        try:
            reply = asked.result(timeout=self.monitor_timeout)
        except concurrent.futures.TimeoutError:
            raise HypervisorError(
                f"clone {name}: QEMU did not answer query-vnc within {self.monitor_timeout:g} s "
                "(stopped or wedged?); its pool is not planned until it answers"
            ) from None
        finally:
            with self._monitor_lock:
                if asked.done() and self._monitor_asks.get(name) is asked:
                    del self._monitor_asks[name]
        return parse_vnc_clients(reply)

    def _ask_monitor(self, asked: concurrent.futures.Future[str], dom: Any, name: str) -> None:
        try:
            with self._translate(f"clone {name}"):
                reply = self._libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-vnc"}', 0)
            asked.set_result(str(reply))
        except BaseException as exc:  # handed to whoever waits on the answer
            asked.set_exception(exc)

    def _users(self, dom: Any, name: str) -> tuple[str, ...] | None:
        """Users logged in, from the guest agent; no agent means no users, not an error.
        None: the agent's reply did not come in time (who is logged in is unknown)."""
        lv = self._libvirt
        try:
            self._prepare_agent(name, dom)
            info = dom.guestInfo(lv.VIR_DOMAIN_GUEST_INFO_USERS, 0)
        except lv.libvirtError as exc:
            if connection_lost(exc):  # libvirtd is gone: nobody can say who is logged in
                raise error_of(exc, f"clone {name}") from exc
            log.debug(
                "guest agent did not list users",
                extra=fields(clone=name, error=exc.get_error_message()),
            )
            if agent_late(exc.get_error_code() or 0, exc.get_error_message() or ""):
                return None
            return ()
        return parse_guest_users(dict(info))


def _newer(path: Path, than: Path) -> bool:
    """`path` exists and was written after `than` (False when either is missing)."""
    try:
        return path.stat().st_mtime_ns > than.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _not_ours(name: str) -> str:
    return (
        f"domain {name} exists but imagepipe did not make it; imagepipe leaves it alone: "
        "rename or remove it, or change the pool name"
    )


def _base_gone(name: str, meta: CloneMetadata) -> str:
    return (
        f"clone {name}: the base disk of {meta.image} v{meta.version} is gone "
        f"({meta.base_disk}); delete the clone (the pool makes it again from the current "
        "version) or restore the version's files"
    )
