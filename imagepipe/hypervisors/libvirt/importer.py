"""`imagepipe images import IMAGE --from-domain DOMAIN` (libvirt): a golden VM an
administrator maintains by hand becomes a version.

The powered-off domain's disk is frozen: it moves into the image store (a hard link, so no
copy on the same file system), read-only, as the new version's base; the domain is redefined
to continue on a new qcow2 overlay backed by it, so the administrator keeps patching it and
the next import freezes the overlay. The version records the domain (`vm`), and while that
domain runs, the libvirt adapter reports the base as not ready: clones, and rollouts to that
version, wait until it is powered off (the same rule as a VirtualBox base VM).

A running domain is refused: a disk frozen under a running guest is only crash-consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe.errors import BadInputError, InvalidStateError, OperationFailedError
from imagepipe.hypervisors.libvirt.disks import disk_format, run_qemu_img
from imagepipe.hypervisors.libvirt.domain_xml import NAMESPACE
from imagepipe.hypervisors.libvirt.errors import error_for, translated
from imagepipe.hypervisors.libvirt.hypervisor import import_libvirt

STATE_SHUTOFF = 5  # VIR_DOMAIN_SHUTOFF
DISK_NAME = "disk.qcow2"


@dataclass(frozen=True)
class BootDisk:
    """What a domain boots from, out of its XML."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class StagedDomain:
    """A powered-off domain's files, staged for the registry."""

    domain: str
    uuid: str
    original: Path  # the domain's disk now
    disk_format: str
    files: tuple[Path, ...]  # disk (named DISK_NAME) first, then kernel and initrd
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    fingerprint: str


def boot_disk(xml: str) -> BootDisk:
    """The first file-backed disk and the direct-boot kernel, initrd and command line."""
    root = ET.fromstring(xml)
    if root.find(f"metadata/{{{NAMESPACE}}}clone") is not None:
        raise BadInputError(
            f"domain {root.findtext('name')} is a desktop imagepipe made, not a base VM"
        )
    source = root.find("devices/disk[@device='disk']/source[@file]")
    if source is None:
        raise BadInputError(
            f"domain {root.findtext('name')} has no disk in a file (<disk type='file'>): "
            "imagepipe can only import a file-backed disk"
        )

    def path(tag: str) -> Path | None:
        text = root.findtext(f"os/{tag}")
        return Path(text) if text else None

    return BootDisk(
        disk=Path(source.get("file", "")),
        kernel=path("kernel"),
        initrd=path("initrd"),
        cmdline=root.findtext("os/cmdline") or None,
    )


def on_overlay(xml: str, original: Path, overlay: Path) -> str:
    """The domain's XML with its disk `original` replaced by the qcow2 `overlay`."""
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk[@device='disk']"):
        source = disk.find("source[@file]")
        if source is not None and Path(source.get("file", "")) == original:
            source.set("file", str(overlay))
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", "qcow2")
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


class DomainImporter:
    """One libvirt connection, for one import."""

    def __init__(self, uri: str) -> None:
        self._libvirt, _ = import_libvirt()
        try:
            self._conn = self._libvirt.open(uri)
        except self._libvirt.libvirtError as exc:
            raise error_for(exc.get_error_code() or 0, str(exc), f"libvirt at {uri}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    def _translate(self, subject: str) -> contextlib.AbstractContextManager[None]:
        return translated(self._libvirt, subject)

    def _domain(self, name: str) -> Any:
        with self._translate(f"domain {name}"):
            return self._conn.lookupByName(name)

    def stage(self, name: str, staging: Path) -> StagedDomain:
        """Check the domain and put its files (hard links where possible) in `staging`."""
        dom = self._domain(name)
        with self._translate(f"domain {name}"):
            state = int(dom.state()[0])
            xml = dom.XMLDesc(0)
            uuid = dom.UUIDString()
        if state != STATE_SHUTOFF:
            raise InvalidStateError(
                f"domain {name} is running: shut it down first (its disk must be complete)"
            )
        boot = boot_disk(xml)
        if not boot.disk.is_file():
            raise BadInputError(f"domain {name}: its disk {boot.disk} does not exist")
        staging.mkdir(parents=True, exist_ok=True)
        files = [_link_or_copy(boot.disk, staging / DISK_NAME)]
        for extra in (boot.kernel, boot.initrd):
            if extra is not None:
                files.append(_link_or_copy(extra, staging / extra.name))
        digest = _sha256(boot.disk)
        return StagedDomain(
            domain=name,
            uuid=uuid,
            original=boot.disk,
            disk_format=disk_format(boot.disk),
            files=tuple(files),
            kernel=boot.kernel.name if boot.kernel else None,
            initrd=boot.initrd.name if boot.initrd else None,
            cmdline=boot.cmdline,
            fingerprint=f"libvirt-domain:{uuid}:{digest}",
        )

    def continue_on_overlay(self, staged: StagedDomain, frozen: Path, label: str) -> Path:
        """Redefine the domain on a new overlay backed by the frozen disk; its old disk
        file (the same content, now in the store) is removed. Returns the overlay."""
        overlay = staged.original.with_name(f"{staged.domain}-after-{label}.qcow2")
        run_qemu_img(
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                staged.disk_format,
                "-b",
                str(frozen),
                str(overlay),
            ]
        )
        dom = self._domain(staged.domain)
        with self._translate(f"domain {staged.domain}"):
            xml = on_overlay(
                dom.XMLDesc(self._libvirt.VIR_DOMAIN_XML_INACTIVE), staged.original, overlay
            )
            self._conn.defineXML(xml)
        if staged.original.exists() and _same_file(staged.original, frozen):
            staged.original.unlink()
        return overlay


def _link_or_copy(source: Path, target: Path) -> Path:
    try:
        os.link(source, target)
    except OSError:
        try:
            shutil.copy2(source, target)
        except OSError as exc:
            raise OperationFailedError(f"cannot copy {source} to {target}: {exc}") from exc
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
