"""The stick table imagepipe writes into haproxy.cfg for `balancer.persist`."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.balancers.haproxy.config import HAProxyConfig, render_config
from imagepipe.errors import BadInputError
from imagepipe.pool.model import Endpoint

BASE = HAProxyConfig(bind=Endpoint("127.0.0.1", 5999), admin_socket=Path("/run/x.sock"))


def backend(cfg: HAProxyConfig) -> list[str]:
    text = render_config(cfg)
    return [line.strip() for line in text.split("\nbackend desktops\n", 1)[1].splitlines() if line]


def test_no_persistence_by_default() -> None:
    assert backend(BASE) == ["balance leastconn"]


def test_source_persistence_sticks_on_the_client_address() -> None:
    cfg = HAProxyConfig(BASE.bind, BASE.admin_socket, persist="source", persist_expire="3600s")
    assert backend(cfg)[1:] == ["stick-table type ip size 100k expire 3600s", "stick on src"]


def test_rdp_cookie_persistence_waits_for_the_cookie_and_sticks_on_the_user() -> None:
    cfg = HAProxyConfig(BASE.bind, BASE.admin_socket, persist="rdp-cookie")
    assert backend(cfg)[1:] == [
        "tcp-request inspect-delay 5s",
        "tcp-request content accept if RDP_COOKIE",
        "stick-table type string len 64 size 100k expire 8h",
        "stick on rdp_cookie(mstshash)",
    ]


def test_an_unknown_persistence_is_refused() -> None:
    with pytest.raises(BadInputError, match="balancer persist 'cookie' is not supported"):
        render_config(HAProxyConfig(BASE.bind, BASE.admin_socket, persist="cookie"))
