"""The hypervisor contract on the VirtualBox adapter: pyvbox's own code over the simulated
vboxapi (6.1 and 7.0 APIs), and, with IMAGEPIPE_VIRTUALBOX=1, over a real VirtualBox.

Real host: IMAGEPIPE_VIRTUALBOX=1 IMAGEPIPE_VIRTUALBOX_BASE_VM=<a powered-off VM with a
snapshot> pytest tests/integration/virtualbox/test_contract.py -k Real
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepipe.hypervisors.common import power_of
from imagepipe.hypervisors.virtualbox.facts import POWER, version_api
from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage, Power
from tests import vboxsim
from tests.contract.hypervisor_suite import BaseInUse, HypervisorContract
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import base_vm, blank_disk


class VBoxVM:
    """A VM imagepipe did not make, through pyvbox (simulated or real VirtualBox alike)."""

    def __init__(self, name: str) -> None:
        import virtualbox

        self.name = name
        vbox = virtualbox.VirtualBox()
        api = version_api(str(vbox.version))
        args = api.create_machine_args("", name, "/")
        machine = virtualbox.library.IMachine(vbox._call("createMachine", in_p=args))
        machine.save_settings()
        vbox.register_machine(machine)

    def _machine(self) -> Any | None:
        import virtualbox

        try:
            return virtualbox.VirtualBox().find_machine(self.name)
        except virtualbox.library.VBoxError:
            return None

    def power(self) -> Power | None:
        import virtualbox

        machine = self._machine()
        if machine is None:
            return None
        api = version_api(str(virtualbox.VirtualBox().version))
        return power_of(api.state_name(int(machine._get_attr("state"))), POWER)

    def remove(self) -> None:
        machine = self._machine()
        if machine is not None:
            media = machine.unregister(_cleanup_mode())
            machine.delete_config(media).wait_for_completion(-1)


def _cleanup_mode() -> Any:
    import virtualbox

    return virtualbox.library.CleanupMode(3)  # DetachAllReturnHardDisksOnly


def running(vm: str) -> BaseInUse:
    """A context manager inside which the VM runs (as Packer's virtualbox-vm would run it)."""

    @contextlib.contextmanager
    def run() -> Iterator[None]:
        import virtualbox

        machine = virtualbox.VirtualBox().find_machine(vm)
        session = virtualbox.Session()
        machine.launch_vm_process(session, "headless", []).wait_for_completion(-1)
        session.unlock_machine()
        try:
            yield
        finally:
            control = virtualbox.Session()
            machine.lock_machine(control, virtualbox.library.LockType(1))
            control.console.power_down().wait_for_completion(-1)
            control.unlock_machine()

    return run


def _cleanup(hv: VirtualBoxHypervisor, pool: str) -> list[str]:
    for clone in hv.list_clones():
        if clone.pool == pool:
            hv.delete(clone.name)
    leftovers = [c.name for c in hv.list_clones() if c.pool == pool]
    hv.close()
    return leftovers


class _Hooks(HypervisorContract):
    @pytest.fixture
    def foreign_vm(self, hypervisor: VirtualBoxHypervisor, contract_pool: str) -> Iterator[VBoxVM]:
        vm = VBoxVM(f"{contract_pool}-7")
        yield vm
        vm.remove()

    @pytest.fixture
    def base_in_use(self, base_image: BaseImage) -> BaseInUse:
        return running(base_image.vm or "")


class _Simulated(_Hooks):
    version = "6.1.50"

    @pytest.fixture
    def sim(self, tmp_path: Path) -> Iterator[Host]:
        host = vboxsim.start(tmp_path / "vbox", version=self.version)
        yield host
        vboxsim.stop(host)

    @pytest.fixture
    def base_image(self, sim: Host, tmp_path: Path) -> BaseImage:
        return base_vm(sim, blank_disk(tmp_path / "images" / "tiny-v1" / "disk.qcow2"))

    @pytest.fixture
    def hypervisor(
        self, sim: Host, base_image: BaseImage, contract_pool: str
    ) -> Iterator[VirtualBoxHypervisor]:
        hv = VirtualBoxHypervisor(stop_poll=0.05)
        yield hv
        assert _cleanup(hv, contract_pool) == []
        # full media cleanup: only the base's own disks and the version's warm parent's
        # (instant desktops: one per version and shape, kept for the next clone) remain
        kept = [sim.by_name(base_image.vm or "")]
        kept += [m for m in sim.machines.values() if m.groups == ["/imagepipe-warm"]]
        assert sorted(sim.media) == sorted(
            m.location for d in kept for m in [d.disk, *(s.medium for s in d.snapshots)] if m
        )


class TestSimulatedVirtualBox61(_Simulated):
    version = "6.1.50"


class TestSimulatedVirtualBox70(_Simulated):
    version = "7.0.14"


class TestSimulatedVirtualBox71(_Simulated):
    version = "7.1.4"


@pytest.mark.real
@pytest.mark.opt_in(
    "IMAGEPIPE_VIRTUALBOX",
    reason="a real VirtualBox host: set IMAGEPIPE_VIRTUALBOX=1 and IMAGEPIPE_VIRTUALBOX_BASE_VM",
)
class TestRealVirtualBox(_Hooks):
    @pytest.fixture
    def base_image(self) -> BaseImage:
        vm = os.environ["IMAGEPIPE_VIRTUALBOX_BASE_VM"]
        hv = VirtualBoxHypervisor()
        try:
            name, snapshot = hv.describe_vm(vm)
        finally:
            hv.close()
        return BaseImage(image="real", version=1, directory=Path("."), vm=name, snapshot=snapshot)

    @pytest.fixture
    def hypervisor(self, contract_pool: str) -> Iterator[VirtualBoxHypervisor]:
        hv = VirtualBoxHypervisor()
        yield hv
        assert _cleanup(hv, contract_pool) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vboxsim.Server]:
    with vboxsim.Server(tmp_path_factory.mktemp("vboxsvc")) as server:
        yield server


class TestSimulatedVirtualBoxInItsOwnProcess(_Hooks):
    """The same contract through the simulated VBoxSVC process that E2E keepers share."""

    @pytest.fixture
    def base_image(self, server: vboxsim.Server, tmp_path: Path) -> BaseImage:
        disk = blank_disk(tmp_path / "images" / "tiny-v1" / "disk.qcow2")
        name = f"imagepipe-{tmp_path.name[-12:]}-v1"
        server.host.create_base_vm(name, disk, snapshot="clean")
        return BaseImage(image="tiny", version=1, directory=disk.parent, vm=name, snapshot="clean")

    @pytest.fixture
    def hypervisor(
        self, server: vboxsim.Server, contract_pool: str, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[VirtualBoxHypervisor]:
        monkeypatch.setenv("IMAGEPIPE_VBOXSIM_SOCKET", str(server.socket))
        hv = VirtualBoxHypervisor(stop_poll=0.05)
        yield hv
        assert _cleanup(hv, contract_pool) == []
