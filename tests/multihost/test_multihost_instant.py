"""Instant desktops (start: restore) on remote libvirt hosts of the lab (lab.py).

A pool that restores from a warm parent, spread over host2 (qemu+tcp) and host3 (qemu+tls):
each host that gets desktops makes its own warm parent, as volumes of its storage pool; the
desktops are restored, not booted, each with its own name and its own VNC display on its
host's address; a reset restores again onto a clean disk. Everything on the hosts is done
through libvirt calls (the saved state's header is rewritten with vol.upload at an offset).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt.multihost import TIDY_EVERY, MultiHostHypervisor
from imagepipe.hypervisors.libvirt.remote import SOCKET_DIR
from imagepipe.hypervisors.libvirt.volumes import POOL_NAME, write_volume
from imagepipe.pool.model import BaseImage, CloneInfo, Power, StartMode
from imagepipe.record import replace
from tests.guest import SerialConsole, VncClient
from tests.multihost.conftest import remove_version
from tests.multihost.lab import HostLab, NamespacedHost
from tests.multihost.test_multihost_libvirt import (
    clean,
    domain_id,
    host_specs,
    lab_spec,
    make_hv,
    volumes_of,
)

pytestmark = pytest.mark.real

POOL = "mw"
READY_TIMEOUT = 180.0


@pytest.fixture
def instant(lab: HostLab, lab_base: BaseImage, tmp_path: Path) -> Iterator[MultiHostHypervisor]:
    """Pool `mw` (start: restore): mw-1 on host2, mw-2 and mw-3 on host3 (TLS), made the way
    the keeper makes them: one create per host at a time, the hosts side by side."""
    hv = make_hv(lab, tmp_path / "state")
    host2, host3 = lab.hosts[1], lab.hosts[2]
    placed = {1: host2, 2: host3, 3: host3}
    try:
        hv.list_clones()

        def create_on(host: NamespacedHost) -> None:
            for slot, where in placed.items():
                if where is host:
                    spec = replace(lab_spec(lab_base, POOL, slot, host), start=StartMode.RESTORE)
                    hv.create_clone(spec)

        with concurrent.futures.ThreadPoolExecutor(2) as creators:
            list(creators.map(create_on, (host2, host3)))
        for slot in placed:
            hv.start(f"{POOL}-{slot}")
        yield hv
    finally:
        clean(hv, POOL)


def wait_ready(hv: MultiHostHypervisor, name: str) -> CloneInfo:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        found = [c for c in hv.list_clones() if c.name == name]
        if found and found[0].ready:
            return found[0]
        assert time.monotonic() < deadline, f"{name} not ready after {READY_TIMEOUT} s"
        time.sleep(0.3)


def parents_on(host: NamespacedHost) -> set[str]:
    """The warm parents complete on the host (their manifest volume is made last)."""
    return {v.removesuffix(".json") for v in volumes_of(host) if v.endswith(".json")}


def warm_key_of(host: NamespacedHost, name: str) -> str:
    """The warm parent a desktop backs on, from its domain's imagepipe metadata."""
    import libvirt

    conn = libvirt.open(host.uri)
    try:
        found = re.search(r' warm="([^"]+)"', conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    assert found is not None, f"{name} names no warm parent"
    return found.group(1)


def console(host: NamespacedHost, name: str) -> SerialConsole:
    return SerialConsole(host.path(f"{SOCKET_DIR}/imagepipe-{name}.console"))


def test_desktops_on_remote_hosts_are_restored_from_a_warm_parent_made_on_each_host(
    lab: HostLab, instant: MultiHostHypervisor
) -> None:
    _, host2, host3 = lab.hosts
    clones = {n: wait_ready(instant, n) for n in ("mw-1", "mw-2", "mw-3")}
    assert {n: (c.host, c.power, c.started_by) for n, c in clones.items()} == {
        "mw-1": ("host2", Power.RUNNING, StartMode.RESTORE),
        "mw-2": ("host3", Power.RUNNING, StartMode.RESTORE),
        "mw-3": ("host3", Power.RUNNING, StartMode.RESTORE),
    }
    # a parent on each host that got desktops (the same machine shape: the same key), made
    # through libvirt as volumes of the host's pool
    key = warm_key_of(host2, "mw-1")
    assert warm_key_of(host3, "mw-2") == warm_key_of(host3, "mw-3") == key
    assert key in parents_on(host2) and key in parents_on(host3)
    assert {f"{key}.qcow2", f"{key}.save"} <= set(volumes_of(host3))
    # a clone's own saved state is used once: gone after its restore
    assert not {f"mw-{slot}.save" for slot in (1, 2, 3)} & set(
        volumes_of(host3) + volumes_of(host2)
    )

    # each desktop's own VNC display, on its host's address (QEMU names it after the domain)
    for name, host, port in (("mw-1", host2, 5901), ("mw-2", host3, 5902), ("mw-3", host3, 5903)):
        vnc = VncClient(host.address, port)
        try:
            assert vnc.handshake() == f"QEMU ({name})"
        finally:
            vnc.close()
    with console(host3, "mw-2") as tty:  # the restored guest took its own name
        tty.login("alice")
        assert tty.run("hostname") == "mw-2"
        tty.run("echo secret > /home/alice/note; sync")
        tty.logout()

    before = domain_id(host3, "mw-2")
    instant.reset("mw-2")
    again = wait_ready(instant, "mw-2")
    assert (again.started_by, again.host) == (StartMode.RESTORE, "host3")
    assert domain_id(host3, "mw-2") != before
    with console(host3, "mw-2") as tty:
        tty.login("bob")
        assert tty.run("ls /home") == "bob         lost+found"
        assert tty.run("hostname") == "mw-2"
    assert warm_key_of(host3, "mw-2") == key  # the reset used the same parent


def test_a_desktop_whose_saved_state_on_its_host_is_damaged_boots_and_says_so_once(
    lab: HostLab, lab_base: BaseImage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The header of the desktop's own saved state on host2 is overwritten (in place, by a
    volume upload at offset 0): start does not restore it, removes it and boots the
    version's disk, and the log says why once."""
    import libvirt

    host2 = lab.hosts[1]
    hv = make_hv(lab, tmp_path / "state")
    try:
        hv.list_clones()
        spec = replace(lab_spec(lab_base, "mwd", 1, host2), start=StartMode.RESTORE)
        hv.create_clone(spec)
        assert "mwd-1.save" in volumes_of(host2)
        conn = libvirt.open(host2.uri)
        try:
            vol = conn.storagePoolLookupByName(POOL_NAME).storageVolLookupByName("mwd-1.save")
            write_volume(libvirt, conn, vol, 0, b"\0" * 16)
        finally:
            conn.close()
        with caplog.at_level(logging.WARNING):
            hv.start(spec.name)
        (info,) = [c for c in hv.list_clones() if c.name == spec.name]
        assert (info.power, info.started_by, info.host) == (Power.RUNNING, StartMode.BOOT, "host2")
        assert "mwd-1.save" not in volumes_of(host2)
        said = [r.getMessage() for r in caplog.records if "saved state of mwd-1" in r.getMessage()]
        assert len(said) == 1 and "not a libvirt saved state" in said[0]
        vnc = VncClient(host2.address, 5901)
        try:
            assert vnc.handshake() == "QEMU (mwd-1)"
        finally:
            vnc.close()
    finally:
        clean(hv, "mwd")


def test_a_pruned_version_leaves_a_host_with_its_warm_parent_once_no_desktop_uses_it(
    lab: HostLab, lab_base: BaseImage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry pruned v8: the keeper's observation tidies each host every TIDY_EVERY
    seconds. While a desktop's disk backs onto v8's warm parent on host2, v8 stays there (and
    the log says why, once); once the desktop is gone, v8's volumes and its parent go."""
    host2 = lab.hosts[1]
    base = replace(lab_base, version=8)
    now = [1_000_000.0]
    hv = make_hv(lab, tmp_path / "state", clock=lambda: now[0])
    hv.tidy_with(lambda image, version: (image, version) == ("tinymh", 8))

    def of_v8() -> set[str]:
        return {v for v in volumes_of(host2) if v.startswith("tinymh_v8")}

    try:
        hv.list_clones()
        deadline = time.monotonic() + 60
        while not hv.ensure_version("host2", lab_base):  # v1, not pruned, is there too
            assert time.monotonic() < deadline, "v1 was not sent to host2 within 60 s"
            time.sleep(0.1)
        hv.create_clone(replace(lab_spec(base, "mwp", 1, host2), start=StartMode.RESTORE))
        (key,) = {warm_key_of(host2, "mwp-1")}
        assert key in parents_on(host2) and "tinymh_v8.ready" in of_v8()

        with caplog.at_level(logging.INFO):
            assert hv.tidy("host2") == []
            assert hv.tidy("host2") == []
        kept = [r for r in caplog.records if r.getMessage().startswith("pruned version kept")]
        assert [getattr(r, "imagepipe_fields", {}).get("reason") for r in kept] == [
            "the disk mwp-1.qcow2 backs onto it"
        ]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert "tinymh_v8.ready" in of_v8() and key in parents_on(host2)

        hv.delete("mwp-1")
        now[0] += TIDY_EVERY
        hv.list_clones()  # the observation starts the tidy in the background
        deadline = time.monotonic() + 30
        while of_v8() or key in parents_on(host2):
            assert time.monotonic() < deadline, f"v8 still on host2: {sorted(of_v8())}"
            time.sleep(0.2)
        assert not {v for v in volumes_of(host2) if v.startswith(key)}
        assert ("tinymh", 8) not in next(h for h in hv.hosts() if h.name == "host2").versions
        assert "tinymh_v1.ready" in volumes_of(host2)  # a version not pruned stays
    finally:
        clean(hv, "mwp")
        remove_version(host_specs(lab)[1], base)
