"""Helpers for tests and benchmarks that run imagepipe on this host for real: a free loopback
port, and the libvirt domains a throwaway pool left behind."""

from __future__ import annotations

import random
import socket
import subprocess

URI = "qemu:///system"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Something listens on (or holds) 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port_range(count: int, *, low: int = 20000, high: int = 30000) -> tuple[int, int]:
    """`count` consecutive free ports on 127.0.0.1, below the kernel's ephemeral range (so no
    outgoing connection takes one later), e.g. for a pool's display port_range."""
    for _ in range(200):
        first = random.randrange(low, high - count)
        if not any(port_in_use(p) for p in range(first, first + count)):
            return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def domains(prefix: str) -> list[str]:
    """Names of every libvirt domain (running or not) starting with `prefix`, sorted.
    A virsh failure raises: an unreadable host must not look like an empty one."""
    out = subprocess.run(
        ["virsh", "-c", URI, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return sorted(n for n in out.split() if n.startswith(prefix))


def destroy_domains(prefix: str) -> None:
    """Power off and undefine every domain starting with `prefix` (cleanup: never raises
    for a domain that is already off or gone)."""
    for name in domains(prefix):
        for args in (["destroy", name], ["undefine", name, "--nvram"]):
            subprocess.run(
                ["virsh", "-c", URI, *args], capture_output=True, check=False, timeout=120
            )
