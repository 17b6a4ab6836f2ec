"""The VirtualBox adapter over the simulated vboxapi: what a user of the pool sees, and the
pyvbox defects it works around."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import BusyError, DisplayInUseError, FatalHypervisorError
from imagepipe.hypervisors.virtualbox.events import EventHub
from imagepipe.hypervisors.virtualbox.facts import version_api
from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import EventKind, HypervisorEvent
from tests import vboxsim
from tests.host import free_port
from tests.vboxsim.api import Host, Session
from tests.vboxsim.fixtures import base_vm, blank_disk

MiB = 1024**2


@pytest.fixture(params=["6.1.50", "7.0.14"])
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


def spec(base: BaseImage, slot: int = 0, port: int | None = None) -> CloneSpec:
    return CloneSpec(
        name=f"lab-{slot}",
        pool="lab",
        slot=slot,
        base=base,
        mode=CloneMode.LINKED,
        cpus=2,
        memory=256 * MiB,
        display=Endpoint("127.0.0.1", port or free_port()),
    )


def wait_for(events: list[HypervisorEvent], kind: EventKind, seen: threading.Event) -> None:
    assert seen.wait(10), f"no {kind} event; got {events}"


def test_pyvbox_launch_vm_process_default_environment_is_refused_so_start_passes_a_list(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    import virtualbox

    hv.create_clone(spec(base))
    machine = virtualbox.VirtualBox().find_machine("lab-0")
    with pytest.raises(TypeError):
        machine.launch_vm_process(virtualbox.Session(), "headless")
    hv.start("lab-0")
    assert [c.power for c in hv.list_clones()] == [Power.RUNNING]


def test_pyvbox_events_are_truthy_even_when_empty_so_the_listener_checks_the_event(
    sim: Host,
) -> None:
    from virtualbox import library

    assert bool(library.IEvent(None)) is True  # Python 3 ignores its __nonzero__
    calls: list[HypervisorEvent] = []

    class Source:
        polls = 0

        def get_event(self, listener: object, timeout: int) -> object:
            self.polls += 1
            if self.polls > 3:
                raise library.VBoxError()
            return library.IEvent(None)

        def event_processed(self, listener: object, event: object) -> None:
            raise AssertionError("an empty poll is not an event to acknowledge")

        def unregister_listener(self, listener: object) -> None:
            pass

    hub = EventHub(version_api("6.1.50"), lambda machine_id: "lab-0")
    hub.subscribe(calls.append)
    hub._run(library, Source(), object())
    assert calls == []


def test_pyvbox_prints_running_as_an_alias_so_states_are_compared_by_value(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    import virtualbox

    hv.create_clone(spec(base))
    hv.start("lab-0")
    state = virtualbox.VirtualBox().find_machine("lab-0").state
    assert str(state) in ("FirstOnline", "Paused")  # 6.1: alias; 7.0: a wrong 6.1 name
    assert hv.list_clones()[0].power is Power.RUNNING


def test_a_clone_is_a_linked_clone_in_the_pools_group_with_vrde_memory_and_cpus(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    wanted = spec(base, slot=3)
    hv.create_clone(wanted)
    data = sim.by_name("lab-3")
    base_data = sim.by_name(base.vm or "")
    assert data.groups == ["/imagepipe/lab"]
    assert (data.memory_mb, data.cpus, data.vrde_enabled) == (256, 2, True)
    assert data.vrde_properties["TCP/Ports"] == str(wanted.display.port)
    assert data.disk is not None and data.disk.base is base_data.snapshots[0].medium.base
    assert [s.name for s in data.snapshots] == ["imagepipe-clean"]


def test_a_machine_locked_by_another_session_is_busy_and_retried(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    import virtualbox

    other = virtualbox.Session()
    virtualbox.VirtualBox().find_machine("lab-0").lock_machine(
        other, virtualbox.library.LockType.write
    )
    with pytest.raises(BusyError):
        hv.start("lab-0")
    other.unlock_machine()
    hv.start("lab-0")


def test_the_base_is_ready_only_powered_off_unlocked_and_with_its_snapshot(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    assert hv.base_ready(base) is True
    session = Session()
    sim.vbox.findMachine(base.vm or "").lockMachine(session, 2)
    assert hv.base_ready(base) is False
    session.unlockMachine()
    assert hv.base_ready(BaseImage("tiny", 1, base.directory, vm=base.vm, snapshot="nope")) is False
    assert (
        hv.base_ready(BaseImage("tiny", 1, base.directory, vm="missing", snapshot="clean")) is False
    )
    progress = sim.vbox.findMachine(base.vm or "").launchVMProcess(Session(), "headless", [])
    progress.waitForCompletion(-1)
    assert hv.base_ready(base) is False


def test_two_running_clones_never_share_a_vrde_port_also_after_a_restart(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    port = free_port()
    hv.create_clone(spec(base, slot=0, port=port))
    hv.create_clone(spec(base, slot=1, port=port))
    hv.start("lab-0")
    hv.close()
    again = VirtualBoxHypervisor()
    try:
        with pytest.raises(DisplayInUseError, match="used by running clone lab-0"):
            again.start("lab-1")
        assert {c.name: c.power for c in again.list_clones()} == {
            "lab-0": Power.RUNNING,
            "lab-1": Power.SHUTOFF,
        }
    finally:
        again.close()


def test_logins_and_vrde_clients_arrive_as_events_and_show_in_sessions(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    hv.start("lab-0")
    events: list[HypervisorEvent] = []
    seen = {kind: threading.Event() for kind in EventKind}

    def record(event: HypervisorEvent) -> None:
        events.append(event)
        seen[event.kind].set()

    hv.subscribe(record)
    data = sim.by_name("lab-0")
    sim.guest_users(data, [])
    sim.guest_users(data, ["alice"])
    sim.vrde_client(data, "10.0.0.7")
    wait_for(events, EventKind.SESSION_CONNECTED, seen[EventKind.SESSION_CONNECTED])
    session = hv.sessions("lab-0")
    assert session.users == ("alice",) and session.client == "10.0.0.7"
    assert hv.list_clones()[0].ready is True
    sim.vrde_client(data, None)
    wait_for(events, EventKind.SESSION_DISCONNECTED, seen[EventKind.SESSION_DISCONNECTED])
    assert hv.sessions("lab-0").client is None


def test_a_restarted_adapter_rebuilds_clones_and_sessions_from_virtualbox(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base, slot=2))
    hv.start("lab-2")
    data = sim.by_name("lab-2")
    sim.guest_users(data, ["bob"])
    sim.vrde_client(data, "10.0.0.9")
    hv.close()
    again = VirtualBoxHypervisor()
    try:
        (clone,) = again.list_clones()
        assert (clone.pool, clone.slot, clone.image, clone.version) == ("lab", 2, "tiny", 1)
        session = again.sessions("lab-2")
        assert session.users == ("bob",) and session.client == "10.0.0.9"
        assert session.connected_since is not None
    finally:
        again.close()


def test_reset_discards_the_users_changes_and_runs_again(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    hv.start("lab-0")
    data = sim.by_name("lab-0")
    used = data.disk
    assert used is not None
    Path(used.location).write_bytes(b"the previous user's files")
    hv.reset("lab-0")
    assert data.disk is not None and data.disk.location != used.location
    assert not Path(used.location).exists()
    assert hv.list_clones()[0].power is Power.RUNNING


def test_suspend_saves_the_state_and_resume_restores_it(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    hv.create_clone(spec(base))
    hv.start("lab-0")
    hv.suspend("lab-0")
    assert sim.by_name("lab-0").state == "Saved"
    hv.resume("lab-0")
    assert sim.by_name("lab-0").state == "Running"


def test_delete_leaves_no_differencing_disk_behind(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor, tmp_path: Path
) -> None:
    hv.create_clone(spec(base))
    hv.start("lab-0")
    hv.reset("lab-0")
    hv.delete("lab-0")
    # the version's base VM and its warm parent (instant desktops) stay; the clone's go
    kept = ("imagepipe-tiny", "imagepipe-warm")
    left = [p for p in (tmp_path / "vbox").rglob("*.qcow2") if not any(k in str(p) for k in kept)]
    assert left == []


def test_the_virtualbox_driver_setting_builds_the_virtualbox_adapter(sim: Host) -> None:
    from imagepipe.app.bootstrap import build_hypervisor
    from imagepipe.config import HypervisorSettings, Settings

    hypervisor = build_hypervisor(Settings(hypervisor=HypervisorSettings(driver="virtualbox")))
    try:
        assert isinstance(hypervisor, VirtualBoxHypervisor)
        assert hypervisor.api.version == sim.version
    finally:
        hypervisor.close()


def test_images_import_from_vm_registers_the_vms_snapshot_once(
    sim: Host, base: BaseImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagepipe.cli import app as app_module
    from imagepipe.images.registry import Registry

    config = tmp_path / "imagepipe.yml"
    config.write_text(
        f"registry: {tmp_path / 'registry'}\nimage_store: {tmp_path / 'images'}\n"
        f"pools_dir: {tmp_path / 'pools'}\nstate_db: {tmp_path / 'state.db'}\n"
        "hypervisor: {driver: virtualbox}\n"
    )
    argv = ["--config", str(config), "images", "import", "win10", "--from-vm", base.vm or ""]
    assert app_module.main(argv) == 0
    assert app_module.main(argv) == 0
    (record,) = Registry(tmp_path / "registry", tmp_path / "images").versions("win10")
    snapshot = sim.by_name(base.vm or "").snapshots[0]
    assert (record.vm, record.snapshot) == (base.vm, snapshot.id)
    hv = VirtualBoxHypervisor()
    try:
        assert hv.base_ready(record.base_image()) is True
    finally:
        hv.close()
    assert "win10 v1: VM imagepipe-tiny-v1, snapshot clean" in capsys.readouterr().out


def test_importing_a_vm_without_a_snapshot_says_how_to_take_one(sim: Host, tmp_path: Path) -> None:
    sim.create_base_vm("bare", blank_disk(tmp_path / "bare.qcow2"), snapshot=None)
    hv = VirtualBoxHypervisor()
    try:
        with pytest.raises(FatalHypervisorError, match="VBoxManage snapshot bare take"):
            hv.describe_vm("bare")
    finally:
        hv.close()


OVF = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
          xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="win10-disk001.qcow2"/></References>
  <DiskSection><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="16"/></DiskSection>
  <VirtualSystem ovf:id="win10-base"><Name>win10-base</Name></VirtualSystem>
</Envelope>
"""


