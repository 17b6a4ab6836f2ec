"""The registry's records: immutable versions, channels with history, status changes."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from imagepipe.schema import (
    Section,
    flag,
    key,
    mapping_of,
    member,
    optional,
    scalar,
    section,
    text,
    tuple_of,
    whole,
)

if TYPE_CHECKING:  # the pool model's 35 dataclasses cost a build or a listing ~70 ms to make
    from imagepipe.pool.model import BaseImage

ScalarValue = str | int | float | bool


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"  # must not be used; pools move off it
    PRUNED = "pruned"  # artifacts removed from the image store


class ArtifactFile(Section):
    name: str = key(text)
    size: int = key(whole())
    sha256: str = key(text)


_maybe_text = optional(text)


class VersionRecord(Section):
    """One registered version of an image. Written once; only `status` changes (elsewhere).
    The fields' order is the order `images show --json` prints them in."""

    image: str = key(text)
    version: int = key(whole())
    created_at: str = key(text)
    fingerprint: str = key(text)
    builder: str = key(text)
    packer_version: str = key(text)
    # commit of the repository holding packer/
    source_commit: str | None = key(_maybe_text, default=None)
    # uncommitted changes under packer/ at build time
    source_dirty: bool = key(flag, default=False)
    parent: int | None = key(optional(whole()), default=None)
    directory: str = key(text)  # the version's folder in the image store (read-only)
    artifacts: tuple[ArtifactFile, ...] = key(tuple_of(section(ArtifactFile)), default=())
    disk: str | None = key(_maybe_text, default=None)
    kernel: str | None = key(_maybe_text, default=None)
    initrd: str | None = key(_maybe_text, default=None)
    cmdline: str | None = key(_maybe_text, default=None)
    vm: str | None = key(_maybe_text, default=None)  # VirtualBox base VM
    snapshot: str | None = key(_maybe_text, default=None)  # VirtualBox snapshot clones link to
    # secrets never included
    variables: dict[str, ScalarValue] = key(mapping_of(scalar), default_factory=dict)
    status: Status = key(member(Status), default=Status.ACTIVE)
    status_reason: str | None = key(_maybe_text, default=None)
    status_at: str | None = key(_maybe_text, default=None)

    @property
    def label(self) -> str:
        return f"{self.image} v{self.version}"

    @property
    def usable(self) -> bool:
        return self.status is Status.ACTIVE

    def base_image(self) -> BaseImage:
        from imagepipe.pool.model import BaseImage

        return BaseImage(
            image=self.image,
            version=self.version,
            directory=Path(self.directory),
            disk=self.disk,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
            vm=self.vm,
            snapshot=self.snapshot,
        )


class ChannelMove(Section):
    """A channel was pointed at `version` (by a build, promote, rollback or revoke)."""

    version: int = key(whole())
    at: str = key(text)
    by: str = key(text)


class StatusChange(Section):
    version: int = key(whole())
    status: Status = key(member(Status))
    reason: str = key(text)
    at: str = key(text)


class ImageState(Section):
    """Per image, the mutable part: channel histories and status changes."""

    channels: dict[str, tuple[ChannelMove, ...]] = key(
        mapping_of(tuple_of(section(ChannelMove))), default_factory=dict
    )
    changes: tuple[StatusChange, ...] = key(tuple_of(section(StatusChange)), default=())

    def current(self, channel: str) -> int | None:
        history = self.channels.get(channel)
        return history[-1].version if history else None
