"""Pure helpers of the libvirt adapter: domain XML in and out, QEMU monitor/agent replies.

No libvirt import and no I/O here, so every rule is unit-tested without a daemon.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from imagepipe.errors import FatalHypervisorError
from imagepipe.pool.model import CloneMode, Endpoint, StartMode

NAMESPACE = "https://imagepipe.dev/xmlns/clone/1"
METADATA_KEY = "imagepipe"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
STARTED = "started"  # metadata attribute only a restored domain's live XML carries


@dataclass(frozen=True)
class CloneMetadata:
    """What imagepipe stores in a domain's <metadata>, so the host alone tells the story."""

    pool: str
    image: str
    version: int
    slot: int
    mode: CloneMode
    base_disk: Path  # the registered image's disk the clone was made from
    start: StartMode = StartMode.BOOT  # what the pool asked for (restore: instant desktop)
    warm: str | None = None  # fingerprint of the warm parent its saved state comes from


@dataclass(frozen=True)
class DomainPlan:
    """Everything needed to write one clone's domain XML."""

    name: str
    metadata: CloneMetadata
    memory_kib: int
    cpus: int
    disk: Path
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    display: Endpoint
    console_socket: Path
    agent_socket: Path


@dataclass(frozen=True)
class DomainFacts:
    """What imagepipe reads back from a domain's XML."""

    name: str
    metadata: CloneMetadata | None  # None: not made by imagepipe
    display: Endpoint | None
    disk: Path | None
    restored: bool = False  # the running guest was restored from a warm parent


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def metadata_element(meta: CloneMetadata) -> ET.Element:
    attrs = {
        "pool": meta.pool,
        "image": meta.image,
        "version": str(meta.version),
        "slot": str(meta.slot),
        "mode": meta.mode.value,
        "base": str(meta.base_disk),
        "start": meta.start.value,
    }
    if meta.warm is not None:
        attrs["warm"] = meta.warm
    return ET.Element(f"{{{NAMESPACE}}}clone", attrs)


SMBIOS_MANUFACTURER = "imagepipe"  # how the guest knows the SMBIOS product is its name


def set_smbios_identity(root: ET.Element, name: str, meta: CloneMetadata) -> None:
    """Tell the guest its name at boot: the SMBIOS system table (block 1) says manufacturer
    `imagepipe`, product = the desktop's name, version = its image and version; the guest reads
    them from /sys/class/dmi/id/{sys_vendor,product_name,product_version}. Replaces what the
    domain XML held before (a restored clone's XML starts as its warm parent's)."""
    for old in root.findall("sysinfo[@type='smbios']"):
        root.remove(old)
    sysinfo = ET.Element("sysinfo", {"type": "smbios"})
    system = _sub(sysinfo, "system")
    _sub(system, "entry", SMBIOS_MANUFACTURER, name="manufacturer")
    _sub(system, "entry", name, name="product")
    _sub(system, "entry", f"{meta.image} v{meta.version}", name="version")
    after = root.find("vcpu")
    index = list(root).index(after) + 1 if after is not None else len(root)
    root.insert(index, sysinfo)
    os_ = root.find("os")
    if os_ is None:
        raise FatalHypervisorError("the domain XML has no <os> element to point SMBIOS at")
    for old in os_.findall("smbios"):
        os_.remove(old)
    _sub(os_, "smbios", mode="sysinfo")


