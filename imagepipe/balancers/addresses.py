"""What every balancer adapter does with a desktop's address."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from imagepipe.errors import BalancerError
from imagepipe.pool.model import Endpoint


def resolve_ip(address: Endpoint) -> Endpoint:
    """The address as an IP literal: neither HAProxy's dynamic servers nor IPVS resolve
    names. A name is resolved once, here; one that does not resolve is a BalancerError."""
    host = address.host.strip("[]")
    with contextlib.suppress(ValueError):
        return Endpoint(str(ipaddress.ip_address(host)), address.port)
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BalancerError(f"cannot resolve desktop address {host!r}: {exc.strerror}") from None
    return Endpoint(str(infos[0][4][0]), address.port)
