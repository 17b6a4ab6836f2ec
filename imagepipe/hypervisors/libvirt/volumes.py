"""Image versions and clone disks on a (remote) host, through libvirt's storage-volume API.

Nothing here touches a file on the host: a version's files are sent with `vol.upload` over
the libvirt connection into the host's storage pool `imagepipe` (a directory pool, defined
on first use), and a clone's disk is a volume made by `storageVolCreateXML` with a
<backingStore> (linked) or by `storageVolCreateXMLFrom` (a server-side full copy).

    <pool>/tiny_v3.uploading      made first, removed last: an upload is under way since its
                                  mtime; its size (sparse, nothing written) is the bytes the
                                  version's files take, so anyone can tell how far it got
    <pool>/tiny_v3--disk.qcow2    one volume per file of the version (disk, kernel, initrd)
    <pool>/tiny_v3.ready          made last: the version is complete on this host
    <pool>/lab-1.qcow2            a clone's disk

A version the registry has pruned is removed from a host (retire_version) once no volume
there backs onto it: its warm parents (`ipw-<key>.*`, whose disk is an overlay on the
version's disk) go with it when no desktop's disk backs onto them.

Each file's sha256 is checked against the registry's record before anything is sent.
Another process (`imagepipe status`, `imagepipe hosts`) sees an upload's progress from the
host alone (uploads_on): the bytes its volumes hold of the bytes they will hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from imagepipe.errors import BaseMissingError, FatalHypervisorError
from imagepipe.hypervisors.libvirt.errors import translated
from imagepipe.hypervisors.libvirt.warm import PARENT_PREFIX
from imagepipe.images.checksum import sha256_file
from imagepipe.pool.model import BaseImage, CloneMode, HostUpload

POOL_NAME = "imagepipe"
POOL_DIR = "/var/lib/libvirt/images/imagepipe"
READY = ".ready"
SAVE = ".save"  # a warm parent's or a clone's saved state (libvirt's save image)
UPLOADING = ".uploading"
CHUNK = 4 * 1024 * 1024

POOL_XML = f"""<pool type='dir'>
  <name>{POOL_NAME}</name>
  <target><path>{POOL_DIR}</path></target>
</pool>"""


def storage_pool(libvirt: Any, conn: Any, where: str) -> Any:
    """The host's `imagepipe` storage pool, active; defined (a directory pool) when missing."""
    with translated(libvirt, f"storage pool {POOL_NAME} on {where}"):
        try:
            pool = conn.storagePoolLookupByName(POOL_NAME)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            pool = conn.storagePoolDefineXML(POOL_XML, 0)
            pool.build(0)
            with contextlib.suppress(libvirt.libvirtError):
                pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
    return pool


def version_files(base: BaseImage) -> list[str]:
    """The files of a version a libvirt host needs: its disk, and a kernel/initrd if any."""
    return [f for f in (base.disk, base.kernel, base.initrd) if f is not None]


def file_volume(base: BaseImage, file: str) -> str:
    return f"{base.image}_v{base.version}--{file}"


def ready_volume(image: str, version: int) -> str:
    return f"{image}_v{version}{READY}"


def uploading_volume(image: str, version: int) -> str:
    return f"{image}_v{version}{UPLOADING}"


def versions_on(volume_names: list[str], marker: str = READY) -> tuple[tuple[str, int], ...]:
    """(image, version) of every complete version among a pool's volume names (or, with
    marker UPLOADING, of every version being uploaded)."""
    found = []
    for name in volume_names:
        if not name.endswith(marker):
            continue
        image, _, version = name[: -len(marker)].rpartition("_v")
        if image and version.isdigit():
            found.append((image, int(version)))
    return tuple(sorted(found))


def stored_versions(volume_names: list[str]) -> tuple[tuple[str, int], ...]:
    """(image, version) of every version with any volume in the pool: complete, being
    uploaded, or left half removed."""
    stems = {name.partition("--")[0] for name in volume_names if "--" in name}
    stems |= {
        name.removesuffix(m)
        for m in (READY, UPLOADING)
        for name in volume_names
        if name.endswith(m)
    }
    found = set()
    for stem in stems:
        image, _, version = stem.rpartition("_v")
        if image and version.isdigit():
            found.add((image, int(version)))
    return tuple(sorted(found))


def uploads_on(libvirt: Any, pool: Any, volume_names: list[str]) -> tuple[HostUpload, ...]:
    """The uploads under way in `pool` (whoever sends them): bytes its volumes hold of their
    full size, since the marker was made. Calls libvirt only while a marker is there."""
    done = set(versions_on(volume_names))
    found = []
    for image, version in versions_on(volume_names, UPLOADING):
        if (image, version) in done:
            continue
        prefix = f"{image}_v{version}--"
        sent = 0
        try:
            marker = pool.storageVolLookupByName(uploading_volume(image, version))
            total = int(marker.info()[1])
            mtime = ElementTree.fromstring(marker.XMLDesc(0)).findtext("target/timestamps/mtime")
            for name in volume_names:
                if name.startswith(prefix):  # a disk's capacity is its virtual size: not used
                    sent += int(pool.storageVolLookupByName(name).info()[2])
        except libvirt.libvirtError:
            continue  # finished or given up meanwhile
        since = float(mtime) if mtime else None
        found.append(HostUpload(image, version, min(sent, total), total, since))
    return tuple(found)


