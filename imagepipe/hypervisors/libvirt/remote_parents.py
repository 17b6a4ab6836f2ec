"""Warm parents on a remote libvirt host, made and used only through libvirt calls.

    parents = RemoteWarmParents(libvirt, libvirt_qemu, connection, storage, "host2")
    parent = parents.ensure(key, clone_xml, base_disk)   # boots + saves once; None: boot
    path = parents.write_clone_state(parent, identity)   # the clone's own saved state

The parent's pieces are volumes of the host's `imagepipe` storage pool (volumes.py):

    ipw-<fp>.qcow2   the disk the saved guest had (an overlay on the version's disk); every
                     clone's disk is an overlay on it
    ipw-<fp>.save    libvirt's saved state (virDomainSaveFlags writes it on the host)
    ipw-<fp>.json    the parent's manifest, made last: the parent is complete

A clone's own saved state `<clone>.save` is a copy libvirt makes on the host
(storageVolCreateXMLFrom), whose header is then overwritten in place with the clone's XML:
vol.upload with an offset of 0 and the header's length, so only those bytes cross the link.
The header is read with vol.download the same way. Nothing runs qemu-img and no file is
written here for the host. Failures follow parents.py: logged once, the caller boots, the
parent is tried again after RETRY_AFTER.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe.hypervisors.common import WarmBook, WarmKey
from imagepipe.hypervisors.libvirt.errors import translated
from imagepipe.hypervisors.libvirt.parents import (
    ensure_parent,
    remove_stale_parent,
    wait_for_agent,
)
from imagepipe.hypervisors.libvirt.volumes import (
    SAVE,
    clone_volume,
    delete_volume,
    find_volume,
    raw_volume,
    read_volume,
    write_volume,
)
from imagepipe.hypervisors.libvirt.warm import (
    HEADER_SIZE,
    PARENT_PREFIX,
    RestoreIdentity,
    SaveHeader,
    SaveImageError,
    data_length,
    parent_domain_xml,
    parse_save_header,
    render_save_header,
    restore_xml,
)
from imagepipe.pool.model import CloneMode, Endpoint

MANIFEST = ".json"


@dataclass(frozen=True)
class RemoteParent:
    key: WarmKey
    header: SaveHeader  # the saved state's header: the parent's live XML
    disk: Path  # paths on the host
    memory: Path
    libvirt_version: int  # the libvirt and QEMU that saved it
    qemu_version: int


class RemoteWarmParents:
    """Makes and finds warm parents on one remote host. Thread-safe within this process:
    one build per key at a time."""

    def __init__(
        self,
        libvirt: Any,
        libvirt_qemu: Any,
        connection: Callable[[], Any],
        storage: Callable[[], Any],
        where: str,
        socket_dir: Path,
    ) -> None:
        self._libvirt = libvirt
        self._libvirt_qemu = libvirt_qemu
        self._connection = connection
        self._storage = storage
        self._where = where
        self._socket_dir = socket_dir
        self._book = WarmBook()
        self._headers: dict[str, SaveHeader] = {}  # parent -> its header (a parent never changes)

    def say_once(self, what: str, message: str) -> None:
        self._book.say_once(what, message)

    def load(self, name: str) -> RemoteParent | None:
        """The complete parent of that name on the host, or None."""
        lv = self._libvirt
        pool = self._storage()
        with translated(lv, f"warm parent {name} on {self._where}"):
            manifest_vol = find_volume(lv, pool, f"{name}{MANIFEST}")
            memory = find_volume(lv, pool, f"{name}{SAVE}")
            disk = find_volume(lv, pool, f"{name}.qcow2")
            if manifest_vol is None or memory is None or disk is None:
                self._headers.pop(name, None)
                return None
            size = int(manifest_vol.info()[1])
            try:
                manifest = json.loads(read_volume(lv, self._connection(), manifest_vol, 0, size))
                key = WarmKey(
                    manifest["image"],
                    int(manifest["version"]),
                    int(manifest["cpus"]),
                    int(manifest["memory_kib"]),
                    manifest["fingerprint"],
                    PARENT_PREFIX,
                )
                versions = int(manifest["libvirt"]), int(manifest["qemu"])
                header = self._headers.get(name) or self.read_header(memory)
            except (ValueError, KeyError, TypeError, SaveImageError):
                return None
            self._headers[name] = header
            return RemoteParent(key, header, Path(disk.path()), Path(memory.path()), *versions)

    def read_header(self, vol: Any) -> SaveHeader:
        """The header of a saved state volume: two small downloads, not the whole state."""
        conn = self._connection()
        head = read_volume(self._libvirt, conn, vol, 0, HEADER_SIZE)
        head += read_volume(self._libvirt, conn, vol, HEADER_SIZE, data_length(head))
        return parse_save_header(head)

    def ensure(self, key: WarmKey, clone_xml: str, base_disk: str) -> RemoteParent | None:
        """The warm parent for `key` on the host, made now when there is none (boot until the
        guest agent answers, save). None when it cannot be made: said once; the caller boots."""
        return ensure_parent(
            self._book, self._libvirt, key, self.load, lambda: self._make(key, clone_xml, base_disk)
        )

    def _make(self, key: WarmKey, clone_xml: str, base_disk: str) -> RemoteParent:
        lv = self._libvirt
        conn = self._connection()
        pool = self._storage()
        name = key.name
        with translated(lv, f"warm parent of {key} on {self._where}"):
            remove_stale_parent(lv, conn, name)
            for suffix in (MANIFEST, SAVE):
                delete_volume(lv, pool, f"{name}{suffix}")
            disk = clone_volume(lv, pool, name, base_disk, CloneMode.LINKED, self._where)
        xml = parent_domain_xml(
            clone_xml,
            key,
            uuid=str(uuid.uuid4()),
            disk=Path(disk),
            console_socket=self._socket_dir / f"imagepipe-{name}.console",
            agent_socket=self._socket_dir / f"imagepipe-{name}.agent",
            display=Endpoint("127.0.0.1", 5900),
        )
        dom = conn.createXML(any_display_port(xml), 0)  # transient: gone once saved
        try:
            wait_for_agent(lv, self._libvirt_qemu, dom, key)
            memory = raw_volume(lv, pool, f"{name}{SAVE}", 0)
            dom.saveFlags(str(memory.path()), None, lv.VIR_DOMAIN_SAVE_RUNNING)
        except BaseException:
            with contextlib.suppress(lv.libvirtError):
                dom.destroy()
            raise
        manifest = json.dumps(
            {
                "image": key.image,
                "version": key.version,
                "cpus": key.cpus,
                "memory_kib": key.memory_kib,
                "fingerprint": key.fingerprint,
                "base": base_disk,
                "libvirt": int(conn.getLibVersion()),
                "qemu": int(conn.getVersion()),
                "made_at": time.time(),
            },
            indent=2,
        ).encode()
        with translated(lv, f"warm parent of {key} on {self._where}"):
            vol = raw_volume(lv, pool, f"{name}{MANIFEST}", len(manifest))
            write_volume(lv, conn, vol, 0, manifest)
        parent = self.load(name)
        if parent is None:
            raise SaveImageError(f"the warm parent {name} on {self._where} is incomplete")
        return parent

    def write_clone_state(self, parent: RemoteParent, who: RestoreIdentity) -> Path:
        """The clone's own saved state on the host: libvirt copies the parent's there, then
        its header (only) is overwritten with the clone's XML. Returns its path on the host."""
        lv = self._libvirt
        head = render_save_header(parent.header, restore_xml(parent.header.xml, who))
        pool = self._storage()
        with translated(lv, f"saved state of clone {who.name} on {self._where}"):
            source = pool.storageVolLookupByName(f"{parent.key.name}{SAVE}")
            size = int(source.info()[1])
            vol = raw_volume(lv, pool, f"{who.name}{SAVE}", size, source)
            write_volume(lv, self._connection(), vol, 0, head)
            return Path(vol.path())

    def clone_state(self, name: str, uuid_: str) -> tuple[bool, Path | None]:
        """Whether the clone has its own saved state on the host, and its path when it can be
        restored: its header names the clone's UUID (a copy whose header was never rewritten,
        or a damaged one, is not restored; it is said once in the log)."""
        lv = self._libvirt
        pool = self._storage()
        with translated(lv, f"saved state of clone {name} on {self._where}"):
            vol = find_volume(lv, pool, f"{name}{SAVE}")
            if vol is None:
                return False, None
            try:
                header: SaveHeader | None = self.read_header(vol)
            except SaveImageError as exc:
                self.say_once(f"state:{name}", f"the saved state of {name} is unusable: {exc}")
                header = None
            if header is None or _uuid_of(header.xml) != uuid_:
                self.say_once(
                    f"state:{name}",
                    f"the saved state of {name} on {self._where} is not the clone's; it boots",
                )
                return True, None
            return True, Path(vol.path())

    def drop_clone_state(self, name: str) -> None:
        with translated(self._libvirt, f"saved state of clone {name} on {self._where}"):
            delete_volume(self._libvirt, self._storage(), f"{name}{SAVE}")


def any_display_port(xml: str) -> str:
    """The parent's VNC display on a port libvirt picks on the host (nobody connects to it;
    a restored clone gets its own)."""
    root = ET.fromstring(xml)
    for graphics in root.findall("devices/graphics[@type='vnc']"):
        graphics.attrib.pop("port", None)
        graphics.set("autoport", "yes")
    return ET.tostring(root, encoding="unicode")


def _uuid_of(xml: str) -> str | None:
    try:
        element = ET.fromstring(xml).find("uuid")
    except ET.ParseError:
        return None
    return element.text if element is not None else None
