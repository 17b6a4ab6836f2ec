"""Image files are checked against the registry's sha256 before clones are made from them.

The image store may be shared (NFS and the like) and written by several builders, so a file
the registry recorded may have changed since: a version whose file differs is never used
(ArtifactMismatchError; observe reports the pool's base as not ready). A file is hashed once
per (device, inode, size, mtime, ctime): a keeper pass does not re-read a multi-gigabyte disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from imagepipe.errors import OperationFailedError
from imagepipe.images.checksum import sha256_file
from imagepipe.images.records import VersionRecord
from imagepipe.images.registry import Registry
from imagepipe.log import fields

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class ArtifactMismatchError(OperationFailedError):
    """A version's file in the image store is missing or differs from the registry's record."""


@dataclass
class ArtifactChecker:
    """Hashes each file once per change of its stat signature."""

    _digests: dict[Path, tuple[_Signature, str]] = field(default_factory=dict)
    hashed: int = 0  # files read in full, for tests and metrics

    def check(self, record: VersionRecord) -> None:
        """ArtifactMismatchError unless every artifact of `record` is as registered."""
        for artifact in record.artifacts:
            path = Path(record.directory) / artifact.name
            try:
                info = path.stat()
            except OSError as exc:
                raise ArtifactMismatchError(
                    f"{record.label}: {path} is unreadable ({exc.strerror}): not used"
                ) from None
            if info.st_size != artifact.size:
                self._refuse(record, path, f"{info.st_size} bytes, registered {artifact.size}")
            signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            cached = self._digests.get(path)
            if cached is not None and cached[0] == signature:
                digest = cached[1]
            else:
                digest = sha256_file(path)
                self.hashed += 1
                self._digests[path] = (signature, digest)
            if digest != artifact.sha256:
                self._refuse(
                    record, path, f"sha256 {digest[:16]}…, registered {artifact.sha256[:16]}…"
                )

    def _refuse(self, record: VersionRecord, path: Path, detail: str) -> None:
        log.error(
            "image file differs from the registry: version not used",
            extra=fields(image=record.image, version=record.version, file=str(path)),
        )
        raise ArtifactMismatchError(
            f"{record.label}: {path} differs from the registry ({detail}): this version is not "
            "used; rebuild it or restore the file"
        )


class CheckedImages:
    """The registry as the keeper and rollouts see it: a version resolves only when its files
    match the registry's checksums (imagepipe.pool.ports.Images and Channels)."""

    def __init__(self, registry: Registry, checker: ArtifactChecker | None = None) -> None:
        self.registry = registry
        self.checker = checker or ArtifactChecker()

    def resolve(self, image: str, ref: str | int | None = None) -> VersionRecord:
        record = self.registry.resolve(image, ref)
        self.checker.check(record)
        return record

    def channel_version(self, image: str, channel: str) -> int | None:
        return self.registry.channel_version(image, channel)

    def newest_version(self, image: str) -> int:
        return self.registry.newest_version(image)

    def move_channel(self, image: str, channel: str, version: int, by: str) -> None:
        self.registry.move_channel(image, channel, version, by)
