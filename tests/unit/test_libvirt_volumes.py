"""The pure parts of the storage-volume code of remote libvirt hosts (volumes.py): which
versions a pool's volume names say a host holds, and the sha256 gate before any upload."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from imagepipe.errors import BaseMissingError, FatalHypervisorError
from imagepipe.hypervisors.libvirt.volumes import (
    check_checksums,
    file_volume,
    ready_volume,
    stored_versions,
    uploading_volume,
    versions_on,
)
from imagepipe.pool.model import BaseImage


def version(tmp_path: Path) -> BaseImage:
    folder = tmp_path / "tiny-v3"
    folder.mkdir()
    (folder / "disk.qcow2").write_bytes(b"disk bytes")
    (folder / "vmlinuz").write_bytes(b"kernel bytes")
    return BaseImage(
        image="my_tiny", version=3, directory=folder, disk="disk.qcow2", kernel="vmlinuz"
    )


def digests(base: BaseImage) -> dict[str, str]:
    return {
        f: hashlib.sha256((base.directory / f).read_bytes()).hexdigest()
        for f in ("disk.qcow2", "vmlinuz")
    }


def test_a_host_holds_only_the_versions_whose_ready_volume_exists() -> None:
    base = BaseImage(image="my_tiny", version=3, directory=Path("/x"), disk="disk.qcow2")
    half_sent = BaseImage(image="lab", version=12, directory=Path("/x"), disk="disk.qcow2")
    names = [
        file_volume(base, "disk.qcow2"),
        ready_volume("my_tiny", 3),
        file_volume(half_sent, "disk.qcow2"),  # its .ready was never made
        "lab-1.qcow2",
        ready_volume("other", 1),
    ]
    assert versions_on(names) == (("my_tiny", 3), ("other", 1))


def test_a_tidy_sees_versions_being_sent_or_left_half_removed_not_only_complete_ones(
    tmp_path: Path,
) -> None:
    base = version(tmp_path)
    names = [
        file_volume(base, "disk.qcow2"),  # its .ready marker already removed
        uploading_volume("sent", 2),
        ready_volume("other", 1),
        "ipw-0123abcd.qcow2",
        "lab-1.qcow2",
        "lab-1.save",
    ]
    assert stored_versions(names) == (("my_tiny", 3), ("other", 1), ("sent", 2))
    assert versions_on(names) == (("other", 1),)


def test_files_that_match_the_registry_are_passed_for_upload(tmp_path: Path) -> None:
    base = version(tmp_path)
    files = check_checksums(base, digests(base))
    assert [name for name, _ in files] == ["disk.qcow2", "vmlinuz"]


def test_a_file_that_changed_after_registration_is_refused_naming_it(tmp_path: Path) -> None:
    base = version(tmp_path)
    recorded = digests(base)
    (base.directory / "vmlinuz").write_bytes(b"tampered")
    with pytest.raises(FatalHypervisorError, match=r"vmlinuz has sha256 .* registry recorded"):
        check_checksums(base, recorded)


def test_a_file_the_registry_has_no_checksum_of_is_not_sent(tmp_path: Path) -> None:
    base = version(tmp_path)
    recorded = digests(base)
    del recorded["vmlinuz"]
    with pytest.raises(FatalHypervisorError, match="records no sha256 of vmlinuz"):
        check_checksums(base, recorded)


def test_a_missing_file_is_a_missing_base(tmp_path: Path) -> None:
    base = version(tmp_path)
    recorded = digests(base)
    (base.directory / "disk.qcow2").unlink()
    with pytest.raises(BaseMissingError, match=r"disk\.qcow2"):
        check_checksums(base, recorded)
