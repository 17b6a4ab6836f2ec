"""Pure helpers of instant desktops on libvirt: warm-parent keys, libvirt save images, and the
clone XML a restore starts from.

A warm parent is one guest booted until its agent answers and then saved
(virDomainSaveFlags): libvirt's save image holds a header with the domain XML and then QEMU's
migration stream. libvirt refuses to restore that image under another name or UUID (its ABI
check compares them with the saved XML), so each clone gets its own copy of the image whose
header carries the clone's XML: same devices, its own name, UUID, disk overlay, sockets and
display. The layout of the header is libvirt's virQEMUSaveHeader (src/qemu/qemu_saveimage.h):

    char magic[16] = "LibvirtQemudSave"; uint32 version, data_len, was_running, format,
    cookieOffset, unused[14]; then data_len bytes: XML, NUL, cookie, NUL, zero padding.

No libvirt import and no I/O here.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from imagepipe.errors import FatalHypervisorError
from imagepipe.hypervisors.common import WarmKey, fingerprint
from imagepipe.hypervisors.libvirt.domain_xml import (
    AGENT_CHANNEL,
    METADATA_KEY,
    NAMESPACE,
    STARTED,
    CloneMetadata,
    metadata_element,
    parse_metadata,
    set_smbios_identity,
)
from imagepipe.pool.model import Endpoint, StartMode

PARENT_PREFIX = "ipw-"  # a parent's domain and folder name: this and its fingerprint's start
LAYOUT = 1  # bump when what a warm parent holds changes: older parents are then not used
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_PARTIAL = b"LibvirtQemudPart"
SAVE_VERSION = 2
FORMAT_RAW = 0
_HEADER = struct.Struct("<16s5I14I")
HEADER_SIZE = _HEADER.size  # 92 bytes before the XML


class SaveImageError(FatalHypervisorError):
    """A saved state imagepipe cannot use: the caller boots instead."""


class SavedBy(Protocol):
    """A warm parent, local or on a host: the libvirt and QEMU versions that saved it."""

    @property
    def libvirt_version(self) -> int: ...

    @property
    def qemu_version(self) -> int: ...


P = TypeVar("P", bound=SavedBy)


def fitting_parent(
    meta: CloneMetadata,
    load: Callable[[str], P | None],
    host_versions: Callable[[], tuple[int, int]],
    say_once: Callable[[str, str], None],
    where: str = "",
) -> P | None:
    """The warm parent a clone restores from, when it exists and was saved by this host's
    libvirt and QEMU; else None, and why is said once (its desktops boot instead). `where` is
    " on host NAME" for a remote host."""
    if meta.start is not StartMode.RESTORE or meta.warm is None:
        return None
    parent = load(meta.warm)
    if parent is None:
        say_once(
            f"make:{meta.warm}",
            f"no warm parent of {meta.image} v{meta.version} ({meta.warm}){where}; its desktops "
            f"boot instead (the pool's next new desktop{' there' if where else ''} makes it)",
        )
        return None
    if (parent.libvirt_version, parent.qemu_version) != host_versions():
        say_once(
            f"versions:{meta.warm}",
            f"the warm parent of {meta.image} v{meta.version}{where} was saved by another "
            "libvirt/QEMU version; its desktops boot instead until the pool recreates them",
        )
        return None
    return parent


@dataclass(frozen=True)
class FileStamp:
    """Identity of a file the saved state depends on: a rebuilt file is a new parent."""

    path: Path
    size: int
    mtime_ns: int


def warm_key(
    *,
    image: str,
    version: int,
    cpus: int,
    memory_kib: int,
    files: Sequence[FileStamp],
    cmdline: str | None,
    libvirt_version: int,
    qemu_version: int,
) -> WarmKey:
    """The key of the warm parent for this image version and shape on this host. A new
    QEMU or libvirt, a rebuilt base disk or kernel, or another shape gives another key."""
    parts = [
        f"layout={LAYOUT}",
        f"image={image}",
        f"version={version}",
        f"cpus={cpus}",
        f"memory_kib={memory_kib}",
        f"cmdline={cmdline or ''}",
        f"libvirt={libvirt_version}",
        f"qemu={qemu_version}",
        *(f"file={f.path}:{f.size}:{f.mtime_ns}" for f in files),
    ]
    return WarmKey(image, version, cpus, memory_kib, fingerprint(parts), PARENT_PREFIX)


# -- libvirt save image header --------------------------------------------------------------


@dataclass(frozen=True)
class SaveHeader:
    """libvirt's header of a saved domain; QEMU's stream starts at `stream_offset`."""

    version: int
    data_len: int
    was_running: int
    format: int
    xml: str
    cookie: str | None
    unused: tuple[int, ...]

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len


def data_length(head: bytes) -> int:
    """How many bytes follow the fixed header (XML, cookie, padding); checks the magic."""
    if len(head) < HEADER_SIZE:
        raise SaveImageError("the saved state is shorter than libvirt's header")
    magic, version, data_len, *_ = _HEADER.unpack_from(head)
    if magic == SAVE_PARTIAL:
        raise SaveImageError("the saved state is incomplete (the save did not finish)")
    if magic != SAVE_MAGIC:
        raise SaveImageError("the file is not a libvirt saved state (wrong magic)")
    if version != SAVE_VERSION:
        raise SaveImageError(
            f"the saved state has header version {version}; this imagepipe reads {SAVE_VERSION}"
        )
    return int(data_len)


def parse_save_header(head: bytes) -> SaveHeader:
    """The header of a saved state from its first HEADER_SIZE + data_length(head) bytes."""
    data_len = data_length(head)
    if len(head) < HEADER_SIZE + data_len:
        raise SaveImageError("the saved state ends inside its header")
    _magic, version, _, was_running, fmt, cookie_offset, *unused = _HEADER.unpack_from(head)
    if fmt != FORMAT_RAW:
        raise SaveImageError(f"the saved state is compressed (format {fmt}); imagepipe saves raw")
    data = head[HEADER_SIZE : HEADER_SIZE + data_len]
    xml_part = data[:cookie_offset] if cookie_offset else data
    xml = xml_part.split(b"\0", 1)[0].decode()
    cookie = data[cookie_offset:].split(b"\0", 1)[0].decode() if cookie_offset else None
    if not xml.strip():
        raise SaveImageError("the saved state holds no domain XML")
    return SaveHeader(version, data_len, was_running, fmt, xml, cookie, tuple(unused))


def render_save_header(header: SaveHeader, xml: str) -> bytes:
    """The header with `xml` in place of the saved XML, the same length as the original, so
    QEMU's stream follows it unchanged."""
    xml_bytes = xml.encode() + b"\0"
    cookie_bytes = header.cookie.encode() + b"\0" if header.cookie is not None else b""
    body = xml_bytes + cookie_bytes
    if len(body) > header.data_len:
        raise SaveImageError(
            f"the clone's XML does not fit the saved state's header ({len(body)} > "
            f"{header.data_len} bytes)"
        )
    fixed = _HEADER.pack(
        SAVE_MAGIC,
        header.version,
        header.data_len,
        header.was_running,
        header.format,
        len(xml_bytes) if header.cookie is not None else 0,
        *header.unused,
    )
    return fixed + body + b"\0" * (header.data_len - len(body))


