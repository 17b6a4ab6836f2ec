"""Helpers for tests and benchmarks that run imagepipe on this host for real: a free loopback
port, and the libvirt domains a throwaway pool left behind."""

from __future__ import annotations

import socket
import subprocess

URI = "qemu:///system"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
