"""Error messages that tell the user to change a setting name a key that exists."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from imagepipe import schema
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.config import PoolFile, Settings
from imagepipe.errors import EnvironmentMissingError, FatalHypervisorError
from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
from imagepipe.pool.model import Endpoint
from imagepipe.schema import Section


def key_exists(model: type[Section], dotted: str) -> bool:
    current: type[Section] | None = model
    for part in dotted.split("."):
        fields = {f.name: f for f in schema.fields(current)} if current is not None else {}
        if part not in fields:
            return False
        current = fields[part].holds
    return True


def named_keys(message: str) -> list[str]:
    return re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", message)


def test_a_busy_display_port_names_the_pool_key_display_port_range() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hypervisor = LibvirtHypervisor.__new__(LibvirtHypervisor)  # no libvirt connection needed
        with pytest.raises(FatalHypervisorError) as caught:
            hypervisor._refuse_busy_port("lab-0", Endpoint("127.0.0.1", port))
    message = str(caught.value)
    assert "display.port_range" in message
    assert "port_first" not in message
    assert all(key_exists(PoolFile, key) for key in named_keys(message) if "." in key)


def test_an_unmanaged_haproxy_that_does_not_answer_names_the_setting_balancer_manage(
    tmp_path: Path,
) -> None:
    adapter = HAProxyBalancer(
        bind="127.0.0.1:5999",
        admin_socket=tmp_path / "absent.sock",
        config_path=tmp_path / "haproxy.cfg",
        pid_file=tmp_path / "haproxy.pid",
        manage=False,
        timeout=0.5,
    )
    with pytest.raises(EnvironmentMissingError) as caught:
        adapter.ensure_frontend()
    message = str(caught.value)
    assert "balancer.manage: true" in message
    assert "haproxy.manage" not in message
    assert key_exists(Settings, "balancer.manage")


def test_the_key_checker_refuses_keys_that_do_not_exist() -> None:
    assert not key_exists(Settings, "balancer.haproxy.manage")
    assert not key_exists(PoolFile, "port_first")
    assert key_exists(PoolFile, "display.port_range")