def test_a_version_built_as_an_ovf_is_imported_once_as_its_own_base_vm(
    sim: Host, hv: VirtualBoxHypervisor, tmp_path: Path
) -> None:
    version = tmp_path / "images" / "win10" / "v3"
    blank_disk(version / "win10-disk001.qcow2")
    (version / "win10.ovf").write_text(OVF)
    base = BaseImage("win10", 3, version, vm="win10-base", snapshot="win10-v3")

    assert hv.base_ready(base) is True
    assert hv.base_ready(base) is True
    imported = sim.by_name("imagepipe-win10-v3")
    assert [s.name for s in imported.snapshots] == ["imagepipe-base"]
    assert [m.name for m in sim.machines.values()] == ["imagepipe-win10-v3"]
    hv.create_clone(spec(base))
    assert [(c.name, c.image, c.version) for c in hv.list_clones()] == [("lab-0", "win10", 3)]


def test_a_version_with_neither_a_vm_nor_an_ovf_cannot_be_cloned(
    sim: Host, hv: VirtualBoxHypervisor, tmp_path: Path
) -> None:
    from imagepipe.errors import BaseMissingError

    base = BaseImage("win10", 4, tmp_path / "empty", vm="gone", snapshot="win10-v4")
    assert hv.base_ready(base) is False
    with pytest.raises(BaseMissingError, match="--from-vm"):
        hv.create_clone(spec(base))


