"""libvirt's event loop thread, and the translation of its callbacks into HypervisorEvents.

libvirt delivers domain events only to a process that registered an event loop implementation
before opening the connection; one daemon thread runs it for the whole process.

VNC clients are followed through QEMU's own VNC_CONNECTED / VNC_INITIALIZED /
VNC_DISCONNECTED monitor events (libvirt_qemu's monitor event API), not libvirt's graphics
event: libvirt-python's graphics callback never releases the local and remote address dicts
and the subject list it builds (libvirt-override.c,
libvirt_virConnectDomainEventGraphicsCallback, up to 12.8 at least), so a keeper subscribed to
it grew about 1 KiB per VNC event for as long as it ran (benchmarks/bench_soak_real.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from imagepipe.hypervisors.libvirt.domain_xml import format_address
from imagepipe.log import fields
from imagepipe.pool.ports import EventKind, HypervisorEvent

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_started = False

# libvirt's enum values (stable ABI): virDomainEventType and virDomainEventGraphicsPhase
LIFECYCLE_NAMES = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)
EVENT_STARTED = 2
EVENT_STOPPED = 5
EVENT_CRASHED = 8
GRAPHICS_CONNECT = 0
GRAPHICS_INITIALIZE = 1
GRAPHICS_DISCONNECT = 2
AGENT_CONNECTED = 1
# QEMU's VNC monitor events, as graphics phases
VNC_EVENTS = "^VNC_(CONNECTED|INITIALIZED|DISCONNECTED)$"
VNC_PHASES = {
    "VNC_CONNECTED": GRAPHICS_CONNECT,
    "VNC_INITIALIZED": GRAPHICS_INITIALIZE,
    "VNC_DISCONNECTED": GRAPHICS_DISCONNECT,
}


def ensure_event_loop(libvirt: Any) -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # a failing iteration must not end event delivery
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def lifecycle_event(clone: str, event: int, detail: int, at: float) -> HypervisorEvent:
    name = LIFECYCLE_NAMES[event] if 0 <= event < len(LIFECYCLE_NAMES) else f"event-{event}"
    return HypervisorEvent(EventKind.STATE_CHANGED, clone, at, detail=f"{name}/{detail}")


def graphics_event(clone: str, phase: int, remote: Any, at: float) -> HypervisorEvent | None:
    """SESSION_CONNECTED on connect and initialize, SESSION_DISCONNECTED on disconnect."""
    client = None
    if isinstance(remote, dict) and remote.get("node"):
        client = format_address(str(remote["node"]), str(remote.get("service", "0")))
    if phase == GRAPHICS_DISCONNECT:
        return HypervisorEvent(EventKind.SESSION_DISCONNECTED, clone, at, client, "disconnect")
    if phase in (GRAPHICS_CONNECT, GRAPHICS_INITIALIZE):
        detail = "connect" if phase == GRAPHICS_CONNECT else "initialize"
        return HypervisorEvent(EventKind.SESSION_CONNECTED, clone, at, client, detail)
    log.debug("ignored graphics event phase", extra=fields(clone=clone, phase=phase))
    return None


def vnc_event(clone: str, name: str, details: str | None, at: float) -> HypervisorEvent | None:
    """A QEMU VNC monitor event (its name and JSON data: {"client": {"host", "service"},
    "server": {...}}) as graphics_event would have it from libvirt's graphics callback."""
    phase = VNC_PHASES.get(name)
    if phase is None:
        return None
    try:
        data = json.loads(details or "{}")
    except ValueError:
        data = {}
    client = data.get("client") if isinstance(data, dict) else None
    remote = None
    if isinstance(client, dict) and client.get("host"):
        remote = {"node": client["host"], "service": client.get("service", "0")}
    return graphics_event(clone, phase, remote, at)


def agent_event(clone: str, state: int, at: float) -> HypervisorEvent:
    detail = "connected" if state == AGENT_CONNECTED else "disconnected"
    return HypervisorEvent(EventKind.AGENT_CHANGED, clone, at, detail=detail)


class _Subscription:
    def __init__(self, hub: EventHub, callback: Callable[[HypervisorEvent], None]) -> None:
        self._hub = hub
        self._callback = callback

    def close(self) -> None:
        self._hub.unsubscribe(self._callback)


