"""The hypervisor contract against real libvirt + QEMU (TCG) with the tiny guest."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagepipe.errors import BaseMissingError
from imagepipe.hypervisors.common import power_of
from imagepipe.hypervisors.libvirt.disks import disk_usable
from imagepipe.hypervisors.libvirt.hypervisor import POWER, LibvirtHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from tests.conftest import require_program
from tests.contract.hypervisor_suite import BaseInUse, ForeignVM, HypervisorContract
from tests.guest import tiny_base_image
from tests.host import free_port

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


FOREIGN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <description>made by the imagepipe contract suite, without imagepipe metadata</description>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


@dataclass(frozen=True)
class LibvirtForeignVM:
    """A plain libvirt domain defined with the libvirt API, not by imagepipe."""

    conn: Any
    name: str

    def power(self) -> Power | None:
        import libvirt

        try:
            return power_of(int(self.conn.lookupByName(self.name).state()[0]), POWER)
        except libvirt.libvirtError:
            return None


@contextlib.contextmanager
def writer_on(disk: Path) -> Iterator[None]:
    """A QEMU process (qemu-io) holds the disk open for writing, as a running base VM does.

    Another process may hold the disk's lock for a moment when qemu-io starts (the adapter's
    own probe of the base, an upload reading it): qemu-io then exits at once saying so, and
    is started again; any other exit fails with what qemu-io said."""
    qemu_io = require_program("qemu-io")
    deadline = time.monotonic() + 30  # qemu-io starts slowly on a loaded 2-core host
    writer = _start_writer(qemu_io, disk)
    try:
        while disk_usable(disk):
            if writer.poll() is not None:
                said = writer.stderr.read().decode(errors="replace") if writer.stderr else ""
                assert "lock" in said, f"qemu-io exited ({writer.returncode}): {said.strip()}"
                writer = _start_writer(qemu_io, disk)
            assert time.monotonic() < deadline, "qemu-io never locked the base disk"
            time.sleep(0.05)
        yield
    finally:
        writer.kill()
        writer.wait()


def _start_writer(qemu_io: str, disk: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [qemu_io, "-f", "qcow2", str(disk), "-c", "sleep 120000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


class TestLibvirtHypervisor(HypervisorContract):
    @pytest.fixture
    def base_in_use(self, base_image: BaseImage) -> BaseInUse:
        assert base_image.disk is not None
        disk = base_image.directory / base_image.disk
        return lambda: writer_on(disk)

    @pytest.fixture
    def foreign_vm(self, require_libvirt: str, contract_pool: str) -> Iterator[ForeignVM]:
        import libvirt

        conn = libvirt.open(require_libvirt)
        name = f"{contract_pool}-7"
        dom = conn.defineXML(FOREIGN_XML.format(name=name))
        try:
            yield LibvirtForeignVM(conn, name)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            conn.close()

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

    def test_a_linked_clone_whose_base_disk_is_gone_neither_starts_nor_resets(
        self, hypervisor: LibvirtHypervisor, contract_pool: str, workdir: Path
    ) -> None:
        base = tiny_base_image(workdir / f"{contract_pool}-base", version=2)
        spec = CloneSpec(
            name=f"{contract_pool}-1",
            pool=contract_pool,
            slot=1,
            base=base,
            mode=CloneMode.LINKED,
            cpus=1,
            memory=128 * 1024**2,
            display=Endpoint("127.0.0.1", free_port()),
        )
        hypervisor.create_clone(spec)
        (base.directory / "disk.qcow2").unlink()

        for operation in (hypervisor.start, hypervisor.reset):
            with pytest.raises(BaseMissingError, match=r"tiny v2 is gone .*disk\.qcow2"):
                operation(spec.name)
        (listed,) = [c for c in hypervisor.list_clones() if c.name == spec.name]
        assert listed.power is Power.SHUTOFF
