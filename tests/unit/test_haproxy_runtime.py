"""Reading HAProxy 2.6 runtime API replies (texts captured from a real HAProxy 2.6.12)."""

from __future__ import annotations

import pytest

from imagepipe.balancers.haproxy import runtime as rt
from imagepipe.errors import (
    BackendNotFoundError,
    BadInputError,
    BalancerError,
    EnvironmentMissingError,
)
from imagepipe.pool.model import Backend, BackendState, Endpoint

STATE_HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)


def state_row(name: str, addr: str, port: int, admin: int, weight: int = 1) -> str:
    return f"3 desktops 1 {name} {addr} 2 {admin} {weight} 1 0 1 0 0 0 0 0 0 - {port} - 0 0 - - 0"


SERVERS_STATE = "\n".join(
    [
        "1",
        STATE_HEADER,
        state_row("lab-1", "127.0.0.1", 16011, 0),
        state_row("lab-2", "::1", 16012, 8),
        state_row("lab-3", "127.0.0.1", 16013, 1),  # fresh dynamic server: maintenance
        state_row("lab-4", "127.0.0.1", 16014, 0, weight=0),
        state_row("lab-5", "127.0.0.1", 16015, 1 | 8),
        "",
        "",
    ]
)

STAT_HEADER = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
    "wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,"
    "lbtot,tracked,type,rate"
)
STAT = "\n".join(
    [
        STAT_HEADER,
        "desktops_in,FRONTEND,,,1,1,4096,1,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,1",
        "desktops,lab-1,0,0,1,1,1,1,0,0,,0,,0,0,0,0,no check,1,1,0,,,0,,,1,3,1,,1,,2,1",
        "desktops,lab-2,1,1,0,0,1,7,0,0,,0,,0,0,0,0,DRAIN,1,1,0,,,0,,,1,3,2,,0,,2,0",
        "desktops,BACKEND,0,0,1,1,410,1,0,0,0,0,,0,0,0,0,UP,1,1,0,,0,0,0,,1,3,0,,1,,1,1",
        "",
    ]
)


def test_server_states_map_admin_bits_and_weight_to_ready_drain_maint() -> None:
    states = {s.name: s.state for s in rt.parse_servers_state(SERVERS_STATE)}
    assert states == {
        "lab-1": BackendState.READY,
        "lab-2": BackendState.DRAIN,
        "lab-3": BackendState.MAINT,
        "lab-4": BackendState.DRAIN,
        "lab-5": BackendState.MAINT,
    }


def test_server_addresses_include_ipv6_and_port() -> None:
    addresses = [s.address for s in rt.parse_servers_state(SERVERS_STATE)][:2]
    assert addresses == [Endpoint("127.0.0.1", 16011), Endpoint("::1", 16012)]


def test_an_empty_backend_has_no_servers() -> None:
    assert rt.parse_servers_state(f"1\n{STATE_HEADER}\n\n") == []
    assert rt.parse_stat(f"{STAT_HEADER}\n\n") == []


def test_an_unexpected_state_format_is_an_error_not_an_empty_list() -> None:
    with pytest.raises(BalancerError, match="unexpected reply"):
        rt.parse_servers_state("2\n# be_id\n")
    with pytest.raises(BalancerError, match="cannot read"):
        rt.parse_servers_state(f"1\n{STATE_HEADER}\n3 desktops 1 lab-1\n")


def test_stat_reads_open_queued_and_total_sessions_of_desktop_servers_only() -> None:
    assert rt.parse_stat(STAT) == [
        rt.ServerStat("lab-1", current=1, queued=0, total=1),
        rt.ServerStat("lab-2", current=0, queued=1, total=7),
    ]


