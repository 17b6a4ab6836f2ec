"""The web entrance: noVNC's page and one websocket whose only target is the balancer.

    entrance = WebEntrance(bind=Endpoint("127.0.0.1", 6080), balancer=Path("run/web.sock"))
    entrance.serve_forever()      # until entrance.shutdown() (another thread) or a signal

What a browser can reach, and nothing else (everything else is 404):
- `/` sends the browser to noVNC's page, which connects at once;
- noVNC's own files (vnc.html, vnc_lite.html, app/, core/, vendor/) from Debian's `novnc`;
- the websocket at `/websockify`, proxied by websockify's ProxyRequestHandler to HAProxy's
  bind for the entrance (a unix socket), after a PROXY protocol header carrying the browser
  user's address. The page cannot name a desktop, a host or a port: there is one target.

Threads, not processes: websockify's LibProxyServer model (http.server with ThreadingMixIn),
with TLS done here (the handshake in the connection's own thread).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from websockify.websocketproxy import ProxyRequestHandler

from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.log import fields
from imagepipe.pool.model import Endpoint
from imagepipe.web.proxy_header import proxy_v1_header

log = logging.getLogger(__name__)

NOVNC_DIR = Path("/usr/share/novnc")  # Debian's `novnc` package
WEBSOCKET_PATH = "/websockify"  # noVNC's default `path` setting
# noVNC connects as soon as the page loads, scales the desktop to the window, and tries
# again when the connection drops; host, port and path default to the page's own.
START_PAGE = "/vnc.html?autoconnect=true&resize=scale&reconnect=true"
SERVED = ("vnc.html", "vnc_lite.html", "app/", "core/", "vendor/")  # of NOVNC_DIR
CONNECT_TIMEOUT = 10.0  # to HAProxy's socket
HANDSHAKE_TIMEOUT = 15.0  # a TLS client that does not finish its handshake is dropped


def served(path: str) -> bool:
    """Whether a request path names one of noVNC's own files (no `..`, no hidden files)."""
    relative = unquote(urlsplit(path).path).lstrip("/")
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return False
    return any(relative == s or (s.endswith("/") and relative.startswith(s)) for s in SERVED)


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a websocket comes from the entrance's own page. Browsers always send Origin
    (scheme://host:port of the page); a client without one is not a browser page."""
    if origin is None:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


class EntranceHandler(ProxyRequestHandler):  # type: ignore[misc]
    """websockify's proxy handler, narrowed: fixed files, one websocket path, one target."""

    server: WebEntrance
    server_version = "imagepipe-web"

    def handle_upgrade(self) -> None:
        if urlsplit(self.path).path != WEBSOCKET_PATH:
            self.send_error(404)
            return
        if not same_origin(self.headers.get("Origin"), self.headers.get("Host")):
            # another site's page in the user's browser: under `persist: source` it would be
            # sent to the user's own desktop (cross-site websocket hijacking)
            log.warning(
                "web socket from another site refused",
                extra=fields(client=self.client_address[0], origin=self.headers.get("Origin")),
            )
            self.send_error(403)
            return
        super().handle_upgrade()

    def do_GET(self) -> None:
        self._files(head=False)

    def do_HEAD(self) -> None:
        self._files(head=True)

    def _files(self, *, head: bool) -> None:
        if urlsplit(self.path).path == "/":
            self.send_response(302)
            self.send_header("Location", START_PAGE)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not served(self.path):
            self.send_error(404)
            return
        if head:
            super().do_HEAD()
        else:
            super().do_GET()

    def translate_path(self, path: str) -> str:
        self.directory = str(self.server.files)
        result: str = super().translate_path(path)
        return result

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def new_websocket_client(self) -> None:
        """Connect to the balancer, tell it who the user is, then carry the bytes."""
        client = (str(self.client_address[0]), int(self.client_address[1]))
        local = self.server.server_address
        target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            target.settimeout(CONNECT_TIMEOUT)
            target.connect(str(self.server.balancer))
            target.settimeout(None)
            target.sendall(proxy_v1_header(client, (str(local[0]), int(local[1]))))
        except OSError as exc:
            target.close()
            log.warning(
                "web user cannot reach the balancer",
                extra=fields(client=client[0], balancer=str(self.server.balancer), error=exc),
            )
            raise self.CClose(1011, "the desktops cannot be reached") from None
        log.info("web user connected", extra=fields(client=client[0], port=client[1]))
        try:
            self.do_proxy(target)
        finally:
            log.info("web user disconnected", extra=fields(client=client[0], port=client[1]))
            target.close()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format % args, extra=fields(client=self.client_address[0]))

    def log_error(self, format: str, *args: Any) -> None:
        log.debug(format % args, extra=fields(client=self.client_address[0]))


class WebEntrance(ThreadingHTTPServer):
    """The HTTP(S) server. The attributes below are what websockify's handler reads."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        *,
        bind: Endpoint,
        balancer: Path,
        tls: tuple[Path, Path] | None = None,
        files: Path = NOVNC_DIR,
    ) -> None:
        if not (files / "vnc.html").is_file():
            raise EnvironmentMissingError(
                f"noVNC is not installed (no {files / 'vnc.html'}): run `apt-get install "
                "novnc` (scripts/setup-host.sh installs it)"
            )
        self.files = files
        self.balancer = balancer
        self.context = None if tls is None else tls_context(*tls)
        # websockify's ProxyRequestHandler reads these from its server
        self.only_upgrade = False
        self.file_only = True  # a folder is 404, never a listing
        self.verbose = False
        self.daemon = False
        self.record = ""
        self.run_once = False
        self.handler_id = 0
        self.traffic = False
        self.web_auth = False
        self.host_token = False
        self.heartbeat = 30  # websocket pings keep idle sessions through other proxies
        self.token_plugin = None
        self.auth_plugin = None
        self.wrap_cmd = None
        self.ssl_target = False
        self.unix_target = str(balancer)
        self.unix_listen = False
        self.target_host = None
        self.target_port = None
        self.logger = logging.getLogger("imagepipe.web.websockify")
        self.address_family = (
            socket.AF_INET6 if ipaddress.ip_address(bind.host).version == 6 else socket.AF_INET
        )
        try:
            super().__init__((bind.host, bind.port), EntranceHandler)
        except OSError as exc:
            raise EnvironmentMissingError(
                f"the web entrance cannot listen on {bind.host}:{bind.port}: {exc.strerror}"
            ) from None

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.context else 'http'}://{shown}:{port}/"

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake, then the HTTP request."""
        if self.context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secure = self.context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError included
            log.debug("TLS handshake failed", extra=fields(client=client_address[0], error=exc))
            return
        secure.settimeout(None)
        try:
            super().finish_request(secure, client_address)
        finally:
            self.shutdown_request(secure)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web connection ended with an error", extra=fields(client=client_address[0]))


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context of TLS 1.2 or newer with this certificate and key; BadInputError
    naming the files when they cannot be read or do not match."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except FileNotFoundError as exc:
        raise BadInputError(f"web.tls: {exc.filename or cert} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        raise BadInputError(
            f"web.tls: cannot use certificate {cert} with key {key}: {exc}"
        ) from None
    return context
