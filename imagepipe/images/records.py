"""The registry's records: immutable versions, channels with history, status changes."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the pool model's 35 dataclasses cost a build or a listing ~70 ms to make
    from imagepipe.pool.model import BaseImage

ScalarValue = str | int | float | bool


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"  # must not be used; pools move off it
    PRUNED = "pruned"  # artifacts removed from the image store


class ArtifactFile(_Frozen):
    name: str
    size: int
    sha256: str


class VersionRecord(_Frozen):
    """One registered version of an image. Written once; only `status` changes (elsewhere)."""

    image: str
    version: int
    created_at: str
    fingerprint: str
    builder: str
    packer_version: str
    source_commit: str | None = None  # commit of the repository holding packer/
    source_dirty: bool = False  # uncommitted changes under packer/ at build time
    parent: int | None = None
    directory: str  # the version's folder in the image store (read-only)
    artifacts: tuple[ArtifactFile, ...] = ()
    disk: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    vm: str | None = None  # VirtualBox base VM
    snapshot: str | None = None  # VirtualBox snapshot clones link to
    variables: dict[str, ScalarValue] = Field(default_factory=dict)  # secrets never included
    status: Status = Status.ACTIVE
    status_reason: str | None = None
    status_at: str | None = None

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


class ChannelMove(_Frozen):
    """A channel was pointed at `version` (by a build, promote, rollback or revoke)."""

    version: int
    at: str
    by: str


class StatusChange(_Frozen):
    version: int
    status: Status
    reason: str
    at: str


class ImageState(_Frozen):
    """Per image, the mutable part: channel histories and status changes."""

    channels: dict[str, tuple[ChannelMove, ...]] = Field(default_factory=dict)
    changes: tuple[StatusChange, ...] = ()

    def current(self, channel: str) -> int | None:
        history = self.channels.get(channel)
        return history[-1].version if history else None
