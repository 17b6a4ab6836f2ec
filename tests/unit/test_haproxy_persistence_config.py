"""The stick table imagepipe writes into haproxy.cfg for `balancer.persist`."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.balancers.haproxy.config import HAProxyConfig, Peer, render_config
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


PAIR = (
    Peer("lb1", Endpoint("10.0.0.11", 10000)),
    Peer("lb2", Endpoint("10.0.0.12", 10000)),
)


def test_a_pair_with_persistence_shares_its_stick_table_with_its_peers() -> None:
    cfg = HAProxyConfig(
        BASE.bind, BASE.admin_socket, persist="source", peers=PAIR, local_peer="lb2"
    )
    text = render_config(cfg)
    assert "    localpeer lb2\n" in text.split("\ndefaults\n")[0]
    assert "peers imagepipe\n    peer lb1 10.0.0.11:10000\n    peer lb2 10.0.0.12:10000\n" in text
    assert backend(cfg)[1] == "stick-table type ip size 100k expire 8h peers imagepipe"


def test_a_pair_without_persistence_has_no_peers_section() -> None:
    text = render_config(HAProxyConfig(BASE.bind, BASE.admin_socket, peers=PAIR, local_peer="lb1"))
    assert "peers" not in text and "localpeer" not in text


@pytest.mark.parametrize(
    ("peers", "local", "expected"),
    [
        (PAIR, "lb3", "this instance 'lb3' is not among the peers lb1, lb2"),
        ((PAIR[0], Peer("lb1", Endpoint("10.0.0.13", 1))), "lb1", "name lb1 is given to two"),
        ((PAIR[0], Peer("lb2", PAIR[0].address)), "lb1", "address 10.0.0.11:10000 is given"),
    ],
)
def test_a_bad_peer_list_is_refused(peers: tuple[Peer, ...], local: str, expected: str) -> None:
    cfg = HAProxyConfig(
        BASE.bind, BASE.admin_socket, persist="source", peers=peers, local_peer=local
    )
    with pytest.raises(BadInputError, match=expected):
        render_config(cfg)
