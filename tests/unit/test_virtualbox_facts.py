"""The VirtualBox adapter's pure rules: versions, result codes, metadata, guest properties."""

from __future__ import annotations

import pytest

from imagepipe.errors import (
    BusyError,
    CloneNotFoundError,
    EnvironmentMissingError,
    FatalHypervisorError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import power_of
from imagepipe.hypervisors.virtualbox.facts import (
    POWER,
    CloneMeta,
    error_for,
    parse_meta,
    parse_users,
    version_api,
)
from imagepipe.pool.model import CloneMode, Endpoint, Power


@pytest.mark.parametrize(
    ("version", "running", "paused"),
    [("6.1.50", 5, 6), ("7.0.14_Debian r161095", 6, 7), ("7.1.4", 6, 7)],
)
def test_machine_states_are_read_by_value_through_the_hosts_own_table(
    version: str, running: int, paused: int
) -> None:
    api = version_api(version)
    assert api.state_name(running) == "Running"
    assert api.state_name(paused) == "Paused"


def test_virtualbox_7_has_the_aborted_saved_state_6_1_lacks() -> None:
    assert version_api("7.0.0").state_name(5) == "AbortedSaved"
    assert version_api("6.1.0").state_name(5) == "Running"


def test_create_machine_takes_the_parameters_of_each_version() -> None:
    six = version_api("6.1.50").create_machine_args("/f.vbox", "lab-1", "/imagepipe/lab")
    seven = version_api("7.0.10").create_machine_args("/f.vbox", "lab-1", "/imagepipe/lab")
    seven_one = version_api("7.1.2").create_machine_args("/f.vbox", "lab-1", "/imagepipe/lab")
    assert six == ["/f.vbox", "lab-1", ["/imagepipe/lab"], "Other_64", "forceOverwrite=1"]
    assert seven == [*six, "", "", ""]
    assert seven_one == ["/f.vbox", "lab-1", 1, *six[2:], "", "", ""]


def test_a_virtualbox_older_than_6_1_is_refused_with_what_to_install() -> None:
    with pytest.raises(EnvironmentMissingError, match=r"6\.1 or 7\.x"):
        version_api("5.2.44")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (0x80BB0001, CloneNotFoundError),
        (0x80BB0007, BusyError),
        (0x80070005, BusyError),
        (-0x7FF8FFFB, BusyError),  # E_ACCESSDENIED as xpcom's signed errno
        (0x80BB0002, InvalidStateError),
        (0x80BB0004, FatalHypervisorError),
    ],
)
def test_result_codes_become_the_ports_typed_errors(code: int, error: type) -> None:
    assert isinstance(error_for(code, "text", "clone lab-1"), error)


def test_a_fatal_error_keeps_the_api_error_text() -> None:
    message = str(error_for(0x80BB0004, "Could not find file", "clone lab-1"))
    assert "Could not find file" in message and "0x80BB0004" in message


def test_metadata_round_trips_through_extra_data() -> None:
    meta = CloneMeta("lab", "win10", 3, 2, CloneMode.FULL, Endpoint("127.0.0.1", 5002))
    assert parse_meta(meta.extra_data()) == meta


def test_a_machine_with_incomplete_metadata_is_not_a_clone() -> None:
    extra = CloneMeta("lab", "tiny", 1, 0, CloneMode.LINKED, Endpoint("h", 1)).extra_data()
    del extra["imagepipe/slot"]
    assert parse_meta(extra) is None


def test_users_come_from_the_logged_in_users_list() -> None:
    assert parse_users("bob,alice", "2") == ("alice", "bob")
    assert parse_users("", "0") == ()
    assert parse_users("alice", "0") == ()


def test_saved_and_paused_machines_count_as_suspended() -> None:
    assert power_of("Saved", POWER) is Power.SUSPENDED
    assert power_of("Paused", POWER) is Power.SUSPENDED
    assert power_of("Aborted", POWER) is Power.CRASHED
    assert power_of("Starting", POWER) is Power.OTHER