def test_a_virtualbox_7_state_pyvbox_does_not_know_is_listed_not_raised(
    tmp_path: Path,
) -> None:
    import virtualbox

    host = vboxsim.start(tmp_path / "vbox", version="7.0.14")
    try:
        base = base_vm(host, blank_disk(tmp_path / "img" / "disk.qcow2"))
        hv = VirtualBoxHypervisor(stop_poll=0.05)
        try:
            hv.create_clone(spec(base))
            seen = threading.Event()
            events: list[HypervisorEvent] = []

            def record(event: HypervisorEvent) -> None:
                events.append(event)
                if event.detail == "Snapshotting":
                    seen.set()

            hv.subscribe(record)
            host.set_state(host.by_name("lab-0"), "Snapshotting")  # 23 on 7.x
            with pytest.raises(ValueError):
                _ = virtualbox.VirtualBox().find_machine("lab-0").state
            assert hv.list_clones()[0].power is Power.OTHER
            assert seen.wait(10), events
        finally:
            hv.close()
    finally:
        vboxsim.stop(host)


def test_a_create_cut_short_before_registering_leaves_no_orphan_disk(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    folder = sim.home / "imagepipe" / "lab" / "lab-0"
    (folder / "Snapshots").mkdir(parents=True)
    stray = blank_disk(folder / "Snapshots" / "{lost}.qcow2")
    (folder / "lab-0.vbox").write_text("<VirtualBox/>")
    hv.create_clone(spec(base))
    assert not stray.exists()
    assert [c.name for c in hv.list_clones()] == ["lab-0"]


def test_without_a_running_vboxsvc_the_adapter_says_virtualbox_does_not_answer() -> None:
    from imagepipe.errors import EnvironmentMissingError

    vboxsim.install()
    with pytest.raises(EnvironmentMissingError, match="VirtualBox does not answer"):
        VirtualBoxHypervisor()
