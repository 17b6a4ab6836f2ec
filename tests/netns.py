"""Network namespaces a test makes for itself: namespaces, veth pairs, a bridge, addresses.

Everything is named with a short tag of this process, so tests running at the same time do
not collide, and everything made is removed by `close()` (also after a failure). A veth end
may stay in the root namespace (`None`): that is how the namespaces reach this host's
desktops. Addresses are in a private /24 checked to be unused on this host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.conftest import require_program


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def free_subnet(base: str = "10.213") -> ipaddress.IPv4Network:
    """A /24 under `base` that no interface or route of this host uses."""
    used = ip("-o", "addr").stdout + ip("route").stdout
    for third in [(os.getpid() + i) % 230 + 20 for i in range(230)]:
        prefix = f"{base}.{third}."
        if prefix not in used:
            return ipaddress.IPv4Network(f"{prefix}0/24")
    raise AssertionError(f"no free /24 under {base}")


class NetLab:
    """Namespaces and links made by one test; `close()` removes them all."""

    def __init__(self) -> None:
        require_program("ip")
        self.tag = f"{os.getpid() % 0xFFFF:04x}"
        self.namespaces: list[str] = []
        self.root_links: list[str] = []

    def ns(self, name: str) -> str:
        """A new namespace with its loopback up; returns its full name."""
        full = f"ipx-{self.tag}-{name}"
        ip("netns", "add", full)
        self.namespaces.append(full)
        self.run(full, "ip", "link", "set", "lo", "up")
        return full

    def veth(self, a: str | None, a_name: str, b: str | None, b_name: str) -> tuple[str, str]:
        """A veth pair between namespaces `a` and `b` (None: the root namespace), both up.
        Interface names get the lab's tag (at most 15 characters)."""
        left, right = f"{a_name}{self.tag}", f"{b_name}{self.tag}"
        assert len(left) <= 15 and len(right) <= 15, (left, right)
        ip("link", "add", left, "type", "veth", "peer", "name", right)
        self.root_links.append(left)
        for end, ns in ((left, a), (right, b)):
            if ns is not None:
                ip("link", "set", end, "netns", ns)
            self.link(ns, "set", end, "up")
        return left, right

    def bridge(self, ns: str, name: str, ports: Sequence[str]) -> None:
        self.link(ns, "add", name, "type", "bridge")
        for port in ports:
            self.link(ns, "set", port, "master", name)
        self.link(ns, "set", name, "up")

    def address(self, ns: str | None, dev: str, cidr: str) -> None:
        self._ip(ns, "addr", "add", cidr, "dev", dev)

    def link(self, ns: str | None, *argv: str) -> None:
        self._ip(ns, "link", *argv)

    def addresses(self, ns: str) -> set[str]:
        out = ip("-n", ns, "-o", "-4", "addr").stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def run(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def popen(self, ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """A long-running program in `ns`, its output appended to `log`."""
        with log.open("ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT
            )

    def close(self) -> None:
        for link in self.root_links:
            ip("link", "del", link, check=False)  # gone with its namespace: harmless
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        self.root_links.clear()

    def _ip(self, ns: str | None, *argv: str) -> None:
        ip(*(("-n", ns) if ns else ()), *argv)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.close()
