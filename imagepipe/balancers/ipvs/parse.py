"""Pure parsers for what `ipvsadm` prints, and for the adapter's backend-names file.

    parse_list(text)        `ipvsadm -L -n --exact`: services, real servers, weights, counts
    parse_stats(text)       `ipvsadm -L -n --exact --stats`: connections scheduled so far
    parse_thresholds(text)  `ipvsadm -L -n --exact --thresholds`: upper/lower thresholds
    parse_names / render_names: the `name address:port [base]` lines naming imagepipe's real
                            servers (base: the real server's Conns when imagepipe added it)

No I/O: tested on output recorded from a real IPVS kernel (tests/unit/data/ipvs/).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from imagepipe.errors import BalancerError
from imagepipe.pool.model import Endpoint


class Forward(StrEnum):
    """How IPVS sends packets to a real server (ipvsadm's -m, -g, -i)."""

    MASQ = "masq"  # NAT: the director rewrites addresses; replies must come back through it
    DROUTE = "droute"  # direct routing: same L2 network, the VIP on each desktop's loopback
    TUNNEL = "ipip"  # IP-in-IP tunnel

    @property
    def flag(self) -> str:
        return {"masq": "-m", "droute": "-g", "ipip": "-i"}[self.value]


# "Local": the real server is an address of the director itself; IPVS delivers locally
# whatever method was asked for, and -S lists it as -m.
_LIST_FORWARD = {
    "Masq": Forward.MASQ,
    "Local": Forward.MASQ,
    "Route": Forward.DROUTE,
    "Tunnel": Forward.TUNNEL,
}


@dataclass(frozen=True)
class RealServer:
    address: Endpoint
    forward: Forward
    weight: int
    active: int  # ActiveConn: established connections
    inactive: int  # InActConn: connecting, closing or in TIME_WAIT


@dataclass(frozen=True)
class VirtualService:
    protocol: str  # TCP, UDP, SCTP or FWM
    address: Endpoint
    scheduler: str
    persistence: int = 0  # seconds; 0 = not persistent
    real_servers: tuple[RealServer, ...] = ()


@dataclass(frozen=True)
class ServiceStats:
    """A virtual service's counters from `--stats`: Conns, the connections IPVS scheduled
    (per real server: to it) since it was added. `--stats` replaces the Weight and
    ActiveConn columns, so the state and the counters take two ipvsadm calls."""

    protocol: str
    address: Endpoint
    conns: int
    real_servers: tuple[tuple[Endpoint, int], ...] = ()  # (address, Conns)


@dataclass(frozen=True)
class Named:
    """A line of the names file: imagepipe's name for a real server, and `base`, the real
    server's Conns when imagepipe added it (IPVS gives a removed real server that is added
    again within its connections' lifetime its old counters back: the base takes them off)."""

    address: Endpoint
    base: int = 0


@dataclass(frozen=True)
class Thresholds:
    address: Endpoint
    upper: int  # -x: no new connections at this many (0 = no limit)
    lower: int  # -y


def parse_endpoint(text: str) -> Endpoint:
    """`10.0.2.100:3389` or `[fd00::1]:3389` as ipvsadm -n prints them."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BalancerError(f"unexpected address in ipvsadm output: {text!r}")
    return Endpoint(host.strip("[]"), int(port))


def same_endpoint(a: Endpoint, b: Endpoint) -> bool:
    """Equal addresses however they are spelled (`::1` and `0::1`)."""
    try:
        return ipaddress.ip_address(a.host) == ipaddress.ip_address(b.host) and a.port == b.port
    except ValueError:
        return a == b


def format_endpoint(endpoint: Endpoint) -> str:
    """As ipvsadm takes it: IPv6 in brackets."""
    if ":" in endpoint.host:
        return f"[{endpoint.host}]:{endpoint.port}"
    return f"{endpoint.host}:{endpoint.port}"


_SERVICE = re.compile(r"^(TCP|UDP|SCTP|FWM)\s+(\S+)\s+(\S+)(.*)$")
_REAL = re.compile(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")
_HEADER = re.compile(r"^(IP Virtual Server|Prot LocalAddress|\s+-> RemoteAddress)")


def _service(line: str) -> tuple[str, Endpoint, str, int] | None:
    m = _SERVICE.match(line)
    if m is None:
        return None
    protocol, address, scheduler, flags = m.groups()
    words = flags.split()
    persistence = 0
    if "persistent" in words:
        at = words.index("persistent")
        if at + 1 >= len(words) or not words[at + 1].isdigit():
            raise BalancerError(f"unexpected persistence in ipvsadm output: {line!r}")
        persistence = int(words[at + 1])
    endpoint = Endpoint(address, 0) if protocol == "FWM" else parse_endpoint(address)
    return protocol, endpoint, scheduler, persistence


def parse_list(text: str) -> list[VirtualService]:
    """`ipvsadm -L -n --exact` (optionally `-t VIP:PORT`) into typed records."""
    services: list[VirtualService] = []
    current: tuple[str, Endpoint, str, int] | None = None
    reals: list[RealServer] = []

    def flush() -> None:
        if current is not None:
            protocol, address, scheduler, persistence = current
            services.append(VirtualService(protocol, address, scheduler, persistence, tuple(reals)))

    for line in text.splitlines():
        if not line.strip() or _HEADER.match(line):
            continue
        service = _service(line)
        if service is not None:
            flush()
            current, reals = service, []
            continue
        m = _REAL.match(line)
        if m is None or current is None or m.group(2) not in _LIST_FORWARD:
            raise BalancerError(f"unexpected line in `ipvsadm -L -n` output: {line!r}")
        address, forward, weight, active, inactive = m.groups()
        reals.append(
            RealServer(
                parse_endpoint(address),
                _LIST_FORWARD[forward],
                int(weight),
                int(active),
                int(inactive),
            )
        )
    flush()
    return services


_STATS = re.compile(r"^(TCP|UDP|SCTP|FWM)\s+(\S+)\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s*$")
_STATS_REAL = re.compile(r"^\s+->\s+(\S+)\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s*$")


def parse_stats(text: str) -> list[ServiceStats]:
    """`ipvsadm -L -n --exact --stats` (optionally `-t VIP:PORT`) into typed records."""
    services: list[ServiceStats] = []
    current: tuple[str, Endpoint, int] | None = None
    reals: list[tuple[Endpoint, int]] = []

    def flush() -> None:
        if current is not None:
            services.append(ServiceStats(*current, tuple(reals)))

    for line in text.splitlines():
        if not line.strip() or _HEADER.match(line) or line.strip() == "-> RemoteAddress:Port":
            continue
        service = _STATS.match(line)
        if service is not None:
            flush()
            protocol, address, conns = service.groups()
            endpoint = Endpoint(address, 0) if protocol == "FWM" else parse_endpoint(address)
            current, reals = (protocol, endpoint, int(conns)), []
            continue
        real = _STATS_REAL.match(line)
        if real is None or current is None:
            raise BalancerError(f"unexpected line in `ipvsadm -L -n --stats` output: {line!r}")
        reals.append((parse_endpoint(real.group(1)), int(real.group(2))))
    flush()
    return services


def parse_thresholds(text: str) -> list[Thresholds]:
    """Every real server's thresholds from `ipvsadm -L -n --exact --thresholds`."""
    out: list[Thresholds] = []
    for line in text.splitlines():
        if not line.strip() or _HEADER.match(line) or _SERVICE.match(line):
            continue
        m = _REAL.match(line)
        if m is None:
            raise BalancerError(f"unexpected line in `ipvsadm -L --thresholds` output: {line!r}")
        address, upper, lower, _active, _inactive = m.groups()
        if not (upper.isdigit() and lower.isdigit()):
            raise BalancerError(f"unexpected thresholds in ipvsadm output: {line!r}")
        out.append(Thresholds(parse_endpoint(address), int(upper), int(lower)))
    return out


# -- the names file ---------------------------------------------------------------------------

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def parse_names(text: str) -> dict[str, Endpoint]:
    """`name address:port [base]` lines (# comments, blank lines ignored) -> name: address."""
    return {name: named.address for name, named in parse_named(text).items()}


def parse_named(text: str) -> dict[str, Named]:
    """`name address:port [base]` lines -> name: its address and counter base."""
    names: dict[str, Named] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if (
            len(words) not in (2, 3)
            or not NAME.fullmatch(words[0])
            or (len(words) == 3 and not words[2].isdigit())
        ):
            raise BalancerError(
                f"backend names file line {number}: expected `name address:port`, optionally "
                f"followed by a counter base, got {line!r}"
            )
        base = int(words[2]) if len(words) == 3 else 0
        names[words[0]] = Named(parse_endpoint(words[1]), base)
    return names


def render_names(names: Mapping[str, Endpoint | Named]) -> str:
    lines = ["# imagepipe: IPVS real server -> backend name (the kernel has no place for it)"]
    for name in sorted(names):
        entry = names[name]
        named = entry if isinstance(entry, Named) else Named(entry)
        base = f" {named.base}" if named.base else ""
        lines.append(f"{name} {format_endpoint(named.address)}{base}")
    return "\n".join(lines) + "\n"


def stray_name(address: Endpoint) -> str:
    """The name a real server nobody named gets: `ipvs-10.0.3.2-5901`."""
    return "ipvs-" + re.sub(r"[^A-Za-z0-9.]+", "-", address.host).strip("-") + f"-{address.port}"
