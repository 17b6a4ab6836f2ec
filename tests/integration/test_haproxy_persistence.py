"""A returning user reaches the desktop that holds their session through a real HAProxy 2.6,
also while that desktop drains in a rollout; a new user never lands on a draining one.

VNC (`balancer.persist: source`): desktops are small RFB 3.8 servers whose desktop name (in
ServerInit) is their own name; clients do the real handshake, from their own loopback
addresses (127.0.0.x). RDP (`persist: rdp-cookie`): clients send an X.224 Connection Request
carrying `Cookie: mstshash=<user>`, as mstsc and FreeRDP do; the desktop answers its name.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.pool.model import Endpoint
from tests.integration import balancers
from tests.integration.balancers import HAProxyHarness

pytestmark = pytest.mark.real
WAIT = 5.0


class Desktop(balancers.Desktop):
    """A remote-desktop server that says who it is: RFB 3.8 up to ServerInit, or one line
    after an X.224 Connection Request."""

    def __init__(self, name: str, protocol: str) -> None:
        self.name = name
        self.protocol = protocol
        self.cookies: list[bytes] = []
        super().__init__()
        self.endpoint = Endpoint("127.0.0.1", self.port)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(WAIT)
            if self.protocol == "rfb":
                conn.sendall(b"RFB 003.008\n")
                _read(conn, 12)  # the client's version
                conn.sendall(bytes([1, 1]))  # one security type: None
                _read(conn, 1)
                conn.sendall(struct.pack(">I", 0))  # SecurityResult OK
                _read(conn, 1)  # ClientInit (shared flag)
                name = self.name.encode()
                pixel_format = bytes(16)
                conn.sendall(struct.pack(">HH", 640, 480) + pixel_format)
                conn.sendall(struct.pack(">I", len(name)) + name)
            else:
                tpkt = _read(conn, 4)
                self.cookies.append(_read(conn, struct.unpack(">H", tpkt[2:4])[0] - 4))
                conn.sendall(f"{self.name}\n".encode())
            while conn.recv(4096):
                pass


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def vnc_login(frontend: Endpoint, source: str) -> tuple[socket.socket, str]:
    """A VNC client's RFB 3.8 handshake from `source`; returns the desktop's name."""
    sock = socket.create_connection((frontend.host, frontend.port), WAIT, (source, 0))
    assert _read(sock, 12) == b"RFB 003.008\n"
    sock.sendall(b"RFB 003.008\n")
    count = _read(sock, 1)[0]
    assert 1 in _read(sock, count)
    sock.sendall(bytes([1]))
    assert _read(sock, 4) == b"\0\0\0\0"
    sock.sendall(bytes([1]))  # ClientInit: shared
    _read(sock, 4 + 16)
    (length,) = struct.unpack(">I", _read(sock, 4))
    return sock, _read(sock, length).decode()


def rdp_connect(frontend: Endpoint, user: str) -> tuple[socket.socket, str]:
    """An RDP client's first packet: TPKT + X.224 Connection Request with the user's cookie
    and an RDP Negotiation Request (TLS), as mstsc sends it."""
    cookie = f"Cookie: mstshash={user}\r\n".encode()
    negotiation = struct.pack("<BBHI", 0x01, 0x00, 8, 0x00000001)
    x224 = bytes([0xE0, 0, 0, 0, 0, 0]) + cookie + negotiation
    packet = bytes([len(x224)]) + x224
    tpkt = struct.pack(">BBH", 3, 0, 4 + len(packet)) + packet
    sock = socket.create_connection((frontend.host, frontend.port), WAIT)
    sock.sendall(tpkt)
    sock.settimeout(WAIT)
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(64)
    return sock, line.decode().strip()


@dataclass
class Harness:
    """A real HAProxy (tests/integration/balancers.py) with desktops that say who they are."""

    haproxy: HAProxyHarness
    desktops: list[Desktop] = field(default_factory=list)

    @property
    def frontend(self) -> Endpoint:
        return self.haproxy.frontend

    def start(self, persist: str, protocol: str, names: list[str]) -> HAProxyBalancer:
        balancer = self.haproxy.new_adapter(persist=persist)
        balancer.ensure_frontend()
        for name in names:
            desktop = Desktop(name, protocol)
            self.desktops.append(desktop)
            balancer.enable(name, desktop.endpoint)
        return balancer


@pytest.fixture
def harness(haproxy_harness: HAProxyHarness) -> Iterator[Harness]:
    h = Harness(haproxy_harness)
    try:
        yield h
    finally:
        for desktop in h.desktops:
            desktop.stop()


def test_a_returning_vnc_user_reaches_their_draining_desktop_and_a_new_user_does_not(
    harness: Harness,
) -> None:
    balancer = harness.start("source", "rfb", ["lab-0", "lab-1"])
    alice, hers = vnc_login(harness.frontend, "127.0.0.21")
    balancer.drain(hers)  # a rollout: her desktop takes no new user
    alice.close()  # her viewer drops

    again, back_on = vnc_login(harness.frontend, "127.0.0.21")
    bob, bobs = vnc_login(harness.frontend, "127.0.0.22")

    assert back_on == hers
    assert bobs != hers
    again.close()
    bob.close()


def test_a_returning_rdp_user_reaches_their_draining_desktop_by_the_mstshash_cookie(
    harness: Harness,
) -> None:
    balancer = harness.start("rdp-cookie", "rdp", ["lab-0", "lab-1", "lab-2"])
    alice, hers = rdp_connect(harness.frontend, "alice")
    balancer.drain(hers)
    alice.close()

    again, back_on = rdp_connect(harness.frontend, "alice")
    bob, bobs = rdp_connect(harness.frontend, "bob")

    assert back_on == hers
    assert bobs != hers
    served = next(d for d in harness.desktops if d.name == hers)
    assert all(b"Cookie: mstshash=alice\r\n" in c for c in served.cookies)
    again.close()
    bob.close()


def test_without_persistence_a_draining_desktop_gets_nobody(harness: Harness) -> None:
    balancer = harness.start("none", "rfb", ["lab-0", "lab-1"])
    alice, hers = vnc_login(harness.frontend, "127.0.0.21")
    balancer.drain(hers)
    alice.close()

    again, back_on = vnc_login(harness.frontend, "127.0.0.21")

    assert back_on != hers
    again.close()
