"""Telling systemd how the keeper is doing: the sd_notify(3) protocol, as documented.

A service of `Type=notify` gets `$NOTIFY_SOCKET`, a Unix datagram socket (a path, or an
abstract name written with a leading `@`); each message is one datagram of newline-separated
`KEY=VALUE` lines: `READY=1`, `STATUS=…`, `STOPPING=1`, `RELOADING=1`, `WATCHDOG=1`. With
`WatchdogSec=` in the unit, systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process
it expects pings from) and restarts the service when no `WATCHDOG=1` comes for that long.

Outside systemd (no `$NOTIFY_SOCKET`) `from_environment` gives a notifier that does nothing.
A failed send is logged at debug level and otherwise ignored, as sd_notify() does: systemd
being gone must never stop the keeper. Sends never block either (a listener that stopped
reading would otherwise wedge the keeper once the socket's queue is full): a message that
cannot be queued is dropped, and the next pass sends a fresh one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from imagepipe.log import fields

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages to one socket; `None` address = a no-op notifier."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two pings systemd needs (half of WatchdogSec), or None."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match the reload; older
        # ones ignore it.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping: no new actions, finishing those running")

    def watchdog(self) -> bool:
        return self.watchdog_usec is not None and self.send("WATCHDOG=1")

    def send(self, *lines: str) -> bool:
        """One datagram of these lines; False when there is no socket or the send failed."""
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        address = self.address
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(message, address)
        except OSError as exc:
            log.debug("systemd notify failed", extra=fields(socket=self.address, error=exc))
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
