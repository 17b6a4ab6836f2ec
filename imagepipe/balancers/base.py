"""The balancer port: put desktops behind one address, drain them, take them out.

One backend per clone, named after the clone. Drain state lives in the balancer itself
and is read back from it, so it survives a keeper restart.
"""

from __future__ import annotations

from typing import Protocol

from imagepipe.pool.model import Backend, Endpoint


class Balancer(Protocol):
    def ensure_frontend(self) -> None:
        """Make sure the shared address exists and listens (idempotent)."""
        ...

    def list_backends(self) -> list[Backend]:
        """Every backend with its state and current connection count."""
        ...

    def enable(self, name: str, address: Endpoint) -> None:
        """Add the backend, or set it ready if it exists (this cancels a drain)."""
        ...

    def drain(self, name: str) -> None:
        """No new connections; existing ones stay. Draining twice is harmless."""
        ...

    def remove(self, name: str) -> None:
        """Remove the backend. Refuses (BalancerError) while it has connections, unless it
        is already gone, which succeeds."""
        ...

    def close(self) -> None:
        """Release sockets; a supervised balancer process keeps running."""
        ...