def test_backends_join_state_connections_and_session_counter_by_name() -> None:
    states = rt.parse_servers_state(SERVERS_STATE)[:3]
    assert rt.merge(states, rt.parse_stat(STAT)) == [
        Backend("lab-1", Endpoint("127.0.0.1", 16011), BackendState.READY, 1, 1),
        Backend("lab-2", Endpoint("::1", 16012), BackendState.DRAIN, 1, 7),
        # added between `show servers state` and `show stat`: its counter is not known yet
        Backend("lab-3", Endpoint("127.0.0.1", 16013), BackendState.MAINT, 0, None),
    ]


def test_commands_are_the_documented_runtime_api_lines() -> None:
    assert rt.add_server("lab-1", Endpoint("::1", 5901)) == (
        "add server desktops/lab-1 [::1]:5901 maxconn 1"
    )
    assert rt.set_state("lab-1", BackendState.DRAIN) == "set server desktops/lab-1 state drain"
    assert rt.set_address("lab-1", Endpoint("192.0.2.7", 5902)) == (
        "set server desktops/lab-1 addr 192.0.2.7 port 5902"
    )
    assert rt.del_server("lab-1") == "del server desktops/lab-1"


@pytest.mark.parametrize("name", ["lab 1", "lab-1;shutdown sessions", "lab\n1", "", "lab/1"])
def test_names_that_could_break_a_command_are_refused(name: str) -> None:
    with pytest.raises(BadInputError, match="cannot be used with HAProxy"):
        rt.set_state(name, BackendState.READY)


def test_add_and_del_replies() -> None:
    assert rt.add_outcome("add", "New server registered.\n\n") is rt.AddOutcome.ADDED
    exists = "Already exists a server with the same name in backend.\n\n"
    assert rt.add_outcome("add", exists) is rt.AddOutcome.EXISTS
    assert rt.del_outcome("del", "Server deleted.\n") is rt.DelOutcome.DELETED
    assert rt.del_outcome("del", "No such server.\n") is rt.DelOutcome.MISSING
    busy = "Server still has connections attached to it, cannot remove it.\n"
    assert rt.del_outcome("del", busy) is rt.DelOutcome.BUSY
    not_maint = "Only servers in maintenance mode can be deleted.\n"
    assert rt.del_outcome("del", not_maint) is rt.DelOutcome.BUSY


def test_a_dynamic_algorithm_error_is_reported_with_haproxys_words() -> None:
    reply = "Backend must use a dynamic load balancing to support dynamic servers.\n"
    with pytest.raises(BalancerError, match="dynamic load balancing"):
        rt.add_outcome("add server desktops/lab-1 127.0.0.1:1 maxconn 1", reply)


def test_set_state_is_silent_on_success_and_names_a_missing_server() -> None:
    rt.check_empty("set server desktops/lab-1 state ready", "\n")
    with pytest.raises(BackendNotFoundError):
        rt.check_empty("set server desktops/lab-9 state drain", "No such server.\n\n")


def test_set_address_reports_changes_in_words() -> None:
    changed = "no need to change the addr, port changed from '16001' to '16003' by 'stats socket"
    rt.check_set_address("set server desktops/a addr 127.0.0.1 port 16003", changed + "'\n")
    with pytest.raises(BalancerError, match="Invalid addr"):
        rt.check_set_address(
            "set server desktops/a addr x port 1", "Invalid addr 'x' by 'stats socket command'\n"
        )


def test_a_socket_without_admin_level_or_backend_is_an_environment_problem() -> None:
    with pytest.raises(EnvironmentMissingError, match="level admin"):
        rt.check_empty("set server desktops/a state ready", "Permission denied\n\n")
    with pytest.raises(EnvironmentMissingError, match="backend desktops"):
        rt.parse_stat("No such proxy.\n\n")


def test_pid_is_read_from_show_info() -> None:
    info = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nNbthread: 2\nPid: 12990\nUptime: 0d\n"
    assert rt.parse_info_pid(info) == 12990
    with pytest.raises(BalancerError, match="pid"):
        rt.parse_info_pid("Name: HAProxy\n")
