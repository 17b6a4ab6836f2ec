"""Instant desktops' pure parts: warm-parent keys, libvirt's save image header, and the XML a
clone restores with. No daemon needed: these run everywhere, fast."""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt.domain_xml import (
    CloneMetadata,
    DomainPlan,
    domain_xml,
    parse_domain,
)
from imagepipe.hypervisors.libvirt.warm import (
    HEADER_SIZE,
    FileStamp,
    RestoreIdentity,
    SaveImageError,
    data_length,
    is_warm_parent,
    parent_domain_xml,
    parse_save_header,
    render_save_header,
    restore_xml,
    warm_key,
)
from imagepipe.pool.model import CloneMode, Endpoint, StartMode
from imagepipe.record import replace

META = CloneMetadata(
    "lab",
    "tiny",
    3,
    2,
    CloneMode.LINKED,
    Path("/images/tiny/3/disk.qcow2"),
    StartMode.RESTORE,
    "ipw-0123456789abcdef",
)

# What libvirt 9.0 wrote into the header of a saved tiny desktop (trimmed to what matters).
SAVED_XML = """<domain type='qemu'>
  <name>ipw-0123456789abcdef</name>
  <uuid>3cb9ceac-ae50-477c-9910-8e76a985836e</uuid>
  <metadata xmlns:imagepipe="https://imagepipe.dev/xmlns/clone/1">
    <imagepipe:warm key="0123456789abcdef" image="tiny" version="3"/>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/images/tiny/3/vmlinuz</kernel>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/state/warm/ipw-0123456789abcdef.partial/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='/state/sockets/ipw-0123456789abcdef.console'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <console type='unix'>
      <source mode='bind' path='/state/sockets/ipw-0123456789abcdef.console'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/state/sockets/ipw-0123456789abcdef.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <graphics type='vnc' port='34083' autoport='no' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
</domain>
"""
COOKIE = "<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"
HEADER = struct.Struct("<16s5I14I")

WHO = RestoreIdentity(
    name="lab-2",
    uuid="9b0e4f9e-1111-4c5e-8a0b-2f6c9a1d7e01",
    metadata=META,
    disk=Path("/state/disks/lab-2.qcow2"),
    console_socket=Path("/state/sockets/lab-2.console"),
    agent_socket=Path("/state/sockets/lab-2.agent"),
    display=Endpoint("127.0.0.1", 5902),
)


def saved_image(xml: str = SAVED_XML, cookie: str | None = COOKIE, fmt: int = 0) -> bytes:
    """A libvirt save image as virQEMUSaveDataWrite lays it out, with a fake QEMU stream."""
    xml_bytes = xml.encode() + b"\0"
    cookie_bytes = cookie.encode() + b"\0" if cookie is not None else b""
    data_len = len(xml_bytes) + len(cookie_bytes) + 64 * 1024
    body = xml_bytes + cookie_bytes
    head = HEADER.pack(
        b"LibvirtQemudSave",
        2,
        data_len,
        1,
        fmt,
        len(xml_bytes) if cookie is not None else 0,
        *([0] * 14),
    )
    return head + body + b"\0" * (data_len - len(body)) + b"QEVM-stream"


def test_the_header_gives_back_the_saved_xml_cookie_and_where_qemus_stream_starts() -> None:
    image = saved_image()
    header = parse_save_header(image)
    assert header.xml == SAVED_XML
    assert header.cookie == COOKIE
    assert header.was_running == 1
    assert image[header.stream_offset :] == b"QEVM-stream"
    assert data_length(image[:HEADER_SIZE]) == header.data_len


def test_a_rewritten_header_holds_the_clone_xml_and_keeps_the_stream_where_it_was() -> None:
    image = saved_image()
    header = parse_save_header(image)
    clone_xml = restore_xml(header.xml, WHO)
    rewritten = render_save_header(header, clone_xml) + image[header.stream_offset :]
    again = parse_save_header(rewritten)
    assert again.xml == clone_xml
    assert again.cookie == COOKIE
    assert again.stream_offset == header.stream_offset
    assert rewritten[again.stream_offset :] == b"QEVM-stream"


def test_a_header_without_cookie_is_rewritten_without_one() -> None:
    header = parse_save_header(saved_image(cookie=None))
    again = parse_save_header(render_save_header(header, "<domain/>"))
    assert (again.xml, again.cookie) == ("<domain/>", None)


def test_xml_that_does_not_fit_the_header_is_refused() -> None:
    header = parse_save_header(saved_image())
    with pytest.raises(SaveImageError, match="does not fit"):
        render_save_header(header, "<domain>" + "x" * header.data_len + "</domain>")


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b"LibvirtQemudPart" + saved_image()[16:], "incomplete"),
        (b"QFI\xfb" + saved_image()[4:], "not a libvirt saved state"),
        (saved_image()[:40], "shorter than"),
        (saved_image(fmt=1), "compressed"),
        (saved_image()[: HEADER_SIZE + 10], "ends inside"),
    ],
)
def test_a_saved_state_imagepipe_cannot_use_says_why(image: bytes, reason: str) -> None:
    with pytest.raises(SaveImageError, match=reason):
        parse_save_header(image)


