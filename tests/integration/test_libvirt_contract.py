"""The hypervisor contract against real libvirt + QEMU (TCG) with the tiny guest."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt import LibvirtHypervisor
from imagepipe.pool.model import BaseImage
from tests.contract.hypervisor_suite import HypervisorContract
from tests.guest import tiny_base_image

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # short: QEMU's unix socket paths must stay under 108 characters
    path = Path(tempfile.mkdtemp(prefix="ipc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_base(workdir: Path) -> BaseImage:
    return tiny_base_image(workdir / "tiny-v1")


class TestLibvirtHypervisor(HypervisorContract):
    @pytest.fixture
    def base_image(self, require_libvirt: str, tiny_base: BaseImage) -> BaseImage:
        return tiny_base

    @pytest.fixture
    def hypervisor(
        self, require_libvirt: str, workdir: Path, contract_pool: str
    ) -> Iterator[LibvirtHypervisor]:
        hv = LibvirtHypervisor(require_libvirt, state_dir=workdir / "state")
        try:
            yield hv
        finally:
            for clone in hv.list_clones():
                if clone.pool == contract_pool:
                    hv.delete(clone.name)
            leftovers = [c.name for c in hv.list_clones() if c.pool == contract_pool]
            hv.close()
            assert leftovers == []
            assert not list((workdir / "state" / "disks").glob(f"{contract_pool}-*"))