# -- domain XML of the parent and of a restored clone -----------------------------------------


def parent_xml(clone_xml: str, key: WarmKey) -> str:
    """The warm parent's domain XML: a clone's, with a `warm` element instead of the clone
    metadata, so list_clones never counts the parent as a desktop of a pool."""
    ET.register_namespace(METADATA_KEY, NAMESPACE)
    root = ET.fromstring(clone_xml)
    metadata = _find(root, "metadata")
    for child in list(metadata):
        metadata.remove(child)
    ET.SubElement(
        metadata,
        f"{{{NAMESPACE}}}warm",
        {"key": key.fingerprint, "image": key.image, "version": str(key.version)},
    )
    return ET.tostring(root, encoding="unicode")


def parent_domain_xml(
    clone_xml: str,
    key: WarmKey,
    *,
    uuid: str,
    disk: Path,
    console_socket: Path,
    agent_socket: Path,
    display: Endpoint,
) -> str:
    """The warm parent's XML from the domain XML of the first clone that needs it: the same
    machine under the parent's name, UUID, disk, sockets and display, marked `warm`."""
    meta = parse_metadata(ET.fromstring(clone_xml).find(f"metadata/{{{NAMESPACE}}}clone"))
    if meta is None:
        raise SaveImageError("the clone XML a warm parent is made from has no imagepipe metadata")
    who = RestoreIdentity(key.name, uuid, meta, disk, console_socket, agent_socket, display)
    return parent_xml(restore_xml(clone_xml, who), key)


def is_warm_parent(xml: str) -> bool:
    """The domain is a warm parent imagepipe made (safe for imagepipe to remove)."""
    return ET.fromstring(xml).find(f"metadata/{{{NAMESPACE}}}warm") is not None


@dataclass(frozen=True)
class RestoreIdentity:
    """What differs between a clone restored from a warm parent and the parent."""

    name: str
    uuid: str
    metadata: CloneMetadata
    disk: Path
    console_socket: Path
    agent_socket: Path
    display: Endpoint


def restore_xml(saved_xml: str, who: RestoreIdentity) -> str:
    """The domain XML a clone restores with: the warm parent's saved XML (the same machine,
    devices and addresses, so QEMU accepts the state) with the clone's name, UUID, metadata
    (marked as restored), SMBIOS identity, disk, console and agent sockets and display."""
    ET.register_namespace(METADATA_KEY, NAMESPACE)
    root = ET.fromstring(saved_xml)
    _find(root, "name").text = who.name
    uuid = root.find("uuid")
    if uuid is None:
        uuid = ET.SubElement(root, "uuid")
    uuid.text = who.uuid
    metadata = _find(root, "metadata")
    for child in list(metadata):
        metadata.remove(child)
    element = metadata_element(who.metadata)
    element.set(STARTED, StartMode.RESTORE.value)
    metadata.append(element)
    # The restored guest's memory holds the tables the parent booted with (its name); this is
    # what the clone says when it boots later (a fallback boot, a guest reboot); the guest
    # agent tells the restored guest its name (ClonePrep).
    set_smbios_identity(root, who.name, who.metadata)
    _find(root, "devices/disk[@device='disk']/source").set("file", str(who.disk))
    for tag in ("serial", "console"):
        for source in root.findall(f"devices/{tag}[@type='unix']/source"):
            source.set("path", str(who.console_socket))
    agents = [
        channel
        for channel in root.findall("devices/channel[@type='unix']")
        if channel.find(f"target[@name='{AGENT_CHANNEL}']") is not None
    ]
    if not agents:
        raise SaveImageError("the warm parent's domain XML has no guest agent channel")
    _find(agents[0], "source").set("path", str(who.agent_socket))
    graphics = _find(root, "devices/graphics[@type='vnc']")
    graphics.set("port", str(who.display.port))
    graphics.set("autoport", "no")
    graphics.set("listen", who.display.host)
    for listen in graphics.findall("listen"):
        graphics.remove(listen)
    ET.SubElement(graphics, "listen", {"type": "address", "address": who.display.host})
    return ET.tostring(root, encoding="unicode")


def _find(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    if element is None:
        raise SaveImageError(f"the warm parent's domain XML has no {path}")
    return element
