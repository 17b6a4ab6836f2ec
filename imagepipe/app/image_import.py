"""`imagepipe images import IMAGE --from-domain DOMAIN`: a libvirt golden VM's disk becomes a
new version (imagepipe/hypervisors/libvirt/importer.py does the libvirt side); `--from-vm VM`:
a VirtualBox VM's current snapshot does (its disks stay where VirtualBox keeps them)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagepipe.app.bootstrap import Runtime
from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.images.records import VersionRecord
from imagepipe.images.registry import NewVersion


@dataclass(frozen=True)
class Imported:
    record: VersionRecord
    overlay: Path | None  # where the domain goes on; None: this disk was imported before


@dataclass(frozen=True)
class ImportedVm:
    record: VersionRecord
    vm: str  # the VM as registered (its name)
    snapshot: str  # its current snapshot's id
    snapshot_name: str


def import_vm(runtime: Runtime, image: str, vm: str) -> ImportedVm:
    """Register the VM's current snapshot as a new version of IMAGE; importing the same
    snapshot again returns the version it already is."""
    registry = runtime.registry
    found = runtime.describe_virtualbox_vm(vm)
    record = registry.find_fingerprint(image, found.fingerprint) or registry.register(
        NewVersion(
            image=image,
            fingerprint=found.fingerprint,
            builder="virtualbox-vm",
            packer_version="",
            files=(),
            vm=found.vm,
            snapshot=found.snapshot,
        )
    )
    return ImportedVm(record, found.vm, found.snapshot, found.snapshot_name)


def import_domain(runtime: Runtime, image: str, domain: str) -> Imported:
    """Freeze the powered-off domain's disk into a new version of IMAGE; the domain goes on
    on an overlay. Importing an unchanged disk again returns the version it already is."""
    settings, registry = runtime.settings, runtime.registry
    if settings.hypervisor.driver != "libvirt":
        raise BadInputError(
            "--from-domain imports a libvirt domain: set hypervisor.driver: libvirt "
            "(VirtualBox: --from-vm)"
        )
    try:
        settings.image_store.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.image_store))
    except OSError as exc:
        raise EnvironmentMissingError(
            f"cannot write to the image store {settings.image_store}: {exc.strerror}"
        ) from exc
    importer = runtime.domain_importer()
    try:
        staged = importer.stage(domain, staging)
        known = registry.find_fingerprint(image, staged.fingerprint)
        if known is not None:
            return Imported(known, None)
        record = registry.register(
            NewVersion(
                image=image,
                fingerprint=staged.fingerprint,
                builder="libvirt-domain",
                packer_version="",
                files=staged.files,
                disk=staged.files[0].name,
                kernel=staged.kernel,
                initrd=staged.initrd,
                cmdline=staged.cmdline,
                vm=domain,
            )
        )
        frozen = Path(record.directory) / staged.files[0].name
        return Imported(record, importer.continue_on_overlay(staged, frozen, record.label))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