def check_checksums(base: BaseImage, expected: Mapping[str, str]) -> list[tuple[str, Path]]:
    """Every file of the version, after its sha256 matched the registry's; nothing is sent
    when one differs or the registry records none (BaseMissingError when a file is gone)."""
    files = []
    for file in version_files(base):
        path = (base.directory / file).absolute()
        if not path.is_file():
            raise BaseMissingError(
                f"image {base.image} v{base.version} is missing {path}: rebuild the version "
                "(imagepipe build) or retire it"
            )
        want = expected.get(file)
        if want is None:
            raise FatalHypervisorError(
                f"image {base.image} v{base.version}: the registry records no sha256 of "
                f"{file}, so it is not sent to other hosts; register the version again"
            )
        have = sha256_file(path)
        if have != want:
            raise FatalHypervisorError(
                f"image {base.image} v{base.version}: {path} has sha256 {have[:16]}…, the "
                f"registry recorded {want[:16]}…; the file changed after it was registered, "
                "so it is not sent to any host: rebuild the version"
            )
        files.append((file, path))
    return files


def upload_version(
    libvirt: Any,
    conn: Any,
    pool: Any,
    base: BaseImage,
    expected: Mapping[str, str],
    progress: Callable[[int, int], None],
    where: str,
) -> None:
    """Send the version's files into `pool` (checksums checked first), then mark it complete;
    `progress(sent, total)` after each chunk. A half-sent version of an earlier try is
    replaced."""
    files = check_checksums(base, expected)
    sizes = [(file, path, path.stat().st_size) for file, path in files]
    total = sum(size for _, _, size in sizes)
    sent = 0
    subject = f"upload of {base.image} v{base.version} to {where}"
    marker = uploading_volume(base.image, base.version)
    with translated(libvirt, subject):
        pool.refresh(0)
        for name in (
            ready_volume(base.image, base.version),
            marker,
            *[file_volume(base, f) for f, _ in files],
        ):
            delete_volume(libvirt, pool, name)
        pool.createXML(_empty_volume(marker, total), 0)
        volumes = []
        for file, path, size in sizes:
            xml = (
                f"<volume><name>{escape(file_volume(base, file))}</name>"
                f"<capacity unit='bytes'>{size}</capacity>"
                "<allocation unit='bytes'>0</allocation>"
                "<target><format type='raw'/></target></volume>"
            )
            volumes.append((pool.createXML(xml, 0), path, size))
        progress(0, total)
        for vol, path, size in volumes:
            stream = conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            try:
                with path.open("rb") as handle:
                    while chunk := handle.read(CHUNK):
                        stream.send(chunk)
                        sent += len(chunk)
                        progress(sent, total)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                with contextlib.suppress(libvirt.libvirtError):
                    delete_volume(libvirt, pool, marker)  # nobody sees a dead upload go on
                raise
        pool.refresh(0)  # the uploaded disk is probed again: its format is qcow2
        pool.createXML(_empty_volume(ready_volume(base.image, base.version)), 0)
        delete_volume(libvirt, pool, marker)


def _empty_volume(name: str, size: int = 0) -> str:
    """A raw volume of `size` bytes that takes no room (sparse): a marker."""
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
        "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
    )


def delete_version(libvirt: Any, pool: Any, base: BaseImage, where: str) -> None:
    with translated(libvirt, f"{base.image} v{base.version} on {where}"):
        for name in (
            ready_volume(base.image, base.version),
            uploading_volume(base.image, base.version),
            *map(lambda f: file_volume(base, f), version_files(base)),
        ):
            delete_volume(libvirt, pool, name)


def retire_version(
    libvirt: Any, conn: Any, pool: Any, image: str, version: int
) -> tuple[list[str], str]:
    """Remove a version's volumes from the host, and the warm parents made from it, when no
    other volume backs onto them and no domain (defined or running) names one of their
    files. Returns (the volumes removed, why it was kept: "" when removed). The `.ready`
    marker goes first: a half-removed version is never complete."""
    prefix = f"{image}_v{version}"
    names = list(pool.listVolumes())
    own = [
        n
        for n in names
        if n.startswith(f"{prefix}--") or n in (f"{prefix}{READY}", f"{prefix}{UPLOADING}")
    ]
    if not own:
        return [], ""
    paths = {str(pool.storageVolLookupByName(n).path()): n for n in own}
    backing = {n: _backing_path(pool.storageVolLookupByName(n)) for n in names if n not in own}
    parents = {
        n.removesuffix(".qcow2")
        for n, path in backing.items()
        if path in paths and n.startswith(PARENT_PREFIX) and n.endswith(".qcow2")
    }
    parent_disks = {str(pool.storageVolLookupByName(f"{p}.qcow2").path()) for p in parents}
    for name, path in sorted(backing.items()):
        if name.removesuffix(".qcow2") in parents:
            continue
        if path in paths or path in parent_disks:
            return [], f"the disk {name} backs onto it"
    files = [*paths, *parent_disks]
    for dom in conn.listAllDomains(0):
        xml = dom.XMLDesc(0)
        if any(f"'{path}'" in xml or f'"{path}"' in xml for path in files):
            return [], f"the domain {dom.name()} uses it"
    removed = []
    for parent in sorted(parents):  # manifest first: a parent without one is incomplete
        for suffix in (".json", SAVE, ".qcow2"):
            if f"{parent}{suffix}" in names:
                delete_volume(libvirt, pool, f"{parent}{suffix}")
                removed.append(f"{parent}{suffix}")
    for name in sorted(own, key=lambda n: (not n.endswith(READY), n)):
        delete_volume(libvirt, pool, name)
        removed.append(name)
    return removed, ""


