"""One passive event listener on one thread: VirtualBox events -> HypervisorEvents and a
cache of who is on each clone, so sessions() never polls the guest.

Listens on IVirtualBox's event source for OnMachineStateChanged and OnGuestPropertyChanged:
the Guest Additions' user properties (/VirtualBox/GuestInfo/OS/LoggedInUsersList ...) and the
VRDE server's client properties (/VirtualBox/HostInfo/VRDP/...). pyvbox's own
register_callback is not used: its thread calls back on every empty one-second poll (it tests
`if event:`, but its Interface has only Python 2's __nonzero__), so this loop checks the event
itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagepipe.hypervisors.virtualbox.facts import (
    EVENT_GUEST_PROPERTY_CHANGED,
    EVENT_MACHINE_STATE_CHANGED,
    PROP_NO_USERS,
    PROP_USERS_LIST,
    PROP_VRDP_ACTIVE,
    PROP_VRDP_PREFIX,
    VersionApi,
    parse_users,
)
from imagepipe.log import fields
from imagepipe.pool.ports import EventKind, HypervisorEvent

log = logging.getLogger(__name__)
WAIT_MS = 500


@dataclass
class CloneSessions:
    """What the events told about one clone."""

    users: tuple[str, ...] = ()
    agent: bool = False  # the guest's agent (Guest Additions) has reported
    client: str | None = None
    since: float | None = None


@dataclass
class _Subscription:
    hub: EventHub
    callback: Callable[[HypervisorEvent], None]
    open: bool = True

    def close(self) -> None:
        self.open = False
        self.hub.unsubscribe(self)


@dataclass
class EventHub:
    """The listener thread and the per-clone session cache it keeps."""

    api: VersionApi
    name_of: Callable[[str], str | None]  # machine id -> clone name (None: not ours)
    sessions: dict[str, CloneSessions] = field(default_factory=dict)
    _subs: list[_Subscription] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _quit: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, library: Any, event_source: Any) -> None:
        listener = event_source.create_listener()
        kinds = [
            library.VBoxEventType(EVENT_MACHINE_STATE_CHANGED),
            library.VBoxEventType(EVENT_GUEST_PROPERTY_CHANGED),
        ]
        event_source.register_listener(listener, kinds, False)
        self._thread = threading.Thread(
            target=self._run,
            args=(library, event_source, listener),
            name="virtualbox-events",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._quit.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> _Subscription:
        sub = _Subscription(self, callback)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def known(self, name: str) -> CloneSessions | None:
        with self._lock:
            return self.sessions.get(name)

    def seed(self, name: str, facts: CloneSessions) -> None:
        with self._lock:
            self.sessions.setdefault(name, facts)

    def forget(self, name: str) -> None:
        with self._lock:
            self.sessions.pop(name, None)

    def wait_for_change(self, seconds: float) -> None:
        with self._changed:
            self._changed.wait(seconds)

    def _run(self, library: Any, source: Any, listener: Any) -> None:
        try:
            while not self._quit.is_set():
                try:
                    event = source.get_event(listener, WAIT_MS)
                except library.VBoxError as exc:
                    log.warning("VirtualBox event listener lost", extra=fields(error=str(exc)))
                    return
                if getattr(event, "_i", None) is None:  # an empty poll, not an event
                    continue
                try:
                    self._handle(library, event)
                except Exception:  # one bad event must not end event delivery
                    log.exception("VirtualBox event not understood")
                finally:
                    source.event_processed(listener, event)
        finally:
            try:
                source.unregister_listener(listener)
            except Exception as exc:
                log.debug("listener already gone", extra=fields(error=str(exc)))

    def _handle(self, library: Any, event: Any) -> None:
        kind = int(event.type_p)
        if kind == EVENT_MACHINE_STATE_CHANGED:
            specific = library.IMachineStateChangedEvent(event)
            name = self.name_of(specific.machine_id)
            if name is None:
                return
            # the raw value: pyvbox's 6.1 enum raises on 7.x's Snapshotting (23)
            state = self.api.state_name(int(specific._get_attr("state")))
            if state not in ("Running", "Paused", "Starting", "Restoring"):
                self.forget(name)
            self._emit(HypervisorEvent(EventKind.STATE_CHANGED, name, time.time(), detail=state))
        elif kind == EVENT_GUEST_PROPERTY_CHANGED:
            specific = library.IGuestPropertyChangedEvent(event)
            name = self.name_of(specific.machine_id)
            if name is not None:
                self._property(name, specific.name, specific.value)

    def _property(self, name: str, prop: str, value: str) -> None:
        now = time.time()
        emitted: HypervisorEvent | None = None
        with self._lock:
            facts = self.sessions.setdefault(name, CloneSessions())
            if prop == PROP_USERS_LIST:
                facts.users, facts.agent = parse_users(value), True
                emitted = HypervisorEvent(EventKind.AGENT_CHANGED, name, now, detail="users")
            elif prop == PROP_NO_USERS:
                if not facts.agent:
                    facts.agent = True
                    emitted = HypervisorEvent(EventKind.AGENT_CHANGED, name, now, detail="up")
            elif prop.startswith(PROP_VRDP_PREFIX) and prop.endswith("/IPAddr") and value:
                facts.client, facts.since = value, now
                emitted = HypervisorEvent(EventKind.SESSION_CONNECTED, name, now, value)
            elif prop == PROP_VRDP_ACTIVE and value in ("", "0") and facts.client is not None:
                client, facts.client, facts.since = facts.client, None, None
                emitted = HypervisorEvent(EventKind.SESSION_DISCONNECTED, name, now, client)
        if emitted is not None:
            self._emit(emitted)

    def _emit(self, event: HypervisorEvent) -> None:
        with self._changed:
            self._changed.notify_all()
        with self._lock:
            subs = [s for s in self._subs if s.open]
        for sub in subs:
            try:
                sub.callback(event)
            except Exception:
                log.exception("event callback failed", extra=fields(clone=event.clone))
