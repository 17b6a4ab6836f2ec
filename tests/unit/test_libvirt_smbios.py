"""A libvirt desktop is told its own name at boot through SMBIOS (libvirt <sysinfo>): the
tiny guest reads it from /sys/class/dmi/id and shows it on its screen and prompt. A clone
restored from a warm parent carries its own name there too, never the parent's."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from imagepipe.hypervisors.libvirt.domain_xml import domain_xml
from imagepipe.hypervisors.libvirt.warm import parent_domain_xml, restore_xml, warm_key
from tests.integration.test_libvirt_warm import KEY, SAVED_XML, WHO
from tests.integration.test_libvirt_xml import plan


def smbios_system(xml: str) -> dict[str, str]:
    """The SMBIOS system entries the guest will see, as {entry name: value}."""
    root = ET.fromstring(xml)
    smbios = root.find("os/smbios")
    assert smbios is not None and smbios.get("mode") == "sysinfo", "the guest gets no sysinfo"
    (system,) = root.findall("sysinfo[@type='smbios']/system")
    return {entry.get("name", ""): entry.text or "" for entry in system.findall("entry")}


def test_a_desktop_is_told_its_name_image_and_version_at_boot() -> None:
    assert smbios_system(domain_xml(plan())) == {
        "manufacturer": "imagepipe",
        "product": "lab-2",
        "version": "tiny v3",
    }


def test_a_desktop_booted_from_its_disk_is_told_its_name_too() -> None:
    xml = domain_xml(plan(kernel=None, initrd=None, cmdline=None))
    assert smbios_system(xml)["product"] == "lab-2"


def test_a_restored_clone_carries_its_own_name_not_its_parents() -> None:
    parent = parent_domain_xml(
        domain_xml(plan(name="lab-1")),
        warm_key(**KEY),
        uuid="3cb9ceac-ae50-477c-9910-8e76a985836e",
        disk=WHO.disk.with_name("parent.qcow2"),
        console_socket=WHO.console_socket.with_name("parent.console"),
        agent_socket=WHO.agent_socket.with_name("parent.agent"),
        display=WHO.display,
    )
    parent_name = ET.fromstring(parent).findtext("name")
    assert smbios_system(parent)["product"] == parent_name

    restored = restore_xml(parent, WHO)
    assert smbios_system(restored)["product"] == "lab-2"
    assert parent_name not in restored
    assert len(ET.fromstring(restored).findall("os/smbios")) == 1


def test_a_clone_of_a_parent_saved_without_sysinfo_is_told_its_name() -> None:
    assert "sysinfo" not in SAVED_XML  # what an older imagepipe saved
    assert smbios_system(restore_xml(SAVED_XML, WHO))["product"] == "lab-2"
