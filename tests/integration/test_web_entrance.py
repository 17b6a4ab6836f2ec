"""The web entrance in front of a real HAProxy 2.6: each browser user reaches HAProxy as
themselves (PROXY protocol on HAProxy's bind for the entrance), so `persist: source` gives
two users two desktops and a returning user their own; the page can reach nothing else.

Desktops are small RFB 3.8 servers that say their own name (tests/integration/
test_haproxy_persistence.py); users are websocket clients from their own loopback addresses
(127.0.0.x), as noVNC's websocket is from a user's browser. tests/e2e/test_web_e2e.py does the
same with real Chromium, noVNC and libvirt desktops.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters
from imagepipe.app.pidlock import holder
from imagepipe.app.web import pid_file, start_web_background, web_url
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.cli import demo as demo_cli
from imagepipe.cli.app import main
from imagepipe.config import load_settings
from imagepipe.errors import OperationFailedError
from imagepipe.pool.model import Endpoint
from imagepipe.web.entrance import NOVNC_DIR, WebEntrance
from tests.conftest import require, require_program
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeHypervisor, FakeImages
from tests.host import free_port
from tests.integration.test_haproxy_persistence import Desktop

pytestmark = pytest.mark.real
WAIT = 5.0


class WebSocketUser:
    """A websocket client (RFC 6455, binary frames) from `source`, as noVNC opens one."""

    def __init__(
        self,
        entrance: Endpoint,
        source: str,
        *,
        path: str = "/websockify",
        origin: str | None = None,
    ) -> None:
        self.sock = socket.create_connection((entrance.host, entrance.port), WAIT, (source, 0))
        key = base64.b64encode(os.urandom(16)).decode()
        origin_line = f"Origin: {origin}\r\n" if origin else ""
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {entrance.host}:{entrance.port}\r\n{origin_line}"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            head += chunk
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        self.buffer = b""

    def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x82])
        header += (
            bytes([0x80 | len(data)])
            if len(data) < 126
            else bytes([0x80 | 126]) + struct.pack(">H", len(data))
        )
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            first, second = self._exact(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self._exact(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self._exact(8))
            payload = self._exact(length)
            if first & 0x0F == 0x8:
                raise ConnectionError(f"closed by the entrance: {payload[2:].decode()}")
            if first & 0x0F in (0x1, 0x2, 0x0):
                self.buffer += payload
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the entrance closed the connection")
            data += chunk
        return data

    def desktop(self) -> str:
        """The RFB handshake through the websocket: the name of the desktop reached."""
        assert self.read(12) == b"RFB 003.008\n"
        self.send(b"RFB 003.008\n")
        count = self.read(1)[0]
        assert 1 in self.read(count)
        self.send(bytes([1]))
        assert self.read(4) == b"\0\0\0\0"
        self.send(bytes([1]))
        self.read(4 + 16)
        (length,) = struct.unpack(">I", self.read(4))
        return self.read(length).decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Web:
    workdir: Path
    entrance: WebEntrance
    address: Endpoint
    balancer: HAProxyBalancer
    desktops: list[Desktop]

    def stick_table(self) -> str:
        return self.balancer.admin.command("show table desktops")


@contextlib.contextmanager
def web_entrance(tls: tuple[Path, Path] | None = None) -> Iterator[Web]:
    require_program("haproxy")
    require((NOVNC_DIR / "vnc.html").is_file(), "noVNC is not installed (apt-get install novnc)")
    workdir = Path(tempfile.mkdtemp(prefix="ipx-web-"))
    balancer = HAProxyBalancer(
        bind=f"127.0.0.1:{free_port()}",
        admin_socket=workdir / "admin.sock",
        config_path=workdir / "haproxy.cfg",
        pid_file=workdir / "haproxy.pid",
        manage=True,
        persist="source",
        web_socket=workdir / "web.sock",
    )
    desktops: list[Desktop] = []
    entrance = None
    try:
        balancer.ensure_frontend()
        for name in ("lab-0", "lab-1", "lab-2"):
            desktops.append(Desktop(name, "rfb"))
            balancer.enable(name, desktops[-1].endpoint)
        entrance = WebEntrance(
            bind=Endpoint("127.0.0.1", 0), balancer=workdir / "web.sock", tls=tls
        )
        threading.Thread(target=entrance.serve_forever, daemon=True).start()
        address = Endpoint("127.0.0.1", int(entrance.server_address[1]))
        yield Web(workdir, entrance, address, balancer, desktops)
    finally:
        if entrance is not None:
            entrance.shutdown()
            entrance.server_close()
        for desktop in desktops:
            desktop.stop()
        with contextlib.suppress(Exception):
            balancer.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def test_two_web_users_at_once_get_two_desktops_and_a_returning_one_gets_theirs_back() -> None:
    with web_entrance() as web:
        alice = WebSocketUser(web.address, "127.0.0.31")
        bob = WebSocketUser(web.address, "127.0.0.32")
        assert (alice.status, bob.status) == (101, 101)
        hers, his = alice.desktop(), bob.desktop()
        assert hers != his, "two web users at once landed on one desktop"
        table = web.stick_table()
        assert "key=127.0.0.31" in table and "key=127.0.0.32" in table, table
        assert "key=127.0.0.1 " not in table, "HAProxy saw the entrance, not the users"

        web.balancer.drain(hers)  # her desktop is in use: it takes no new user
        alice.close()
        again = WebSocketUser(web.address, "127.0.0.31")
        carol = WebSocketUser(web.address, "127.0.0.33")
        assert again.desktop() == hers, "a returning web user did not get her desktop back"
        assert carol.desktop() not in (hers, his)
        for user in (again, bob, carol):
            user.close()


def test_the_page_reaches_novnc_and_the_balancer_and_nothing_else() -> None:
    with web_entrance() as web:
        base = f"http://127.0.0.1:{web.address.port}"

        def get(path: str) -> tuple[int, str, bytes]:
            request = urllib.request.Request(base + path)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=WAIT) as response:
                    return response.status, response.headers.get("Location", ""), response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.headers.get("Location", ""), b""

        status, location, _ = get("/")
        assert status == 302 and location.startswith("/vnc.html?autoconnect=true")
        status, _, body = get("/vnc.html")
        assert status == 200 and b"noVNC" in body
        assert get("/core/rfb.js")[0] == 200
        for path in (
            "/utils/novnc_proxy",  # in the package, not part of the page
            "/core/",  # a folder: never a listing
            "/../../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/app/.hidden",
            "/websockify",  # the websocket, asked for as a page
            "/vnc.html/../../etc/hostname",
            "/nothing-here",
        ):
            assert get(path)[0] == 404, path
        wrong = WebSocketUser(web.address, "127.0.0.34", path="/websockify?host=127.0.0.1&port=22")
        assert wrong.status == 101  # the query is ignored: the only target is the balancer
        assert wrong.desktop() in {d.name for d in web.desktops}
        wrong.close()
        elsewhere = WebSocketUser(web.address, "127.0.0.34", path="/ssh")
        assert elsewhere.status == 404
        elsewhere.close()
        # another site's page in the user's browser (its Origin is not the entrance's)
        hijack = WebSocketUser(web.address, "127.0.0.34", origin="https://evil.example")
        assert hijack.status == 403
        hijack.close()
        own = f"http://127.0.0.1:{web.address.port}"
        page = WebSocketUser(web.address, "127.0.0.35", origin=own)
        assert page.status == 101 and page.desktop() in {d.name for d in web.desktops}
        page.close()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_with_tls_the_page_and_the_websocket_are_served_over_https(tmp_path: Path) -> None:
    require_program("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    with web_entrance(tls=(cert, key)) as web:
        assert web.entrance.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with urllib.request.urlopen(
            f"https://127.0.0.1:{web.address.port}/vnc.html", timeout=WAIT, context=context
        ) as response:
            assert response.status == 200
        with socket.create_connection(("127.0.0.1", web.address.port), WAIT) as plain:
            plain.sendall(b"GET /vnc.html HTTP/1.0\r\n\r\n")
            plain.settimeout(WAIT)
            with contextlib.suppress(OSError):
                assert not plain.recv(100).startswith(b"HTTP/"), "plain HTTP answered"


def test_the_demo_entrance_runs_in_the_background_and_demo_down_stops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imagepipe demo` starts `imagepipe web` in the background (it outlives the demo, as
    HAProxy does) and `demo --down` stops it; the desktops are fakes here."""
    require((NOVNC_DIR / "vnc.html").is_file(), "noVNC is not installed (apt-get install novnc)")
    directory = tmp_path / "demo"
    files = demo_cli.write_demo_files(directory, load_settings(None))
    port = free_port()
    files.settings.write_text(
        files.settings.read_text().replace(demo_cli.WEB_BIND, f"127.0.0.1:{port}")
    )
    settings = load_settings(files.settings)
    images = FakeImages()
    hv = FakeHypervisor()
    hv.add_base(images.publish("tiny", 1))
    adapters = Adapters(hypervisor=hv, balancer=FakeBalancer(), images=images)
    pid = start_web_background(settings, files.settings)
    try:
        url = web_url(settings)
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "vnc.html", timeout=WAIT) as response:
            assert response.status == 200

        assert main(["demo", "--down", "--dir", str(directory)], adapters) == 0

        assert f"the demo's web entrance on {url} is stopped" in capsys.readouterr().err
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), 1).close()
        assert holder(pid_file(settings)) is None, "the entrance still holds its pid file"
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_the_demo_does_not_mistake_another_program_on_its_web_port_for_its_entrance(
    tmp_path: Path,
) -> None:
    files = demo_cli.write_demo_files(tmp_path / "demo", load_settings(None))
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        files.settings.write_text(
            files.settings.read_text().replace(demo_cli.WEB_BIND, f"127.0.0.1:{port}")
        )
        settings = load_settings(files.settings)
        with pytest.raises(OperationFailedError, match="another program listens on"):
            start_web_background(settings, files.settings)
