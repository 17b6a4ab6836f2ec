"""Image files are checked against the registry's sha256 before clones are made from them.

The image store may be shared (NFS and the like) and written by several builders, so a file
the registry recorded may have changed since: a version whose file differs is never used
(ArtifactMismatchError; observe reports the pool's base as not ready). A file is hashed once
per (device, inode, size, mtime, ctime): a keeper pass does not re-read a multi-gigabyte disk,
and with a cache file (beside the registry's clone, owner-only) neither does the next command.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from imagepipe.errors import OperationFailedError
from imagepipe.images.checksum import sha256_file
from imagepipe.images.records import VersionRecord
from imagepipe.images.registry import Registry
from imagepipe.log import fields
from imagepipe.private import FILE_MODE

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class ArtifactMismatchError(OperationFailedError):
    """A version's file in the image store is missing or differs from the registry's record."""


@dataclass
class ArtifactChecker:
    """Hashes each file once per change of its stat signature."""

    cache_file: Path | None = None  # digests kept between processes; None: in memory only
    _digests: dict[Path, tuple[_Signature, str]] = field(default_factory=dict)
    _loaded: bool = False
    hashed: int = 0  # files read in full, for tests and metrics

    def check(self, record: VersionRecord) -> None:
        """ArtifactMismatchError unless every artifact of `record` is as registered."""
        self._load()
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
                self._save()
            if digest != artifact.sha256:
                self._refuse(
                    record, path, f"sha256 {digest[:16]}…, registered {artifact.sha256[:16]}…"
                )

    def _load(self) -> None:
        """The cache file's entries; an unreadable or malformed file (or entry) is ignored:
        the files are hashed again."""
        if self._loaded or self.cache_file is None:
            return
        self._loaded = True
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        for name, entry in data.items():
            if (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], list)
                and len(entry[0]) == 5
                and all(isinstance(n, int) for n in entry[0])
                and isinstance(entry[1], str)
                and re.fullmatch(r"[0-9a-f]{64}", entry[1])
            ):
                sig = entry[0]
                self._digests.setdefault(
                    Path(name), ((sig[0], sig[1], sig[2], sig[3], sig[4]), entry[1])
                )

    def _save(self) -> None:
        """Best effort (a read-only admin machine just hashes again next time)."""
        if self.cache_file is None:
            return
        data = {str(p): [list(sig), digest] for p, (sig, digest) in self._digests.items()}
        tmp = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.debug("checksum cache not written", extra=fields(error=str(exc)))
            tmp.unlink(missing_ok=True)

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
        cache = registry.path.parent / f".{registry.path.name}.sha256.json"
        self.checker = checker or ArtifactChecker(cache_file=cache)

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
