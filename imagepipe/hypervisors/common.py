"""What every hypervisor driver shares: the clone name rule, reading a power state through a
driver's table, the display port probe, and the bookkeeping of warm parents (instant
desktops).

    name = check_name(spec.name)             # the whole name, or FatalHypervisorError
    power = power_of(state, POWER)           # a driver's own table; Power.OTHER if unknown
    free = port_free(Endpoint("127.0.0.1", 5901))   # nothing listens there now
    key = WarmKey(image, version, cpus, memory_kib, fingerprint(parts), "ipw-")
    book = WarmBook()                        # one per driver's WarmParents
    with book.lock(key.name): ...            # one build per parent at a time
    if book.waiting(key.name): boot          # failed less than RETRY_AFTER seconds ago
    book.say_once("make:" + key.name, "...") # a fallback to boot is said once per reason

How a parent is made, kept and removed is each driver's own (libvirt saves a domain into a
folder, VirtualBox takes an online snapshot); what it is keyed by, when a failed one is tried
again and how a fallback is said are the same for both, here. No hypervisor import; the only
I/O is port_free's bind probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TypeVar

from imagepipe.errors import FatalHypervisorError
from imagepipe.log import fields
from imagepipe.pool.model import Endpoint, Power
from imagepipe.record import Record

log = logging.getLogger(__name__)

RETRY_AFTER = 600.0  # seconds before a warm parent that failed is tried again
TIDY_EVERY = 60.0  # seconds between looks for warm parents no desktop can use any more
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

State = TypeVar("State", bound=Hashable)


def check_name(name: str) -> str:
    """A clone name is a machine name and a file name (libvirt's disks and sockets under
    state_dir): all of it must be letters, digits, '.', '_' and '-', so nothing path-like and
    nothing after the name (a trailing newline) gets through."""
    if not _NAME.fullmatch(name):
        raise FatalHypervisorError(
            f"clone name {name!r} is not usable: use letters, digits, '.', '_' and '-' "
            "(at most 63 characters, not starting with a symbol)"
        )
    return name


def power_of(state: State, table: Mapping[State, Power]) -> Power:
    """The port's Power for a driver's own state (libvirt's number, VirtualBox's name)."""
    return table.get(state, Power.OTHER)


def port_free(display: Endpoint) -> bool:
    """Nothing listens on the display address now (a bind probe, as QEMU's VNC or VirtualBox's
    VRDE will bind)."""
    family = socket.AF_INET6 if ":" in display.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((display.host, display.port))
        except OSError:
            return False
    return True


def fingerprint(parts: Sequence[str]) -> str:
    """The hash a warm parent is keyed by: everything its saved state depends on."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class WarmKey(Record, kw_only=False):
    """Which warm parent a clone can start from: image version, machine shape, and the
    fingerprint of everything else the saved state depends on (each driver hashes its own)."""

    image: str
    version: int
    cpus: int
    memory_kib: int
    fingerprint: str
    prefix: str  # the driver's: a parent's name is the prefix and the fingerprint's start

    @property
    def name(self) -> str:
        """The parent's name (libvirt: domain and folder; VirtualBox: machine)."""
        return f"{self.prefix}{self.fingerprint[:16]}"

    @property
    def memory_mib(self) -> int:
        return self.memory_kib // 1024

    def __str__(self) -> str:
        return f"{self.image} v{self.version} ({self.cpus} cpu, {self.memory_mib} MiB)"


class WarmBook:
    """The bookkeeping of one driver's warm parents. Thread-safe."""

    def __init__(
        self,
        *,
        retry_after: float = RETRY_AFTER,
        tidy_every: float = TIDY_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retry_after = retry_after
        self._tidy_every = tidy_every
        self._clock = clock
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._failed: dict[str, float] = {}  # parent name -> clock time of the failure
        self._said: set[str] = set()  # fallback reasons already logged
        self._tidied_at: float | None = None

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """One build (or removal) of the parent `name` at a time in this process."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def waiting(self, name: str) -> bool:
        """The parent failed less than RETRY_AFTER seconds ago: do not try it yet."""
        failed = self._failed.get(name)
        return failed is not None and self._clock() - failed < self._retry_after

    def failed(self, name: str) -> None:
        self._failed[name] = self._clock()

    def made(self, key: WarmKey, started: float) -> None:
        """The parent was made (`started` on this book's clock): logged, failures forgotten."""
        self._failed.pop(key.name, None)
        log.info(
            "warm parent made",
            extra=fields(
                image=key.image,
                version=key.version,
                parent=key.name,
                seconds=round(self._clock() - started, 2),
            ),
        )

    def now(self) -> float:
        return self._clock()

    def tidy_due(self) -> bool:
        """Time to look for parents nobody can use (at most once per TIDY_EVERY)."""
        now = self._clock()
        with self._guard:
            if self._tidied_at is not None and now - self._tidied_at < self._tidy_every:
                return False
            self._tidied_at = now
            return True

    def tidy_soon(self) -> None:
        """Look at the next chance (a new parent may have made an older one useless)."""
        with self._guard:
            self._tidied_at = None

    def say_once(self, what: str, message: str) -> None:
        """Log a fallback to boot once per reason, not once per desktop."""
        with self._guard:
            if what in self._said:
                return
            self._said.add(what)
        log.warning(message, extra=fields(action="fallback"))
