"""The haproxy.cfg imagepipe writes: one TCP frontend, one backend `desktops` filled at run time.

Pure: renders text from plain values. The adapter writes it and starts HAProxy with it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from imagepipe.errors import BadInputError
from imagepipe.pool.model import Endpoint

FRONTEND = "desktops_in"
BACKEND = "desktops"
WEB_FRONTEND = "desktops_web"
BALANCE_ALGORITHMS = ("leastconn", "first")
# How a returning user reaches the desktop that holds their session, also while it drains
# (HAProxy sends a drained server the connections its persistence picks, no new ones):
# none; source = a stick table on the client address (VNC, any protocol); rdp-cookie = a
# stick table on the user name an RDP client sends (`Cookie: mstshash=alice`).
PERSISTENCE = ("none", "source", "rdp-cookie")
# The peers section of a balancer pair: each HAProxy sends the entries of its stick table to
# the others, so after a failover the surviving one sends a returning user to the same desktop.
PEERS = "imagepipe"


@dataclass(frozen=True)
class Peer:
    """One HAProxy of a balancer pair, as its peers see it: its instance name and the
    address where it takes the others' stick-table updates (the local one binds it)."""

    name: str
    address: Endpoint


@dataclass(frozen=True)
class HAProxyConfig:
    """What goes into haproxy.cfg. Timeouts are HAProxy time strings ("5s", "24h")."""

    bind: Endpoint
    admin_socket: Path
    balance: str = "leastconn"
    max_connections: int = 4096  # for the whole process
    connect_timeout: str = "5s"  # a desktop that does not accept within this is skipped
    session_timeout: str = "24h"  # idle limit of a remote-desktop session, both sides
    queue_timeout: str = "60s"  # how long a client waits for a free desktop
    fin_timeout: str = "30s"  # half-closed connections
    persist: str = "none"  # PERSISTENCE
    persist_expire: str = "8h"  # a returning user is sent back within this long
    # A unix socket only the web entrance connects to. It sends each browser user's address
    # first (PROXY protocol), so `persist: source` and the stick table see the user, not
    # the entrance. None: no web entrance.
    web_socket: Path | None = None
    # A balancer pair with persistence: every instance (this one among them, named
    # `local_peer`) whose stick tables replicate. Empty: a stick table of its own.
    peers: tuple[Peer, ...] = ()
    local_peer: str | None = None


def parse_bind(bind: str) -> Endpoint:
    """ "127.0.0.1:5999", "[::1]:5999" or "0.0.0.0:3389" into an Endpoint; BadInputError else."""
    host, sep, port_text = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    hint = 'write it as "address:port", e.g. "127.0.0.1:5999" or "[::1]:5999"'
    if not sep or not host or not port_text.isdigit():
        raise BadInputError(f"balancer bind {bind!r} is not an address and port: {hint}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadInputError(
            f"balancer bind {bind!r}: {host!r} is not an IP address: {hint}"
        ) from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise BadInputError(f"balancer bind {bind!r}: port must be between 1 and 65535: {hint}")
    return Endpoint(host, port)


def check_balance(balance: str) -> str:
    if balance not in BALANCE_ALGORITHMS:
        choices = " or ".join(BALANCE_ALGORITHMS)
        raise BadInputError(f"balancer balance {balance!r} is not supported: use {choices}")
    return balance


def check_persist(persist: str) -> str:
    if persist not in PERSISTENCE:
        raise BadInputError(
            f"balancer persist {persist!r} is not supported: use {', '.join(PERSISTENCE)}"
        )
    return persist


def check_peers(peers: tuple[Peer, ...], local_peer: str | None) -> None:
    """Each peer once, by name and address, this instance among them."""
    if not peers:
        return
    names = [p.name for p in peers]
    addresses = [format_address(p.address) for p in peers]
    for values, what in ((names, "name"), (addresses, "address")):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise BadInputError(
                f"balancer peers: {what} {twice[0]} is given to two instances; give each its own"
            )
    if local_peer not in names:
        raise BadInputError(
            f"balancer peers: this instance {local_peer!r} is not among the peers "
            f"{', '.join(names)}: list every instance of the pair, this one too"
        )