def test_a_restored_clone_has_its_own_name_uuid_disk_sockets_and_display() -> None:
    root = ET.fromstring(restore_xml(SAVED_XML, WHO))
    assert root.findtext("name") == "lab-2"
    assert root.findtext("uuid") == WHO.uuid
    assert root.find("devices/disk/source").get("file") == "/state/disks/lab-2.qcow2"  # type: ignore[union-attr]
    for tag in ("serial", "console"):
        assert root.find(f"devices/{tag}/source").get("path") == str(WHO.console_socket)  # type: ignore[union-attr]
    assert root.find("devices/channel/source").get("path") == str(WHO.agent_socket)  # type: ignore[union-attr]
    facts = parse_domain(ET.tostring(root, encoding="unicode"))
    assert facts.display == Endpoint("127.0.0.1", 5902)
    assert facts.metadata == META
    assert facts.restored is True


def test_a_restored_clone_keeps_the_parents_machine_and_device_addresses() -> None:
    root = ET.fromstring(restore_xml(SAVED_XML, WHO))
    assert root.find("os/type").get("machine") == "pc-i440fx-7.2"  # type: ignore[union-attr]
    assert root.find("devices/disk/address").get("slot") == "0x04"  # type: ignore[union-attr]
    assert root.find("devices/channel/address").get("port") == "1"  # type: ignore[union-attr]
    assert root.findtext("memory") == "262144"


def test_a_booted_clone_is_not_reported_as_restored() -> None:
    assert parse_domain(domain_xml(plan())).restored is False


def test_saved_xml_without_an_agent_channel_cannot_be_restored_from() -> None:
    broken = SAVED_XML.replace("org.qemu.guest_agent.0", "org.example.other")
    with pytest.raises(SaveImageError, match="guest agent channel"):
        restore_xml(broken, WHO)


def test_the_parent_is_marked_warm_so_it_is_never_listed_as_a_desktop() -> None:
    key = warm_key(**KEY)
    xml = parent_domain_xml(
        domain_xml(plan()),
        key,
        uuid="5d1c6a51-2222-4c5e-8a0b-2f6c9a1d7e01",
        disk=Path("/state/warm/x/disk.qcow2"),
        console_socket=Path("/state/sockets/x.console"),
        agent_socket=Path("/state/sockets/x.agent"),
        display=Endpoint("127.0.0.1", 40000),
    )
    facts = parse_domain(xml)
    assert facts.name == key.name
    assert facts.metadata is None
    assert is_warm_parent(xml)
    assert not is_warm_parent(domain_xml(plan()))


KEY: dict[str, object] = {
    "image": "tiny",
    "version": 3,
    "cpus": 1,
    "memory_kib": 262144,
    "files": (FileStamp(Path("/images/tiny/3/disk.qcow2"), 1024, 1),),
    "cmdline": "console=ttyS0",
    "libvirt_version": 9000000,
    "qemu_version": 7002022,
}


@pytest.mark.parametrize(
    "change",
    [
        {"version": 4},
        {"cpus": 2},
        {"memory_kib": 524288},
        {"files": (FileStamp(Path("/images/tiny/3/disk.qcow2"), 1024, 2),)},
        {"cmdline": "console=ttyS0 quiet"},
        {"libvirt_version": 9001000},
        {"qemu_version": 8000000},
    ],
)
def test_another_version_shape_base_or_qemu_needs_another_warm_parent(
    change: dict[str, object],
) -> None:
    assert warm_key(**{**KEY, **change}) != warm_key(**KEY)  # type: ignore[arg-type]


def test_the_same_version_and_shape_share_one_warm_parent() -> None:
    first, second = warm_key(**KEY), warm_key(**KEY)  # type: ignore[arg-type]
    assert first == second
    assert first.name.startswith("ipw-") and len(first.name) <= 63
    assert str(first) == "tiny v3 (1 cpu, 256 MiB)"


def plan(**changes: object) -> DomainPlan:
    base = DomainPlan(
        name="lab-2",
        metadata=META,
        memory_kib=262144,
        cpus=1,
        disk=Path("/state/disks/lab-2.qcow2"),
        kernel=Path("/images/tiny/3/vmlinuz"),
        initrd=Path("/images/tiny/3/initrd.img"),
        cmdline="console=ttyS0",
        display=Endpoint("127.0.0.1", 5902),
        console_socket=Path("/state/sockets/lab-2.console"),
        agent_socket=Path("/state/sockets/lab-2.agent"),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_warm_parents_of_versions_whose_base_disk_is_gone_are_removed(tmp_path: Path) -> None:
    from imagepipe.hypervisors.libvirt.parents import WarmParents

    kept_base, gone_base = tmp_path / "v1" / "disk.qcow2", tmp_path / "v2" / "disk.qcow2"
    for base, name in ((kept_base, "ipw-kept"), (gone_base, "ipw-gone")):
        base.parent.mkdir()
        base.write_bytes(b"")
        parent = tmp_path / "state" / "warm" / name
        parent.mkdir(parents=True)
        (parent / "parent.json").write_text(json.dumps({"base": str(base)}))
    gone_base.unlink()  # v2 was pruned from the image store

    parents = WarmParents(None, None, lambda: None, tmp_path / "state")
    assert parents.prune() == ["ipw-gone"]
    assert sorted(p.name for p in (tmp_path / "state" / "warm").iterdir()) == ["ipw-kept"]