def _backing_path(vol: Any) -> str | None:
    """The path of the volume's backing file (a qcow2 overlay's), or None."""
    node = ElementTree.fromstring(vol.XMLDesc(0)).find("backingStore/path")
    return node.text if node is not None and node.text else None


def base_volume(libvirt: Any, pool: Any, base: BaseImage, file: str, where: str) -> Any:
    """The volume of one file of a version on the host (BaseMissingError when not there)."""
    try:
        return pool.storageVolLookupByName(file_volume(base, file))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise BaseMissingError(
                f"image {base.image} v{base.version} is not on host {where} ({file}); it is "
                "uploaded before desktops are made there"
            ) from exc
        raise


def clone_volume(
    libvirt: Any, pool: Any, name: str, base_path: str, mode: CloneMode, where: str
) -> str:
    """A fresh disk for clone `name` on the host: a qcow2 overlay backed by the base volume
    (linked) or a server-side copy of it (full); an old disk of that name is replaced.
    Returns the disk's path on the host."""
    with translated(libvirt, f"disk of clone {name} on {where}"):
        volume = f"{name}.qcow2"
        delete_volume(libvirt, pool, volume)
        base = pool.storageVolLookupByName(Path(base_path).name)
        capacity = int(base.info()[1])
        target = (
            f"<name>{escape(volume)}</name><capacity unit='bytes'>{capacity}</capacity>"
            "<target><format type='qcow2'/></target>"
        )
        if mode is CloneMode.FULL:
            vol = pool.createXMLFrom(f"<volume>{target}</volume>", base, 0)
        else:
            vol = pool.createXML(
                f"<volume>{target}<backingStore><path>{escape(base_path)}</path>"
                "<format type='qcow2'/></backingStore></volume>",
                0,
            )
        return str(vol.path())


def delete_clone_volume(libvirt: Any, pool: Any, name: str, where: str) -> None:
    """The clone's disk and its own saved state (instant desktops), if any."""
    with translated(libvirt, f"disk of clone {name} on {where}"):
        delete_volume(libvirt, pool, f"{name}.qcow2")
        delete_volume(libvirt, pool, f"{name}{SAVE}")


def clone_volume_exists(libvirt: Any, pool: Any, name: str) -> bool:
    return find_volume(libvirt, pool, f"{name}.qcow2") is not None


def find_volume(libvirt: Any, pool: Any, name: str) -> Any | None:
    """The volume of that name in the pool, or None."""
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def raw_volume(libvirt: Any, pool: Any, name: str, size: int, source: Any = None) -> Any:
    """A new raw volume `name` of `size` bytes (an old one of that name is replaced): empty,
    or a copy of `source` made by libvirt on the host (createXMLFrom)."""
    delete_volume(libvirt, pool, name)
    xml = (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
        f"<allocation unit='bytes'>{size if source is not None else 0}</allocation>"
        "<target><format type='raw'/></target></volume>"
    )
    return pool.createXML(xml, 0) if source is None else pool.createXMLFrom(xml, source, 0)


def read_volume(libvirt: Any, conn: Any, vol: Any, offset: int, length: int) -> bytes:
    """`length` bytes of the volume from `offset` (fewer at its end), by vol.download."""
    stream = conn.newStream(0)
    vol.download(stream, offset, length, 0)
    parts = []
    try:
        got = 0
        while got < length:
            chunk = stream.recv(min(CHUNK, length - got))
            if not isinstance(chunk, bytes) or not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return b"".join(parts)


def write_volume(libvirt: Any, conn: Any, vol: Any, offset: int, data: bytes) -> None:
    """Overwrite `len(data)` bytes of the volume at `offset` in place (vol.upload with an
    offset and a length: the rest of the volume is left as it is)."""
    stream = conn.newStream(0)
    vol.upload(stream, offset, len(data), 0)
    try:
        view = memoryview(data)
        while view:
            sent = stream.send(bytes(view[:CHUNK]))
            if sent < 0:
                raise FatalHypervisorError(f"libvirt refused to send into volume {vol.name()}")
            view = view[sent:]
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise


def delete_volume(libvirt: Any, pool: Any, name: str) -> None:
    """Remove the volume `name`, if there is one."""
    try:
        pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
