"""The hypervisor contract on the VirtualBox adapter: pyvbox's own code over the simulated
vboxapi (6.1 and 7.0 APIs), and, with IMAGEPIPE_VIRTUALBOX=1, over a real VirtualBox.

Real host: IMAGEPIPE_VIRTUALBOX=1 IMAGEPIPE_VIRTUALBOX_BASE_VM=<a powered-off VM with a
snapshot> pytest tests/integration/test_virtualbox_contract.py -k Real
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.virtualbox import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage
from tests import vboxsim
from tests.contract.hypervisor_suite import HypervisorContract
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import base_vm, blank_disk


def _cleanup(hv: VirtualBoxHypervisor, pool: str) -> list[str]:
    for clone in hv.list_clones():
        if clone.pool == pool:
            hv.delete(clone.name)
    leftovers = [c.name for c in hv.list_clones() if c.pool == pool]
    hv.close()
    return leftovers


class _Simulated(HypervisorContract):
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
        # full media cleanup: only the base's own disks remain registered
        base = sim.by_name(base_image.vm or "")
        assert sorted(sim.media) == sorted(
            [m.location for m in [base.disk, *(s.medium for s in base.snapshots)] if m]
        )


class TestSimulatedVirtualBox61(_Simulated):
    version = "6.1.50"


class TestSimulatedVirtualBox70(_Simulated):
    version = "7.0.14"


class TestSimulatedVirtualBox71(_Simulated):
    version = "7.1.4"


@pytest.mark.real
@pytest.mark.skipif(
    os.environ.get("IMAGEPIPE_VIRTUALBOX") != "1",
    reason="a real VirtualBox host: set IMAGEPIPE_VIRTUALBOX=1 and IMAGEPIPE_VIRTUALBOX_BASE_VM",
)
class TestRealVirtualBox(HypervisorContract):
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


class TestSimulatedVirtualBoxInItsOwnProcess(HypervisorContract):
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
