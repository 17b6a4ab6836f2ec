"""A VirtualBox desktop is told its own name at boot, as a libvirt one is: the adapter sets the
DMI extra data its firmware (BIOS or EFI) puts into the SMBIOS system table, and the
simulated VirtualBox hands them to its QEMU guest as -smbios."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint
from tests import vboxsim
from tests.host import free_port
from tests.vboxsim import codes as C
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import blank_disk
from tests.vboxsim.process import smbios_args


@pytest.fixture(params=["6.1.50", "7.0.14", "7.1.4"])
def sim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    host = vboxsim.start(tmp_path / "vbox", version=request.param)
    yield host
    vboxsim.stop(host)


@pytest.fixture
def hv(sim: Host) -> Iterator[VirtualBoxHypervisor]:
    adapter = VirtualBoxHypervisor(stop_poll=0.05)
    yield adapter
    adapter.close()


def make_desktop(sim: Host, hv: VirtualBoxHypervisor, tmp_path: Path, firmware: int) -> str:
    disk = blank_disk(tmp_path / "img" / "disk.qcow2")
    sim.create_base_vm("imagepipe-tiny-v4", disk, firmware_type=firmware)
    base = BaseImage("tiny", 4, disk.parent, vm="imagepipe-tiny-v4", snapshot="clean")
    spec = CloneSpec(
        "lab-7", "lab", 7, base, CloneMode.LINKED, 1, 128 * 1024**2,
        Endpoint("127.0.0.1", free_port()),
    )  # fmt: skip
    hv.create_clone(spec)
    return spec.name


@pytest.mark.parametrize(
    ("firmware", "device"), [(C.FIRMWARE_BIOS, "pcbios"), (C.FIRMWARE_EFI, "efi")]
)
def test_a_desktop_is_told_its_name_image_and_version_by_its_firmware(
    sim: Host, hv: VirtualBoxHypervisor, tmp_path: Path, firmware: int, device: str
) -> None:
    name = make_desktop(sim, hv, tmp_path, firmware)
    extra = sim.by_name(name).extra
    config = f"VBoxInternal/Devices/{device}/0/Config/"
    assert extra[config + "DmiSystemVendor"] == "string:imagepipe"
    assert extra[config + "DmiSystemProduct"] == "string:lab-7"
    assert extra[config + "DmiSystemVersion"] == "string:tiny v4"
    other = "efi" if device == "pcbios" else "pcbios"
    assert not [key for key in extra if key.startswith(f"VBoxInternal/Devices/{other}/")]


def test_the_simulated_machine_passes_its_firmwares_dmi_strings_to_qemu(
    sim: Host, hv: VirtualBoxHypervisor, tmp_path: Path
) -> None:
    name = make_desktop(sim, hv, tmp_path, C.FIRMWARE_BIOS)
    assert smbios_args(sim.by_name(name)) == [
        "-smbios",
        "type=1,manufacturer=imagepipe,product=lab-7,version=tiny v4",
    ]
