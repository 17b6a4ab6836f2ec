"""The haproxy.cfg imagepipe writes, and the settings it refuses before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.balancers.haproxy.config import (
    HAProxyConfig,
    format_address,
    parse_bind,
    render_config,
)
from imagepipe.errors import BadInputError
from imagepipe.pool.model import Endpoint


def config(**overrides: object) -> HAProxyConfig:
    values: dict[str, object] = {
        "bind": Endpoint("127.0.0.1", 5999),
        "admin_socket": Path("/run/imagepipe/haproxy.sock"),
    }
    values.update(overrides)
    return HAProxyConfig(**values)  # type: ignore[arg-type]


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_config_is_tcp_with_one_frontend_and_an_empty_desktops_backend() -> None:
    text = lines(render_config(config()))
    assert "mode tcp" in text
    assert "frontend desktops_in" in text
    assert "bind 127.0.0.1:5999" in text
    assert "default_backend desktops" in text
    assert "backend desktops" in text
    assert "balance leastconn" in text
    assert not [line for line in text if line.startswith("server ")]


def test_admin_socket_is_private_admin_level_and_hands_over_listeners() -> None:
    text = lines(render_config(config()))
    assert (
        "stats socket /run/imagepipe/haproxy.sock mode 600 level admin expose-fd listeners" in text
    )


def test_sessions_last_a_working_day_with_keepalives_and_clients_queue_briefly() -> None:
    text = lines(render_config(config()))
    assert {
        "timeout client 24h",
        "timeout server 24h",
        "option clitcpka",
        "option srvtcpka",
    } <= set(text)
    assert "timeout queue 60s" in text
    assert "timeout connect 5s" in text


def test_config_needs_no_root_no_chroot_no_user_switch() -> None:
    text = render_config(config())
    assert "chroot" not in text
    assert "\n    user " not in text
    assert "\n    group " not in text


def test_balance_first_is_written_and_unknown_algorithms_are_refused() -> None:
    assert "balance first" in lines(render_config(config(balance="first")))
    with pytest.raises(BadInputError, match=r"roundrobin.*leastconn or first"):
        render_config(config(balance="roundrobin"))


def test_ipv6_bind_is_bracketed() -> None:
    assert "bind [::1]:5999" in lines(render_config(config(bind=Endpoint("::1", 5999))))
    assert format_address(Endpoint("192.0.2.1", 80)) == "192.0.2.1:80"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5999", Endpoint("127.0.0.1", 5999)),
        ("0.0.0.0:3389", Endpoint("0.0.0.0", 3389)),
        ("[::1]:5999", Endpoint("::1", 5999)),
    ],
)
def test_bind_addresses_are_parsed(text: str, expected: Endpoint) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("5999", "not an address and port"),
        ("127.0.0.1", "not an address and port"),
        ("desktops.example:5999", "not an IP address"),
        ("127.0.0.1:70000", "between 1 and 65535"),
        ("127.0.0.1:http", "not an address and port"),
    ],
)
def test_bad_bind_addresses_are_refused_with_an_example(text: str, complaint: str) -> None:
    with pytest.raises(BadInputError, match=complaint) as caught:
        parse_bind(text)
    assert "127.0.0.1:5999" in str(caught.value)


def test_a_socket_path_that_would_break_the_config_is_refused() -> None:
    with pytest.raises(BadInputError, match="plain path"):
        render_config(config(admin_socket=Path("/run/my sockets/haproxy.sock")))
