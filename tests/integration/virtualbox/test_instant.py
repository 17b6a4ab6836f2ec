"""Instant desktops on the VirtualBox adapter with real guests: the simulated VirtualBox runs
each machine as a QEMU guest of the tiny image (TCG). A clone of a version starts Saved with
its warm parent's memory and resumes; a reset resumes clean memory and a clean disk; when no
parent can be made, desktops boot and the log says so once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneMode,
    CloneSpec,
    Power,
    StartMode,
)
from imagepipe.record import replace
from tests.guest import SerialConsole
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import tiny_vm, vnc_display
from tests.vboxsim.process import QemuProcess

pytestmark = [pytest.mark.real, pytest.mark.slow]

READY_TIMEOUT = 120.0


@pytest.fixture
def make_spec(base: BaseImage) -> Callable[..., CloneSpec]:
    def make(slot: int = 1, start: StartMode = StartMode.RESTORE) -> CloneSpec:
        return CloneSpec(f"vbi-{slot}", "vbi", slot, base, CloneMode.LINKED, 1, 128 * 1024**2,
                         vnc_display(), start=start)  # fmt: skip

    return make


def wait_ready(hv: VirtualBoxHypervisor, name: str) -> CloneInfo:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        (info,) = [c for c in hv.list_clones() if c.name == name]
        if info.ready:
            return info
        assert time.monotonic() < deadline, f"{name} not ready after {READY_TIMEOUT} s"
        time.sleep(0.2)


def console(sim: Host, name: str) -> SerialConsole:
    process = sim.by_name(name).process
    assert isinstance(process, QemuProcess)
    return SerialConsole(process.console_path, timeout=120)


def test_a_clone_of_a_version_starts_saved_and_resumes_with_its_own_name_and_the_time(
    sim: Host, hv: VirtualBoxHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec()
    created = hv.create_clone(spec)
    assert created.power is Power.SHUTOFF  # to imagepipe: off, ready to start
    assert sim.by_name(spec.name).state == "Saved"  # to VirtualBox: the parent's memory
    hv.start(spec.name)
    info = wait_ready(hv, spec.name)
    assert info.started_by is StartMode.RESTORE
    with console(sim, spec.name) as guest:
        guest.login("alice")
        assert guest.run("hostname") == spec.name
        assert abs(int(guest.run("date +%s")) - time.time()) < 10


def test_a_reset_resumes_clean_memory_and_a_clean_disk(
    sim: Host, hv: VirtualBoxHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec()
    hv.create_clone(spec)
    hv.start(spec.name)
    wait_ready(hv, spec.name)
    with console(sim, spec.name) as guest:
        guest.login("alice")
        guest.run("echo secret > /home/alice/note; echo in-memory > /run/alice-was-here; sync")
        guest.logout()
    hv.reset(spec.name)
    assert wait_ready(hv, spec.name).started_by is StartMode.RESTORE
    with console(sim, spec.name) as guest:
        guest.login("bob")
        assert guest.run("ls /home") == "bob         lost+found"
        assert "No such file" in guest.run("cat /run/alice-was-here 2>&1")
        assert guest.run("hostname") == spec.name


def test_desktops_resumed_from_one_parent_share_no_writable_state(
    sim: Host, hv: VirtualBoxHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    first, second = make_spec(1), make_spec(2)
    for spec in (first, second):
        hv.create_clone(spec)
        hv.start(spec.name)
    for spec in (first, second):
        assert wait_ready(hv, spec.name).started_by is StartMode.RESTORE
    disks = {sim.by_name(s.name).disk.location for s in (first, second)}  # type: ignore[union-attr]
    assert len(disks) == 2
    with console(sim, first.name) as guest:
        guest.login("alice")
        guest.run("echo secret > /home/alice/note; sync")
    with console(sim, second.name) as guest:
        guest.login("bob")
        assert "No such file" in guest.run("cat /home/alice/note 2>&1")


def test_a_pool_that_chooses_boot_boots_and_a_stopped_desktop_boots_on_its_own_disk(
    sim: Host, hv: VirtualBoxHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    booting, restoring = make_spec(1, StartMode.BOOT), make_spec(2)
    hv.create_clone(booting)
    assert sim.by_name(booting.name).state == "PoweredOff"
    hv.start(booting.name)
    assert wait_ready(hv, booting.name).started_by is StartMode.BOOT
    hv.create_clone(restoring)
    hv.start(restoring.name)
    wait_ready(hv, restoring.name)
    with console(sim, restoring.name) as guest:
        guest.login("alice")
        guest.run("echo kept > /home/alice/note; sync")
        guest.logout()
    hv.stop(restoring.name, timeout=30.0)
    hv.start(restoring.name)
    assert wait_ready(hv, restoring.name).started_by is StartMode.BOOT
    with console(sim, restoring.name) as guest:
        guest.login("alice")
        assert guest.run("cat /home/alice/note") == "kept"


def test_when_no_warm_parent_can_be_made_desktops_boot_and_it_is_said_once(
    sim: Host,
    workdir: Path,
    hv: VirtualBoxHypervisor,
    make_spec: Callable[..., CloneSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a version whose guest powers off instead of reporting: no parent can be saved from it
    broken = tiny_vm(
        sim, workdir / "tiny-v7", version=7, cmdline="console=ttyS0 quiet imagepipe.mode=build"
    )
    caplog.set_level(logging.WARNING, logger="imagepipe")
    specs = [replace(make_spec(slot), base=broken) for slot in (1, 2)]
    for spec in specs:
        assert hv.create_clone(spec).power is Power.SHUTOFF
        assert sim.by_name(spec.name).state == "PoweredOff"  # from the version: it boots
    said = [r.getMessage() for r in caplog.records if "boot instead" in r.getMessage()]
    assert len(said) == 1, said
    assert "no warm parent for tiny v7" in said[0] and "stopped before" in said[0]
    assert not [m for m in sim.machines.values() if m.groups == ["/imagepipe-warm"]]


def test_a_resume_that_fails_boots_the_desktop_and_says_so_once(
    sim: Host,
    hv: VirtualBoxHypervisor,
    make_spec: Callable[..., CloneSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    specs = [make_spec(1), make_spec(2)]
    for spec in specs:
        hv.create_clone(spec)
        state = sim.by_name(spec.name).saved_state
        assert state is not None
        with open(state, "r+b") as handle:  # a saved state QEMU cannot load: cut short
            handle.truncate(64 * 1024)
    caplog.set_level(logging.WARNING, logger="imagepipe")
    for spec in specs:
        hv.start(spec.name)
    for spec in specs:
        assert wait_ready(hv, spec.name).started_by is StartMode.BOOT
    said = [r.getMessage() for r in caplog.records if "boot instead" in r.getMessage()]
    assert len(said) == 1, said
    assert "resuming" in said[0] and "tiny v1" in said[0]
