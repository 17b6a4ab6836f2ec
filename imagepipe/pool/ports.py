"""The core's ports: what the pool core needs from the world, declared on the core's side.

Adapters (imagepipe.hypervisors.*, imagepipe.balancers.*, imagepipe.images.registry) implement
these protocols; the core imports only this module, never an adapter. Every adapter of a port
passes that port's contract suite (tests/contract/).

Hypervisor errors are typed (imagepipe.errors): CloneNotFoundError (no VM of that name: final),
BusyError (retry), InvalidStateError, FatalHypervisorError and its kinds NotOurCloneError (a VM
imagepipe did not make, or another pool's: never touched, never success), BaseMissingError,
DisplayInUseError. Every mutating call is idempotent: creating a clone that already exists with
the same metadata, deleting one that is gone, starting one that runs — succeed. The table per
method is in docs/contracts.md; tests/contract/ pins it for every adapter.

Balancer: one backend per clone, named after the clone. Drain state lives in the balancer
itself and is read back from it, so it survives a keeper restart; so does each backend's
session counter (Backend.sessions_total), the evidence of sessions no keeper saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from imagepipe.pool.model import (
    Backend,
    BaseImage,
    CloneInfo,
    CloneSpec,
    Endpoint,
    GuestSession,
    HostSpec,
    HostState,
    InstanceHealth,
)


class EventKind(StrEnum):
    SESSION_CONNECTED = "session_connected"
    SESSION_DISCONNECTED = "session_disconnected"
    STATE_CHANGED = "state_changed"
    AGENT_CHANGED = "agent_changed"  # guest agent came up or went away


@dataclass(frozen=True)
class HypervisorEvent:
    kind: EventKind
    clone: str
    at: float  # seconds since the epoch
    client: str | None = None  # for session events: the client's address
    detail: str = ""


class Subscription(Protocol):
    def close(self) -> None:
        """Stop delivering events."""


class Hypervisor(Protocol):
    """One host's hypervisor, restricted to the clones imagepipe made."""

    def list_clones(self) -> list[CloneInfo]:
        """Every clone this tool made (identified by its metadata), in one inventory call."""
        ...

    def base_ready(self, base: BaseImage) -> bool:
        """Whether clones can be made from this base now: complete and powered off."""
        ...

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        """Make a linked or full clone of spec.base, with metadata; do not start it."""
        ...

    def start(self, name: str) -> None:
        """Power on. Starting a running clone succeeds; a suspended one is InvalidStateError."""
        ...

    def stop(self, name: str, timeout: float) -> None:
        """Shut down gracefully; power off hard after `timeout` seconds."""
        ...

    def reset(self, name: str) -> None:
        """Back to the clean state (power off, discard every change since the base), start."""
        ...

    def suspend(self, name: str) -> None:
        """Suspend a running clone."""
        ...

    def resume(self, name: str) -> None:
        """Resume a suspended clone."""
        ...

    def delete(self, name: str) -> None:
        """Power off and remove the clone and its own disks. A missing clone succeeds."""
        ...

    def display(self, name: str) -> Endpoint | None:
        """Where a remote-desktop client connects to this clone (VNC/RDP), if anywhere."""
        ...

    def sessions(self, name: str) -> GuestSession:
        """Who is connected to and logged in on this clone right now."""
        ...

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> Subscription:
        """Call `callback` (from any thread) on session and state events until closed."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


@runtime_checkable
class Hosts(Protocol):
    """A hypervisor that spans several hosts. Optional: a single-host hypervisor does not
    implement it, and the core treats it as one host named "" that holds every version."""

    def hosts(self) -> list[HostState]:
        """Every configured host: connected or lost (since when), versions it holds, an upload
        under way."""
        ...

    def ensure_version(self, host: str, base: BaseImage) -> bool:
        """True when `host` holds this version; otherwise start its upload (once) and return
        False until it is done."""
        ...


@runtime_checkable
class HostList(Protocol):
    """Hosts whose list can change while the keeper runs (a reload of `hosts:`). Optional."""

    def set_hosts(self, hosts: Sequence[HostSpec]) -> None:
        """From now on these hosts: new ones are connected to (and their events reach every
        subscriber), removed ones are closed and their desktops forgotten (the caller
        removes them first), changed ones take their new address, capacity and labels (a new
        uri: connected to again)."""
        ...


@runtime_checkable
class Notifier(Protocol):
    """A hypervisor that can show a message to the user of a desktop (a rollout's deadline
    warning). Optional: the keeper logs the warning where the hypervisor cannot show it.
    libvirt: the guest agent's imagepipe-notify; the fakes record it."""

    def notify_users(self, name: str, text: str) -> None:
        """Show `text` inside the running clone. CloneNotFoundError when it does not exist,
        NotOurCloneError for a VM imagepipe did not make, InvalidStateError when it is not
        running."""
        ...


class Balancer(Protocol):
    def ensure_frontend(self) -> None:
        """Make sure the shared address exists and listens (idempotent)."""
        ...

    def list_backends(self) -> list[Backend]:
        """Every backend with its state, current connection count and `sessions_total`:
        the connections the balancer has passed to it since it was added (HAProxy `stot`,
        IPVS `Conns`), or None where the balancer cannot tell. The counter only grows while
        the backend exists: enable() of an existing backend keeps it; a backend removed and
        enabled again (or a restarted balancer) starts over at 0."""
        ...

    def enable(self, name: str, address: Endpoint) -> None:
        """Add the backend, or set it ready if it exists (this cancels a drain)."""
        ...

    def drain(self, name: str) -> None:
        """No new connections; existing ones stay. Draining twice is harmless; a backend the
        balancer does not have is BackendNotFoundError."""
        ...

    def remove(self, name: str) -> None:
        """Remove the backend. Refuses (BackendInUseError) while it has connections, unless
        it is already gone, which succeeds."""
        ...

    def close(self) -> None:
        """Release sockets; a supervised balancer process keeps running."""
        ...


@runtime_checkable
class BalancerInstances(Protocol):
    """A balancer made of several instances kept in step (imagepipe.balancers.group).
    Optional: observe() reports each instance where the balancer has them."""

    def health(self) -> list[InstanceHealth]:
        """Each instance as the last call found it: reachable or not, and why."""
        ...


class ImageVersion(Protocol):
    """What observe needs of a registered version (imagepipe.images.registry.VersionRecord)."""

    @property
    def version(self) -> int: ...

    def base_image(self) -> BaseImage: ...


class Images(Protocol):
    """What observe needs of the registry (imagepipe.images.registry.Registry)."""

    def resolve(self, image: str, ref: str | int | None = None) -> ImageVersion: ...


class Clock(Protocol):
    """Time, injected so tests never sleep."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for timeouts; any origin)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait (a fake clock just moves its time forward)."""
        ...


@runtime_checkable
class Channels(Protocol):
    """The registry's channels, as rollouts need them (imagepipe.images.registry.Registry):
    a rollout moves the channel its pools follow, so `images` and `rollout` never disagree."""

    def channel_version(self, image: str, channel: str) -> int | None:
        """The version `channel` of `image` points at; None when there is no such channel."""
        ...

    def newest_version(self, image: str) -> int:
        """The newest usable (not revoked, not pruned) version of `image`."""
        ...

    def move_channel(self, image: str, channel: str, version: int, by: str) -> None:
        """Point `channel` at `version`, recording who/why in `by`."""
        ...
