"""What the VirtualBox integration tests share: the simulated VirtualBox running each machine as
a real QEMU guest of the tiny image (TCG), the tiny image's version as a base VM, and the
adapter on it. The contract suite (test_contract.py) brings its own, in-memory, simulator."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage
from tests import vboxsim
from tests.conftest import require_program
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import tiny_vm
from tests.vboxsim.process import QemuProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ipvb-", dir="/tmp"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sim(workdir: Path) -> Iterator[Host]:
    require_program("qemu-system-x86_64")
    host = vboxsim.start(workdir / "vbox", version="7.0.14", process_factory=QemuProcess)
    yield host
    vboxsim.stop(host)


@pytest.fixture
def base(sim: Host, workdir: Path) -> BaseImage:
    return tiny_vm(sim, workdir / "tiny-v1")


@pytest.fixture
def hv(sim: Host) -> Iterator[VirtualBoxHypervisor]:
    adapter = VirtualBoxHypervisor()
    yield adapter
    for clone in adapter.list_clones():
        adapter.delete(clone.name)
    adapter.close()