def persistence_lines(persist: str, expire: str, *, shared: bool = False) -> list[str]:
    """The backend's stick table: which desktop a client (address or RDP user) was on;
    `shared`: its entries go to the other instances of the pair (the peers section)."""
    peers = f" peers {PEERS}" if shared else ""
    if persist == "source":
        return [
            f"    stick-table type ip size 100k expire {expire}{peers}",
            "    stick on src",
        ]
    if persist == "rdp-cookie":
        return [
            "    tcp-request inspect-delay 5s",
            "    tcp-request content accept if RDP_COOKIE",
            f"    stick-table type string len 64 size 100k expire {expire}{peers}",
            "    stick on rdp_cookie(mstshash)",
        ]
    return []


def peers_lines(peers: tuple[Peer, ...]) -> list[str]:
    """The pair's peers section: HAProxy binds the local peer's address and connects to the
    others' (`localpeer` in global says which one it is)."""
    if not peers:
        return []
    return [
        f"peers {PEERS}",
        *(f"    peer {p.name} {format_address(p.address)}" for p in peers),
        "",
    ]


def format_address(address: Endpoint) -> str:
    """host:port as HAProxy writes it: IPv6 hosts in brackets."""
    host = address.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{address.port}"


def _quote_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in " \t\n\"'#\\"):
        raise BadInputError(
            f"HAProxy socket path {text!r} has spaces, quotes or '#': choose a plain path"
        )
    return text


def web_frontend_lines(socket: Path | None) -> list[str]:
    """The web entrance's own frontend: same backend, the user's address from the PROXY
    header (v1 or v2) that the entrance sends before the desktop's bytes."""
    if socket is None:
        return []
    return [
        f"frontend {WEB_FRONTEND}",
        f"    bind unix@{_quote_path(socket)} mode 600 accept-proxy",
        f"    default_backend {BACKEND}",
        "",
    ]


def render_config(cfg: HAProxyConfig) -> str:
    """The complete haproxy.cfg. Servers are not listed: they are added at run time."""
    check_balance(cfg.balance)
    check_persist(cfg.persist)
    check_peers(cfg.peers, cfg.local_peer)
    peers = cfg.peers if cfg.persist != "none" else ()  # no stick table: nothing to share
    lines = [
        "# Written by imagepipe; changes are overwritten. Desktops are added at run time",
        "# through the admin socket (add server / set server state / del server).",
        "global",
        # One thread: with HAProxy's default of one per CPU, two threads can both hand the
        # same `maxconn 1` desktop a connection when users arrive at the same instant (seen
        # here, and haproxy/haproxy#2743). Remote-desktop sessions are few and long; one
        # thread carries thousands of them.
        "    nbthread 1",
        f"    maxconn {cfg.max_connections}",
        f"    stats socket {_quote_path(cfg.admin_socket)} mode 600 level admin"
        " expose-fd listeners",
        "    stats timeout 30s",
        *([f"    localpeer {cfg.local_peer}"] if peers else []),
        "",
        *peers_lines(peers),
        "defaults",
        "    mode tcp",
        "    option clitcpka",
        "    option srvtcpka",
        "    option redispatch",
        "    retries 2",
        f"    timeout connect {cfg.connect_timeout}",
        f"    timeout client {cfg.session_timeout}",
        f"    timeout server {cfg.session_timeout}",
        f"    timeout queue {cfg.queue_timeout}",
        f"    timeout client-fin {cfg.fin_timeout}",
        f"    timeout server-fin {cfg.fin_timeout}",
        "",
        f"frontend {FRONTEND}",
        f"    bind {format_address(cfg.bind)}",
        f"    default_backend {BACKEND}",
        "",
        *web_frontend_lines(cfg.web_socket),
        f"backend {BACKEND}",
        f"    balance {cfg.balance}",
        *persistence_lines(cfg.persist, cfg.persist_expire, shared=bool(peers)),
        "",
    ]
    return "\n".join(lines)
