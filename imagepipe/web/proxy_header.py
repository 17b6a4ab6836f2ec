"""The PROXY protocol header (v1, text) the web entrance sends HAProxy before a user's bytes.

Pure. HAProxy's `accept-proxy` bind reads it and takes the browser user's address as the
connection's source, so `stick on src` and the stick table see each user, not the entrance.
See HAProxy's doc/proxy-protocol.txt, section 2.1.
"""

from __future__ import annotations

import ipaddress

from imagepipe.errors import BadInputError


def proxy_v1_header(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """`PROXY TCP4 <client> <local> <client port> <local port>\\r\\n` (TCP6 for IPv6).

    An IPv4 address mapped into IPv6 (::ffff:a.b.c.d) is sent as the IPv4 address it is.
    Both ends must be of one family: the local end is mapped to the client's when they differ.
    """
    source = _address(client[0])
    destination = _address(local[0])
    if source.version != destination.version:
        destination = (
            ipaddress.ip_address("::") if source.version == 6 else ipaddress.ip_address("0.0.0.0")
        )
    family = "TCP4" if source.version == 4 else "TCP6"
    for port in (client[1], local[1]):
        if not 0 <= port <= 65535:
            raise BadInputError(f"PROXY header: port {port} is not between 0 and 65535")
    return f"PROXY {family} {source} {destination} {client[1]} {local[1]}\r\n".encode("ascii")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise BadInputError(f"PROXY header: {text!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
