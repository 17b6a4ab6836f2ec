"""HAProxyBalancer decisions that a real HAProxy cannot be made to show on cue: the admin socket
is replaced by a script of replies captured from HAProxy 2.6."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.errors import BadInputError, BalancerError
from imagepipe.pool.model import BackendState, Endpoint
from tests.unit.test_haproxy_runtime import STAT_HEADER, STATE_HEADER, state_row


@dataclass
class ScriptedAdmin:
    """Answers each command with the next scripted reply and records what was sent."""

    replies: dict[str, Iterator[str]]
    sent: list[str] = field(default_factory=list)
    path: Path = Path("/run/imagepipe/haproxy.sock")

    def command(self, line: str) -> str:
        self.sent.append(line)
        return next(self.replies[line])


def balancer(replies: dict[str, list[str]]) -> tuple[HAProxyBalancer, ScriptedAdmin]:
    adapter = HAProxyBalancer(
        bind="127.0.0.1:5999",
        admin_socket=Path("/run/imagepipe/haproxy.sock"),
        config_path=Path("/run/imagepipe/haproxy.cfg"),
        pid_file=Path("/run/imagepipe/haproxy.pid"),
        manage=False,
    )
    admin = ScriptedAdmin({k: iter(v) for k, v in replies.items()})
    adapter.admin = admin  # type: ignore[assignment]
    return adapter, admin


def one_server(admin_state: int) -> str:
    return f"1\n{STATE_HEADER}\n{state_row('lab-1', '127.0.0.1', 5901, admin_state)}\n\n"


IDLE = (
    f"{STAT_HEADER}\ndesktops,lab-1,0,0,0,0,1,0,0,0,,0,,0,0,0,0,DRAIN,1,1,0,,,0,,,1,3,1,,0,,2,0\n"
)


def test_a_connection_arriving_during_remove_puts_the_backend_back_as_it_was() -> None:
    adapter, admin = balancer(
        {
            "show servers state desktops": [one_server(8)],
            "show stat desktops 4 -1": [IDLE],
            "set server desktops/lab-1 state maint": ["\n"],
            "del server desktops/lab-1": [
                "Server still has connections attached to it, cannot remove it.\n"
            ],
            "set server desktops/lab-1 state drain": ["\n"],
        }
    )
    with pytest.raises(BalancerError, match="got a connection while being removed"):
        adapter.remove("lab-1")
    assert admin.sent[-3:] == [
        "set server desktops/lab-1 state maint",
        "del server desktops/lab-1",
        "set server desktops/lab-1 state drain",
    ]


def test_enable_of_a_backend_at_a_new_address_moves_it_then_makes_it_ready() -> None:
    adapter, admin = balancer(
        {
            "show servers state desktops": [one_server(8)],
            "set server desktops/lab-1 addr 127.0.0.1 port 5911": [
                "no need to change the addr, port changed from '5901' to '5911' by 'stats "
                "socket command'\n"
            ],
            "set server desktops/lab-1 state ready": ["\n"],
        }
    )
    adapter.enable("lab-1", Endpoint("127.0.0.1", 5911))
    assert admin.sent == [
        "show servers state desktops",
        "set server desktops/lab-1 addr 127.0.0.1 port 5911",
        "set server desktops/lab-1 state ready",
    ]


def test_enable_of_a_new_backend_adds_it_in_maintenance_then_makes_it_ready() -> None:
    adapter, admin = balancer(
        {
            "show servers state desktops": [f"1\n{STATE_HEADER}\n\n"],
            "add server desktops/lab-1 127.0.0.1:5901 maxconn 1": ["New server registered.\n"],
            "set server desktops/lab-1 state ready": ["\n"],
        }
    )
    adapter.enable("lab-1", Endpoint("localhost", 5901))
    assert admin.sent[1:] == [
        "add server desktops/lab-1 127.0.0.1:5901 maxconn 1",
        "set server desktops/lab-1 state ready",
    ]


def test_a_closed_adapter_refuses_work() -> None:
    adapter, _ = balancer({})
    adapter.close()
    with pytest.raises(BalancerError, match="closed"):
        adapter.list_backends()


def test_bad_settings_are_refused_before_anything_runs() -> None:
    with pytest.raises(BadInputError, match="balance"):
        HAProxyBalancer(
            bind="127.0.0.1:5999",
            admin_socket=Path("s"),
            config_path=Path("c"),
            pid_file=Path("p"),
            manage=True,
            balance="source",
        )
    with pytest.raises(BadInputError, match="bind"):
        HAProxyBalancer(
            bind="5999",
            admin_socket=Path("s"),
            config_path=Path("c"),
            pid_file=Path("p"),
            manage=True,
        )


def test_states_read_back_are_the_port_states() -> None:
    adapter, _ = balancer(
        {"show servers state desktops": [one_server(8)], "show stat desktops 4 -1": [IDLE]}
    )
    assert [(b.name, b.state) for b in adapter.list_backends()] == [("lab-1", BackendState.DRAIN)]