def domain_xml(plan: DomainPlan) -> str:
    """libvirt domain XML for a TCG guest: direct kernel boot, qcow2 disk, VNC on a fixed
    port, serial console and guest agent on unix sockets, its own name in SMBIOS."""
    ET.register_namespace(METADATA_KEY, NAMESPACE)
    root = ET.Element("domain", {"type": "qemu"})
    _sub(root, "name", plan.name)
    _sub(root, "metadata").append(metadata_element(plan.metadata))
    _sub(root, "memory", str(plan.memory_kib), unit="KiB")
    _sub(root, "vcpu", str(plan.cpus))
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    if plan.kernel is not None:
        _sub(os_, "kernel", str(plan.kernel))
        if plan.initrd is not None:
            _sub(os_, "initrd", str(plan.initrd))
        if plan.cmdline:
            _sub(os_, "cmdline", plan.cmdline)
    else:
        _sub(os_, "boot", dev="hd")
    set_smbios_identity(root, plan.name, plan.metadata)
    _sub(_sub(root, "features"), "acpi")
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=str(plan.disk))
    _sub(disk, "target", dev="vda", bus="virtio")
    serial = _sub(devices, "serial", type="unix")
    _sub(serial, "source", mode="bind", path=str(plan.console_socket))
    _sub(serial, "target", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(plan.agent_socket))
    _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)
    graphics = _sub(
        devices,
        "graphics",
        type="vnc",
        port=str(plan.display.port),
        autoport="no",
        listen=plan.display.host,
    )
    _sub(graphics, "listen", type="address", address=plan.display.host)
    _sub(_sub(devices, "video"), "model", type="vga")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_metadata(element: ET.Element | None) -> CloneMetadata | None:
    """Our metadata element, or None when it is missing or not ours (never raises)."""
    if element is None:
        return None
    version = _int(element.get("version"))
    slot = _int(element.get("slot"))
    pool, image, base = element.get("pool"), element.get("image"), element.get("base")
    try:
        mode = CloneMode(element.get("mode", CloneMode.LINKED.value))
        start = StartMode(element.get("start", StartMode.BOOT.value))
    except ValueError:
        return None
    if not pool or not image or not base or version is None or slot is None:
        return None
    return CloneMetadata(pool, image, version, slot, mode, Path(base), start, element.get("warm"))


def parse_domain(xml: str) -> DomainFacts:
    """Name, imagepipe metadata, VNC endpoint and disk of a domain's XML."""
    root = ET.fromstring(xml)
    name = root.findtext("name", default="")
    element = root.find(f"metadata/{{{NAMESPACE}}}clone")
    meta = parse_metadata(element)
    restored = element is not None and element.get(STARTED) == StartMode.RESTORE.value
    display: Endpoint | None = None
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is not None:
        port = _int(graphics.get("port"))
        listen = graphics.find("listen[@type='address']")
        host = listen.get("address") if listen is not None else graphics.get("listen")
        if port is not None and port > 0:
            display = Endpoint(host or "127.0.0.1", port)
    disk: Path | None = None
    source = root.find("devices/disk[@device='disk']/source")
    if source is not None and source.get("file"):
        disk = Path(source.get("file", ""))
    return DomainFacts(name=name, metadata=meta, display=display, disk=disk, restored=restored)


def format_address(host: str, port: str | int) -> str:
    """host:port, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_vnc_clients(reply: str) -> tuple[str, ...]:
    """Client addresses from a QMP `query-vnc` reply (libvirt_qemu.qemuMonitorCommand)."""
    try:
        doc = json.loads(reply)
    except json.JSONDecodeError as exc:
        raise FatalHypervisorError(
            f"QEMU answered query-vnc with something not JSON: {exc}"
        ) from exc
    info = doc.get("return") if isinstance(doc, dict) else None
    if not isinstance(info, dict):
        return ()
    clients = info.get("clients") or []
    out: list[str] = []
    for client in clients:
        if isinstance(client, dict) and "host" in client:
            out.append(format_address(str(client["host"]), str(client.get("service", "0"))))
    return tuple(out)


def parse_guest_users(info: dict[str, object]) -> tuple[str, ...]:
    """User names from libvirt's getGuestInfo(VIR_DOMAIN_GUEST_INFO_USERS) typed parameters."""
    count = info.get("user.count", 0)
    if not isinstance(count, int):
        return ()
    users = [info.get(f"user.{i}.name") for i in range(count)]
    return tuple(sorted({u for u in users if isinstance(u, str) and u}))
