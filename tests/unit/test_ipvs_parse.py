"""ipvsadm's output into typed records, on output recorded from a real IPVS kernel (Debian's
6.1 cloud kernel, ipvsadm 1.31) in tests/unit/data/ipvs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.balancers.ipvs.parse import (
    Forward,
    Named,
    RealServer,
    ServiceStats,
    Thresholds,
    VirtualService,
    format_endpoint,
    parse_list,
    parse_named,
    parse_names,
    parse_stats,
    parse_thresholds,
    render_names,
    same_endpoint,
    stray_name,
)
from imagepipe.errors import BalancerError
from imagepipe.pool.model import Endpoint

DATA = Path(__file__).parent / "data" / "ipvs"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_the_full_listing_gives_every_service_its_real_servers_weights_and_counts() -> None:
    services = parse_list(recorded("list.txt"))

    assert services == [
        VirtualService(
            "TCP",
            Endpoint("10.0.2.100", 3389),
            "wlc",
            300,
            (
                RealServer(Endpoint("10.0.3.2", 5902), Forward.MASQ, 0, 0, 0),
                RealServer(Endpoint("10.0.3.2", 33353), Forward.MASQ, 1, 1, 1),
            ),
        ),
        VirtualService(
            "TCP",
            Endpoint("10.0.2.100", 5900),
            "rr",
            0,
            (RealServer(Endpoint("10.0.3.2", 5900), Forward.DROUTE, 3, 0, 0),),
        ),
        VirtualService("UDP", Endpoint("10.0.2.100", 53), "lc"),
        VirtualService(
            "TCP",
            Endpoint("fd00::100", 3389),
            "lc",
            0,
            (RealServer(Endpoint("fd00::2", 5901), Forward.MASQ, 1, 0, 0),),
        ),
        VirtualService("FWM", Endpoint("7", 0), "sh"),
    ]


def test_one_service_listing_and_a_service_without_real_servers() -> None:
    (service,) = parse_list(recorded("list-service.txt"))
    (empty,) = parse_list(recorded("empty.txt"))

    assert [s.address.port for s in service.real_servers] == [5902, 33353]
    assert empty == VirtualService("TCP", Endpoint("10.0.2.100", 5900), "rr")


def test_thresholds_show_the_upper_limit_of_one_user_per_desktop() -> None:
    assert parse_thresholds(recorded("thresholds.txt")) == [
        Thresholds(Endpoint("10.0.3.2", 5902), 1, 0),
        Thresholds(Endpoint("10.0.3.2", 33353), 1, 0),
        Thresholds(Endpoint("10.0.3.2", 5900), 5, 1),
        Thresholds(Endpoint("fd00::2", 5901), 1, 0),
    ]


def test_an_unexpected_line_is_an_error_that_quotes_it() -> None:
    with pytest.raises(BalancerError, match=r"unexpected line .*'  -> garbage'"):
        parse_list("TCP  10.0.2.100:3389 wlc\n  -> garbage\n")
    with pytest.raises(BalancerError, match=r"unexpected thresholds .*'  -> 10\.0\.3\.2:5900  one"):
        parse_thresholds("  -> 10.0.3.2:5900  one  0  0  0\n")


def test_a_persistent_service_with_a_netmask_keeps_its_timeout() -> None:
    text = "TCP  10.0.2.100:3389 wlc persistent 600 mask 255.255.255.0\n"

    assert parse_list(text)[0].persistence == 600


def test_names_round_trip_and_ipv6_is_bracketed() -> None:
    names = {"lab-2": Endpoint("fd00::2", 5901), "lab-1": Endpoint("10.0.3.2", 5900)}

    text = render_names(names)

    assert text.splitlines()[1:] == ["lab-1 10.0.3.2:5900", "lab-2 [fd00::2]:5901"]
    assert parse_names(text) == names


def test_a_broken_names_file_says_which_line() -> None:
    with pytest.raises(BalancerError, match="line 2: expected `name address:port`"):
        parse_names("lab-1 10.0.3.2:5900\nlab 2 10.0.3.2:5901\n")


def test_a_real_server_nobody_named_gets_a_name_from_its_address() -> None:
    assert stray_name(Endpoint("10.0.3.2", 5901)) == "ipvs-10.0.3.2-5901"
    assert stray_name(Endpoint("fd00::2", 5901)) == "ipvs-fd00-2-5901"


def test_addresses_compare_however_they_are_spelt() -> None:
    assert same_endpoint(Endpoint("fd00::2", 1), Endpoint("fd00:0::2", 1))
    assert not same_endpoint(Endpoint("10.0.3.2", 1), Endpoint("10.0.3.2", 2))
    assert format_endpoint(Endpoint("fd00::2", 1)) == "[fd00::2]:1"


def test_a_real_server_on_the_director_itself_is_listed_as_local_and_read_as_masq() -> None:
    text = (
        "TCP  10.0.2.100:3389 wlc\n"
        "  -> 10.0.2.15:5901                Local   1      0          0         \n"
    )

    (service,) = parse_list(text)

    assert service.real_servers == (RealServer(Endpoint("10.0.2.15", 5901), Forward.MASQ, 1, 0, 0),)


def test_stats_give_each_real_server_its_connections_so_far() -> None:
    """Recorded after two clients connected to the first real server and closed."""
    assert parse_stats(recorded("stats-service.txt")) == [
        ServiceStats(
            "TCP",
            Endpoint("10.0.2.100", 3389),
            2,
            ((Endpoint("10.0.3.2", 33309), 2), (Endpoint("10.0.3.2", 33310), 0)),
        )
    ]
    assert parse_stats(recorded("stats.txt")) == parse_stats(recorded("stats-service.txt"))


def test_stats_of_an_empty_table_and_unexpected_lines() -> None:
    header = recorded("stats.txt").splitlines()[:3]
    assert parse_stats("\n".join(header) + "\n") == []
    with pytest.raises(BalancerError, match="--stats"):
        parse_stats(recorded("list-service.txt"))  # the listing without --stats


def test_a_names_line_may_carry_the_counter_base_of_its_real_server() -> None:
    names = {"lab-1": Named(Endpoint("10.0.3.2", 5900), 4), "lab-2": Named(Endpoint("::1", 1))}

    text = render_names(names)

    assert text.splitlines()[1:] == ["lab-1 10.0.3.2:5900 4", "lab-2 [::1]:1"]
    assert parse_named(text) == names
    assert parse_names(text) == {n: v.address for n, v in names.items()}
    with pytest.raises(BalancerError, match="line 1"):
        parse_named("lab-1 10.0.3.2:5900 many\n")
