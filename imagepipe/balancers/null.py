"""balancer.driver: none — users connect to each desktop's own display port."""

from __future__ import annotations

from imagepipe.pool.model import Backend, Endpoint


class NullBalancer:
    """Implements imagepipe.pool.ports.Balancer by recording nothing and reporting nothing."""

    def ensure_frontend(self) -> None:
        return None

    def list_backends(self) -> list[Backend]:
        return []

    def enable(self, name: str, address: Endpoint) -> None:
        return None

    def drain(self, name: str) -> None:
        return None

    def remove(self, name: str) -> None:
        return None

    def close(self) -> None:
        return None
