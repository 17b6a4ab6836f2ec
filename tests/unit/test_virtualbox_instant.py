"""Instant desktops on the VirtualBox adapter over the simulated vboxapi (in-memory guests whose
Guest Additions report at once): what VirtualBox ends up holding, and what imagepipe reports."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import InvalidStateError
from imagepipe.hypervisors.virtualbox.facts import started_by, warm_key
from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power, StartMode
from imagepipe.record import replace
from tests import vboxsim
from tests.host import free_port
from tests.vboxsim import codes as C
from tests.vboxsim.api import Host, MachineData
from tests.vboxsim.fixtures import base_vm, blank_disk

MiB = 1024**2


@pytest.fixture(params=["6.1.50", "7.1.4"])
def sim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    host = vboxsim.start(tmp_path / "vbox", version=request.param)
    yield host
    vboxsim.stop(host)


@pytest.fixture
def base(sim: Host, tmp_path: Path) -> BaseImage:
    return base_vm(sim, blank_disk(tmp_path / "img" / "disk.qcow2"))


@pytest.fixture
def hv(sim: Host) -> Iterator[VirtualBoxHypervisor]:
    adapter = VirtualBoxHypervisor(stop_poll=0.05)
    yield adapter
    adapter.close()


def spec(base: BaseImage, slot: int = 0, **changes: object) -> CloneSpec:
    made = CloneSpec(f"lab-{slot}", "lab", slot, base, CloneMode.LINKED, 2, 256 * MiB,
                     Endpoint("127.0.0.1", free_port()))  # fmt: skip
    return replace(made, **changes)  # type: ignore[arg-type]


def parents(sim: Host) -> list[MachineData]:
    return [m for m in sim.machines.values() if m.groups == ["/imagepipe-warm"]]


def listed(hv: VirtualBoxHypervisor, name: str) -> tuple[Power, StartMode | None]:
    (info,) = [c for c in hv.list_clones() if c.name == name]
    return info.power, info.started_by


def test_a_clone_is_saved_with_its_parents_memory_and_listed_as_off_until_started(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    (parent,) = parents(sim)
    assert parent.state == "PoweredOff" and (parent.memory_mb, parent.cpus) == (256, 2)
    (warm,) = parent.snapshots
    assert warm.name == "imagepipe-warm" and warm.state_file is not None
    clone = sim.by_name("lab-0")
    assert clone.state == "Saved" and clone.saved_state is not None
    assert clone.saved_state.parent == clone.settings_file.parent / "Snapshots"  # a copy
    assert clone.saved_state.read_bytes() == warm.state_file.read_bytes()
    (clean,) = clone.snapshots
    assert clean.state_file == clone.saved_state  # the clean snapshot shares it
    assert listed(hv, "lab-0") == (Power.SHUTOFF, None)
    hv.stop("lab-0", 1.0)  # off already: nothing to do
    assert sim.by_name("lab-0").state == "Saved"


def test_start_and_reset_resume_the_clean_state_and_say_so(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    clean = sim.by_name("lab-0").snapshots[0].state_file
    assert clean is not None
    hv.start("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.RESTORE)
    props = sim.by_name("lab-0").guest_props
    assert props["/imagepipe/identity/hostname"][0] == "lab-0"  # ClonePrep: its name
    assert clean.is_file()  # resuming used it; the clean snapshot keeps it
    used = sim.by_name("lab-0").disk
    hv.reset("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.RESTORE)
    assert sim.by_name("lab-0").disk is not used and clean.is_file()


def test_a_pool_that_boots_gets_powered_off_clones_of_the_version_and_no_parent(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base, start=StartMode.BOOT))
    assert sim.by_name("lab-0").state == "PoweredOff" and parents(sim) == []
    hv.start("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.BOOT)
    hv.reset("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.BOOT)


def test_one_parent_per_version_and_shape(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base, 0))
    hv.create_clone(spec(base, 1))
    assert len(parents(sim)) == 1
    hv.create_clone(spec(base, 2, cpus=1))
    assert len(parents(sim)) == 2
    assert {(p.cpus, p.memory_mb) for p in parents(sim)} == {(2, 256), (1, 256)}


def test_a_suspended_restored_desktop_keeps_its_own_session_and_resumes_it(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    hv.start("lab-0")
    hv.suspend("lab-0")
    data = sim.by_name("lab-0")
    assert data.saved_state is not None and data.saved_state != data.snapshots[0].state_file
    assert listed(hv, "lab-0") == (Power.SUSPENDED, StartMode.RESTORE)
    with pytest.raises(InvalidStateError, match="resume it"):
        hv.start("lab-0")
    hv.resume("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.RESTORE)


def test_suspend_and_resume_of_a_clone_never_started_are_refused_as_off(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    for call in (hv.suspend, hv.resume):
        with pytest.raises(InvalidStateError, match="off"):
            call("lab-0")
    assert sim.by_name("lab-0").state == "Saved"


def test_a_machine_in_the_parents_place_makes_desktops_boot_and_is_said_once(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    base_data = sim.by_name(base.vm or "")
    key = warm_key(
        image="tiny",
        version=1,
        cpus=2,
        memory_mb=256,
        base_vm_id=base_data.id,
        base_snapshot_id=base_data.snapshots[0].id,
        virtualbox=sim.version,
    )
    sim.create_base_vm(key.name, blank_disk(sim.home / "other.qcow2"), snapshot=None)
    caplog.set_level(logging.WARNING, logger="imagepipe")
    for slot in (0, 1):
        hv.create_clone(spec(base, slot))
        assert sim.by_name(f"lab-{slot}").state == "PoweredOff"
    said = [r.getMessage() for r in caplog.records if "warm parent" in r.getMessage()]
    assert len(said) == 1 and "is not the warm parent" in said[0], said
    hv.start("lab-0")
    assert listed(hv, "lab-0") == (Power.RUNNING, StartMode.BOOT)


def test_a_parent_left_half_made_is_made_again(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base, 0))
    (parent,) = parents(sim)
    hv.delete("lab-0")
    # as after a crash between registering the parent and its snapshot
    parent.snapshots[0].state_file = None
    hv.create_clone(spec(base, 1))
    (again,) = parents(sim)
    assert again.id != parent.id and again.snapshots[0].state_file is not None
    assert sim.by_name("lab-1").state == "Saved"


def test_the_simulator_refuses_what_virtualbox_refuses(sim: Host, base: BaseImage) -> None:
    import virtualbox

    lib = virtualbox.library
    vbox = virtualbox.VirtualBox()
    machine = vbox.find_machine(base.vm or "")
    session = virtualbox.Session()
    machine.lock_machine(session, lib.LockType.write)
    try:
        with pytest.raises(lib.VBoxError) as live:  # a live snapshot of a stopped machine
            session.machine.take_snapshot("live", "", False)
        assert live.value.value & 0xFFFFFFFF == C.VBOX_E_INVALID_VM_STATE
        target = lib.IMachine(vbox._call("createMachine", in_p=_args(sim, "copy")))
        with pytest.raises(lib.VBoxError) as mutable:  # cloneTo from a session's machine
            session.machine.clone_to(target, lib.CloneMode(1), [])
        assert mutable.value.value & 0xFFFFFFFF == C.E_INVALIDARG
    finally:
        session.unlock_machine()


def test_started_by_reads_back_what_the_adapter_wrote() -> None:
    assert started_by("restore") is StartMode.RESTORE
    assert started_by("boot") is StartMode.BOOT
    assert started_by("") is None and started_by("nonsense") is None


def _args(sim: Host, name: str) -> list[object]:
    from imagepipe.hypervisors.virtualbox.facts import version_api

    return version_api(sim.version).create_machine_args("", name, "/")


@pytest.mark.parametrize("clone_left", [False, True])
def test_a_newer_versions_parent_retires_the_older_one_once_no_clone_links_to_it(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor, tmp_path: Path, clone_left: bool
) -> None:
    hv.create_clone(spec(base, 0))
    (old,) = parents(sim)
    if not clone_left:
        hv.delete("lab-0")
    newer = base_vm(sim, blank_disk(tmp_path / "img2" / "disk.qcow2"), version=2)
    hv.create_clone(spec(newer, 1))
    names = {p.name for p in parents(sim)}
    assert (old.name in names) is clone_left and len(names) == 1 + clone_left
    if not clone_left:  # its disks went with it: the version's snapshot is free again
        assert not Path(old.settings_file).parent.exists()
        base_data = sim.by_name(base.vm or "")  # its snapshot's disk: only the VM's own child
        assert base_data.snapshots[0].medium.children == [base_data.disk]
