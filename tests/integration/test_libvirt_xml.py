"""The libvirt adapter's pure parts: domain XML, QEMU replies, events, error mapping.

No daemon needed: these run everywhere, fast.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagepipe.errors import (
    BusyError,
    CloneNotFoundError,
    FatalHypervisorError,
    HypervisorUnavailableError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import check_name, power_of
from imagepipe.hypervisors.libvirt.domain_xml import (
    AGENT_CHANNEL,
    CloneMetadata,
    DomainPlan,
    domain_xml,
    parse_domain,
    parse_guest_users,
    parse_vnc_clients,
)
from imagepipe.hypervisors.libvirt.errors import agent_late, error_for
from imagepipe.hypervisors.libvirt.events import (
    EventHub,
    agent_event,
    graphics_event,
    lifecycle_event,
    vnc_event,
)
from imagepipe.hypervisors.libvirt.hypervisor import POWER
from imagepipe.pool.model import CloneMode, Endpoint, Power
from imagepipe.pool.ports import EventKind, HypervisorEvent

META = CloneMetadata("lab", "tiny", 3, 2, CloneMode.LINKED, Path("/images/tiny/3/disk.qcow2"))


def plan(**changes: object) -> DomainPlan:
    values: dict[str, object] = {
        "name": "lab-2",
        "metadata": META,
        "memory_kib": 262144,
        "cpus": 1,
        "disk": Path("/state/disks/lab-2.qcow2"),
        "kernel": Path("/images/tiny/3/vmlinuz"),
        "initrd": Path("/images/tiny/3/initrd.img"),
        "cmdline": "console=ttyS0 imagepipe.mode=desktop",
        "display": Endpoint("127.0.0.1", 5902),
        "console_socket": Path("/state/sockets/lab-2.console"),
        "agent_socket": Path("/state/sockets/lab-2.agent"),
    }
    values.update(changes)
    return DomainPlan(**values)  # type: ignore[arg-type]


def test_domain_xml_round_trips_name_metadata_display_and_disk() -> None:
    facts = parse_domain(domain_xml(plan()))
    assert facts.name == "lab-2"
    assert facts.metadata == META
    assert facts.display == Endpoint("127.0.0.1", 5902)
    assert facts.disk == Path("/state/disks/lab-2.qcow2")


def test_domain_xml_is_a_tcg_guest_with_kernel_boot_agent_channel_and_fixed_vnc_port() -> None:
    root = ET.fromstring(domain_xml(plan()))
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/images/tiny/3/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0 imagepipe.mode=desktop"
    channel = root.find("devices/channel/target")
    assert channel is not None and channel.get("name") == AGENT_CHANNEL
    graphics = root.find("devices/graphics")
    assert graphics is not None
    assert (graphics.get("port"), graphics.get("autoport")) == ("5902", "no")
    serial = root.find("devices/serial/source")
    assert serial is not None and serial.get("path") == "/state/sockets/lab-2.console"


def test_a_disk_boot_domain_without_kernel_boots_from_its_disk() -> None:
    root = ET.fromstring(domain_xml(plan(kernel=None, initrd=None, cmdline=None)))
    assert root.find("os/kernel") is None
    boot = root.find("os/boot")
    assert boot is not None and boot.get("dev") == "hd"


def test_a_domain_without_imagepipe_metadata_is_not_ours() -> None:
    facts = parse_domain("<domain type='kvm'><name>someone-else</name></domain>")
    assert facts.metadata is None and facts.display is None


def test_metadata_with_a_broken_version_is_not_taken_for_ours() -> None:
    xml = domain_xml(plan()).replace('version="3"', 'version="three"')
    assert parse_domain(xml).metadata is None


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "x" * 64, "lab-1\n"])
def test_clone_names_that_could_escape_the_state_dir_are_refused(name: str) -> None:
    with pytest.raises(FatalHypervisorError, match="not usable"):
        check_name(name)


def test_query_vnc_reply_lists_client_addresses() -> None:
    reply = (
        '{"return": {"enabled": true, "host": "127.0.0.1", "service": "5902", "clients": ['
        '{"host": "127.0.0.1", "service": "50944", "family": "ipv4", "websocket": false},'
        '{"host": "::1", "service": "40000", "family": "ipv6", "websocket": false}]}}'
    )
    assert parse_vnc_clients(reply) == ("127.0.0.1:50944", "[::1]:40000")


def test_query_vnc_without_clients_is_no_session() -> None:
    assert parse_vnc_clients('{"return": {"enabled": true}}') == ()


def test_guest_users_come_from_libvirt_typed_parameters() -> None:
    info: dict[str, object] = {
        "user.count": 2,
        "user.0.name": "bob",
        "user.0.login-time": 1700000000000,
        "user.1.name": "alice",
    }
    assert parse_guest_users(info) == ("alice", "bob")
    assert parse_guest_users({}) == ()


def test_graphics_phases_become_session_events_with_the_client_address() -> None:
    remote = {"family": 0, "node": "10.0.0.7", "service": "51000"}
    connect = graphics_event("lab-2", 0, remote, 10.0)
    initialize = graphics_event("lab-2", 1, remote, 10.1)
    disconnect = graphics_event("lab-2", 2, remote, 20.0)
    assert connect is not None and connect.kind is EventKind.SESSION_CONNECTED
    assert connect.client == "10.0.0.7:51000"
    assert initialize is not None and initialize.kind is EventKind.SESSION_CONNECTED
    assert disconnect is not None and disconnect.kind is EventKind.SESSION_DISCONNECTED
    assert graphics_event("lab-2", 7, remote, 1.0) is None


def test_qemu_vnc_monitor_events_become_the_same_session_events() -> None:
    data = (
        '{"server": {"auth": "none", "family": "ipv4", "service": "5902", "host": "127.0.0.1",'
        ' "websocket": false}, "client": {"family": "ipv4", "service": "51000",'
        ' "host": "10.0.0.7", "websocket": false}}'
    )
    connect = vnc_event("lab-2", "VNC_CONNECTED", data, 10.0)
    initialize = vnc_event("lab-2", "VNC_INITIALIZED", data, 10.1)
    disconnect = vnc_event("lab-2", "VNC_DISCONNECTED", data, 20.0)
    remote = {"family": 0, "node": "10.0.0.7", "service": "51000"}
    assert connect == graphics_event("lab-2", 0, remote, 10.0)
    assert initialize == graphics_event("lab-2", 1, remote, 10.1)
    assert disconnect == graphics_event("lab-2", 2, remote, 20.0)
    assert vnc_event("lab-2", "VNC_SOMETHING", data, 1.0) is None
    unreadable = vnc_event("lab-2", "VNC_CONNECTED", "not json", 1.0)
    assert unreadable is not None and unreadable.client is None


def test_lifecycle_and_agent_events_name_what_happened() -> None:
    assert lifecycle_event("lab-2", 5, 1, 1.0).detail == "stopped/1"
    assert lifecycle_event("lab-2", 2, 0, 1.0).kind is EventKind.STATE_CHANGED
    assert agent_event("lab-2", 1, 1.0).detail == "connected"
    assert agent_event("lab-2", 2, 1.0).detail == "disconnected"


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (42, "Domain not found", CloneNotFoundError),
        (68, "Timed out during operation: cannot acquire state change lock", BusyError),
        (87, "resource busy", BusyError),
        (1, "cannot acquire state change lock (held by monitor=remoteDispatch)", BusyError),
        (55, "Requested operation is not valid: domain is not running", InvalidStateError),
        (1, "internal error: process exited while connecting to monitor", FatalHypervisorError),
    ],
)
def test_libvirt_errors_map_to_what_the_executor_may_retry(
    code: int, message: str, expected: type[Exception]
) -> None:
    error = error_for(code, message, "clone lab-2")
    assert type(error) is expected
    assert "lab-2" in str(error)


@pytest.mark.parametrize(
    ("code", "domain", "message", "expected"),
    [
        (1, 7, "internal error: client socket is closed", HypervisorUnavailableError),
        (38, 7, "Cannot recv data: Connection reset by peer", HypervisorUnavailableError),
        (
            38,
            13,
            "Failed to connect socket to '/run/libvirt/libvirt-sock'",
            HypervisorUnavailableError,
        ),
        (39, 7, "RPC error", HypervisorUnavailableError),
        (1, 10, "internal error: process exited while connecting to monitor", FatalHypervisorError),
        (38, 10, "Unable to read from monitor: Connection reset by peer", FatalHypervisorError),
    ],
)
def test_a_lost_connection_to_libvirtd_is_told_apart_from_a_failing_domain(
    code: int, domain: int, message: str, expected: type[Exception]
) -> None:
    """Errors of the client's RPC layer or remote driver (virErrorDomain 7, 13) are the
    connection, not the clone: retried, never counted against the desktop."""
    error = error_for(code, message, "clone lab-2", domain)
    assert type(error) is expected
    assert "lab-2" in str(error)


@pytest.mark.parametrize(
    ("code", "message", "late"),
    [
        (86, "Guest agent is not responding: Guest agent not available for now", True),
        (68, "Timed out during operation: cannot acquire state change lock (held by agent=)", True),
        (86, "Guest agent is not responding: QEMU guest agent is not connected", False),
        (
            86,
            "Guest agent is not responding: QEMU guest agent is not available due to an error",
            False,
        ),
        (55, "Requested operation is not valid: domain is not running", False),
        (1, "internal error: unable to execute QEMU agent command 'guest-get-users'", False),
    ],
)
def test_a_guest_agent_that_answered_late_is_told_apart_from_one_that_is_not_there(
    code: int, message: str, *, late: bool
) -> None:
    """libvirt gives a timeout and "not connected" the same code (VIR_ERR_AGENT_UNRESPONSIVE):
    only a late reply or a busy job leaves the answer unknown; no agent, a domain that is not
    running or an error reply mean "no"."""
    assert agent_late(code, message) is late


def test_after_a_reconnect_agents_are_asked_again_vnc_times_are_kept_and_no_reset_is_forced() -> (
    None
):
    now = [10.0]
    hub = EventHub(lambda: now[0])
    hub.adopt("lab-1")
    hub.adopt("lab-2")
    events: list[HypervisorEvent] = []
    hub.subscribe(events.append)
    assert hub.vnc_clients_now("lab-1", ("127.0.0.1:5000",)) == ("127.0.0.1:5000", 10.0)
    hub.set_agent_up("lab-1", True)
    now[0] = 20.0

    hub.reconnected()

    # no blanket "possibly used": the balancer's counters tell who came meanwhile
    assert events == []
    assert hub.agent_up("lab-1") is None  # asked again
    # the client QEMU still lists keeps its connect time; one that left is gone
    assert hub.vnc_clients_now("lab-1", ("127.0.0.1:5000",)) == ("127.0.0.1:5000", 10.0)
    assert hub.vnc_clients_now("lab-1", ()) == (None, None)


def test_libvirt_states_map_to_power() -> None:
    assert [power_of(s, POWER) for s in (1, 3, 5, 6, 7, 4)] == [
        Power.RUNNING,
        Power.SUSPENDED,
        Power.SHUTOFF,
        Power.CRASHED,
        Power.SUSPENDED,
        Power.OTHER,
    ]