class EventHub:
    """What libvirt's domain callbacks say: passed on to subscribers (for imagepipe's own
    clones), and remembered for list_clones() and sessions(): whether each guest agent is
    connected and since when each VNC client has been connected."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._subscribers: list[Callable[[HypervisorEvent], None]] = []
        self._ours: set[str] = set()  # clone names seen with imagepipe metadata
        self._agent_up: dict[str, bool] = {}
        self._vnc_since: dict[str, dict[str, float]] = {}  # clone -> client -> first seen

    def register(self, libvirt: Any, libvirt_qemu: Any, conn: Any) -> list[Callable[[], None]]:
        """Register the callbacks on a new connection; return one call per callback that
        deregisters it."""
        domain_ids = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_life, None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent, None
            ),
        ]
        undo: list[Callable[[], None]] = [
            functools.partial(conn.domainEventDeregisterAny, i) for i in domain_ids
        ]
        try:
            vnc_id = libvirt_qemu.qemuMonitorEventRegister(
                conn,
                None,
                VNC_EVENTS,
                self._on_vnc,
                None,
                libvirt_qemu.VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX,
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                for deregister in undo:  # the callbacks would keep the failed connection alive
                    with contextlib.suppress(libvirt.libvirtError):
                        deregister()
                raise
            # a driver without QEMU (test:///) has no VNC server to follow
            log.debug("no QEMU monitor events on this connection", extra=fields(error=str(exc)))
            return undo
        undo.append(functools.partial(libvirt_qemu.qemuMonitorEventDeregister, conn, vnc_id))
        return undo

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> _Subscription:
        with self._lock:
            self._subscribers.append(callback)
        return _Subscription(self, callback)

    def unsubscribe(self, callback: Callable[[HypervisorEvent], None]) -> None:
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def close(self) -> None:
        with self._lock:
            self._subscribers.clear()

    def adopt(self, clone: str) -> None:
        """Deliver this clone's events: it carries imagepipe's metadata."""
        with self._lock:
            self._ours.add(clone)

    def forget(self, clone: str, *, disown: bool = False) -> None:
        with self._lock:
            self._agent_up.pop(clone, None)
            self._vnc_since.pop(clone, None)
            if disown:
                self._ours.discard(clone)

    def reconnected(self) -> None:
        """After a reconnect (libvirtd restarted or was down): events were missed. The guest
        agents' states are asked again. VNC clients are kept with their connect times:
        sessions() asks QEMU who is connected now and drops the ones that left. A session that
        came and went while libvirt was away is not reported from here: the keeper sees it in
        the balancer's session counter (Backend.sessions_total), as it does after its own
        restart, so a libvirtd restart does not reset every free desktop."""
        with self._changed:
            self._agent_up.clear()
            self._changed.notify_all()

    def agent_up(self, clone: str) -> bool | None:
        with self._lock:
            return self._agent_up.get(clone)

    def set_agent_up(self, clone: str, up: bool) -> None:
        with self._lock:
            self._agent_up[clone] = up

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until a lifecycle event arrives or `timeout` seconds pass."""
        with self._changed:
            self._changed.wait(timeout)

    def vnc_clients_now(
        self, clone: str, clients: tuple[str, ...]
    ) -> tuple[str | None, float | None]:
        """Record the clients QEMU reports now; return the longest-connected one and since
        when (the connect event's time, or when first seen here after a restart)."""
        now = self._clock()
        with self._lock:
            seen = self._vnc_since.setdefault(clone, {})
            for gone in set(seen) - set(clients):
                del seen[gone]
            for client in clients:
                seen.setdefault(client, now)
            if not clients:
                return None, None
            first = min(clients, key=lambda c: seen[c])
            return first, seen[first]

    def _emit(self, event: HypervisorEvent) -> None:
        with self._lock:
            if event.clone not in self._ours:
                return
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber failed", extra=fields(clone=event.clone))

    def _on_life(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = dom.name()
        with self._changed:
            if event in (EVENT_STARTED, EVENT_STOPPED, EVENT_CRASHED):
                self._agent_up.pop(name, None)
                self._vnc_since.pop(name, None)
            self._changed.notify_all()
        self._emit(lifecycle_event(name, event, detail, self._clock()))

    def _on_vnc(
        self,
        _conn: Any,
        dom: Any,
        name: str,
        _seconds: int,
        _micros: int,
        details: str | None,
        _opaque: Any,
    ) -> None:
        event = vnc_event(dom.name(), name, details, self._clock())
        if event is None:
            return
        with self._lock:
            clients = self._vnc_since.setdefault(event.clone, {})
            if event.client is not None:
                if event.kind is EventKind.SESSION_CONNECTED:
                    clients.setdefault(event.client, event.at)
                else:
                    clients.pop(event.client, None)
        self._emit(event)

    def _on_agent(self, _conn: Any, dom: Any, state: int, _reason: int, _opaque: Any) -> None:
        event = agent_event(dom.name(), state, self._clock())
        self.set_agent_up(event.clone, event.detail == "connected")
        self._emit(event)
