"""`imagepipe images import IMAGE --from-domain DOMAIN`: a libvirt golden VM's disk becomes a
new version (imagepipe/hypervisors/libvirt/importer.py does the libvirt side)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagepipe.app.bootstrap import domain_importer
from imagepipe.config import Settings
from imagepipe.errors import BadInputError, EnvironmentMissingError
from imagepipe.images.records import VersionRecord
from imagepipe.images.registry import NewVersion, Registry


@dataclass(frozen=True)
class Imported:
    record: VersionRecord
    overlay: Path | None  # where the domain goes on; None: this disk was imported before


def import_domain(settings: Settings, registry: Registry, image: str, domain: str) -> Imported:
    """Freeze the powered-off domain's disk into a new version of IMAGE; the domain goes on
    on an overlay. Importing an unchanged disk again returns the version it already is."""
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
    importer = domain_importer(settings)
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
        importer.close()
        shutil.rmtree(staging, ignore_errors=True)
