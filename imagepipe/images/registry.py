"""The image registry: a git repository of version records and channels.

    <registry>/images/<image>/versions/v0007.json   one immutable record per version
    <registry>/images/<image>/state.json            channels (with history), revocations, prunes

Every change is one commit; a registration is also tagged `<image>/v<N>`. Writers hold a file
lock (`<registry>.lock`, beside the repository) around read-modify-write, so concurrent builds
never lose or reuse a version. Artifacts live in `<image_store>/<image>/v<N>/`, read-only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from imagepipe import names
from imagepipe.errors import BadInputError, ConfigError, OperationFailedError
from imagepipe.images.checksum import sha256_file
from imagepipe.images.records import (
    ArtifactFile,
    ChannelMove,
    ImageState,
    ScalarValue,
    Status,
    StatusChange,
    VersionRecord,
    now_iso,
)
from imagepipe.log import fields
from imagepipe.private import FILE_MODE, private_dir
from imagepipe.yamlsrc import read_text

if TYPE_CHECKING:  # GitPython and filelock are imported by the first write: reads need neither
    import git
    from filelock import FileLock

log = logging.getLogger(__name__)

LATEST = "latest"
MAX_REGISTRY_FILE = 1024 * 1024  # a record is ~2 KiB; state.json grows by ~100 B per move
ACTOR_NAME, ACTOR_EMAIL = "imagepipe", "imagepipe@localhost"


@dataclass(frozen=True)
class NewVersion:
    """What a finished build hands the registry."""

    image: str
    fingerprint: str
    builder: str
    packer_version: str
    files: tuple[Path, ...]
    source_commit: str | None = None
    source_dirty: bool = False
    parent: int | None = None
    disk: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    vm: str | None = None
    snapshot: str | None = None
    variables: tuple[tuple[str, ScalarValue], ...] = ()


@dataclass(frozen=True)
class _Cached:
    """A parsed registry file and the stat signature it was parsed from."""

    signature: tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns
    value: VersionRecord | ImageState


class Registry:
    """Reads are cached per file by (inode, size, mtime, ctime): a keeper pass that resolves
    every pool's image stats the files but parses only those another process changed (the
    registry replaces files atomically, so a change always gives a new inode)."""

    def __init__(self, path: Path, store_dir: Path) -> None:
        self.path = path
        self.store_dir = store_dir
        self._cache: dict[Path, _Cached] = {}
        self._lock: FileLock | None = None  # made by the first write
        self.parsed = 0  # files parsed (not served from the cache), for tests and metrics

    # ---------------------------------------------------------------- reading

    def images(self) -> list[str]:
        root = self.path / "images"
        if not root.is_dir():
            return []
        # a folder made by hand with another name is not an image (and cannot be read as one)
        return sorted(
            p.name for p in root.iterdir() if p.is_dir() and names.image_error(p.name) is None
        )

    def versions(self, image: str) -> list[VersionRecord]:
        """Every version of `image`, oldest first, with its current status."""
        folder = self._image_dir(image) / "versions"
        if not folder.is_dir():
            return []
        state = self._state(image)
        records = [self._read_record(p) for p in sorted(folder.glob("v*.json"))]
        changes = {c.version: c for c in state.changes}  # later changes win
        merged = [
            r.model_copy(
                update={
                    "status": changes[r.version].status,
                    "status_reason": changes[r.version].reason,
                    "status_at": changes[r.version].at,
                }
            )
            if r.version in changes
            else r
            for r in records
        ]
        return sorted(merged, key=lambda r: r.version)

    def channels(self, image: str) -> dict[str, tuple[ChannelMove, ...]]:
        return dict(self._state(image).channels)

    def resolve(self, image: str, ref: str | int | None = None) -> VersionRecord:
        """A version by number (7, "7", "v7") or channel name; None means `latest`."""
        versions = {r.version: r for r in self.versions(image)}
        if not versions:
            known = ", ".join(self.images()) or "none yet"
            raise BadInputError(f"image {image!r} has no registered versions (images: {known})")
        ref = LATEST if ref is None else ref
        number = ref if isinstance(ref, int) else _version_number(ref)
        if number is not None:
            if number not in versions:
                raise BadInputError(
                    f"{image} has no version {number} (versions: {_numbers(versions)})"
                )
            return versions[number]
        assert isinstance(ref, str)
        current = self._state(image).current(ref)
        if current is None:
            known = ", ".join(sorted(self.channels(image))) or "none"
            raise BadInputError(f"{image} has no channel {ref!r} (channels: {known})")
        record = versions[current]
        if not record.usable:
            raise BadInputError(
                f"channel {ref} of {image} points at {record.status} v{current} and has no "
                "earlier usable version: build or promote one"
            )
        return record

    def find_fingerprint(self, image: str, fingerprint: str) -> VersionRecord | None:
        """The newest active version built from exactly these inputs."""
        matches = [r for r in self.versions(image) if r.fingerprint == fingerprint and r.usable]
        return matches[-1] if matches else None

    def next_version(self, image: str) -> int:
        """The number the next registration will most likely get (for rendering names)."""
        return self._next_number(image)

    # ---------------------------------------------------------------- writing

    def register(self, new: NewVersion) -> VersionRecord:
        """Move the artifacts into the store, write the record, move `latest`, commit, tag."""
        check_image_name(new.image)
        artifacts = []
        for path in new.files:
            if not path.is_file():
                raise OperationFailedError(f"artifact {path} does not exist: nothing registered")
            artifacts.append(
                ArtifactFile(name=path.name, size=path.stat().st_size, sha256=sha256_file(path))
            )
        if len({a.name for a in artifacts}) != len(artifacts):
            raise BadInputError(f"artifact file names of {new.image} are not unique: {new.files}")
        with self._writing() as repo:
            number = self._next_number(new.image)
            directory = self.store_dir / new.image / f"v{number}"
            record = VersionRecord(
                image=new.image,
                version=number,
                created_at=now_iso(),
                fingerprint=new.fingerprint,
                builder=new.builder,
                packer_version=new.packer_version,
                source_commit=new.source_commit,
                source_dirty=new.source_dirty,
                parent=new.parent,
                directory=str(directory),
                artifacts=tuple(artifacts),
                disk=new.disk,
                kernel=new.kernel,
                initrd=new.initrd,
                cmdline=new.cmdline,
                vm=new.vm,
                snapshot=new.snapshot,
                variables=dict(new.variables),
            )
            _store_artifacts(new.files, directory)
            record_path = self._record_path(new.image, number)
            try:
                _write_json(record_path, record.model_dump(mode="json"))
                state = self._state(new.image)
                self._write_state(new.image, _move(state, LATEST, number, "build"))
                self._commit(repo, f"{record.label}: register ({new.fingerprint[:12]})")
                repo.create_tag(f"{new.image}/v{number}", message=_tag_message(record))
            except BaseException:
                _remove_tree(directory)
                record_path.unlink(missing_ok=True)
                raise
        log.info("registered", extra=fields(image=new.image, version=number))
        return record

    def promote(self, image: str, version: int, channel: str) -> VersionRecord:
        _check_channel(channel)
        with self._writing() as repo:
            record = self.resolve(image, version)
            if not record.usable:
                raise BadInputError(
                    f"{record.label} is {record.status} ({record.status_reason}): "
                    "promote another version"
                )
            self._write_state(image, _move(self._state(image), channel, version, "promote"))
            self._commit(repo, f"{image}: {channel} -> v{version}")
        return record

    # ---------------------------------------------------------------- rollouts (Channels port)

    def channel_version(self, image: str, channel: str) -> int | None:
        return self._state(image).current(channel)

    def newest_version(self, image: str) -> int:
        usable = [r.version for r in self.versions(image) if r.usable]
        if not usable:
            known = ", ".join(self.images()) or "none yet"
            raise BadInputError(f"image {image!r} has no usable version (images: {known})")
        return max(usable)

    def move_channel(self, image: str, channel: str, version: int, by: str) -> None:
        """Point `channel` at `version` for a rollout; `by` says who and why (the history)."""
        _check_channel(channel)
        with self._writing() as repo:
            record = self.resolve(image, version)
            if not record.usable:
                raise BadInputError(f"{record.label} is {record.status}: roll out another version")
            if self._state(image).current(channel) == version:
                return
            self._write_state(image, _move(self._state(image), channel, version, by))
            self._commit(repo, f"{image}: {channel} -> v{version} ({by})")

    def rollback(self, image: str, channel: str) -> VersionRecord:
        """Point `channel` back at the newest usable version it held before its current one."""
        with self._writing() as repo:
            state = self._state(image)
            target = self._previous(image, state, channel)
            if target is None:
                raise BadInputError(
                    f"channel {channel} of {image} has no earlier usable version to roll back to"
                )
            self._write_state(image, _move(state, channel, target.version, "rollback"))
            self._commit(repo, f"{image}: {channel} rolled back to v{target.version}")
        return target

    def revoke(self, image: str, version: int, reason: str) -> VersionRecord:
        """Mark a version unusable; channels on it roll back to their previous version."""
        if not reason.strip():
            raise BadInputError("a revocation needs a reason (--reason TEXT)")
        with self._writing() as repo:
            record = self.resolve(image, version)
            if record.status is Status.REVOKED:
                return record
            state = self._state(image)
            change = StatusChange(
                version=version, status=Status.REVOKED, reason=reason, at=now_iso()
            )
            state = state.model_copy(update={"changes": (*state.changes, change)})
            self._write_state(image, state)
            for channel in [c for c in state.channels if state.current(c) == version]:
                previous = self._previous(image, state, channel)
                if previous is not None:
                    state = _move(state, channel, previous.version, "revoke")
            self._write_state(image, state)
            self._commit(repo, f"{record.label}: revoked: {reason}")
        return self.resolve(image, version)

    def prune(self, image: str, version: int, reason: str) -> VersionRecord:
        """Remove a version's artifacts from the store; the record stays, marked pruned."""
        with self._writing() as repo:
            record = self.resolve(image, version)
            _remove_tree(Path(record.directory))
            state = self._state(image)
            change = StatusChange(
                version=version, status=Status.PRUNED, reason=reason, at=now_iso()
            )
            self._write_state(image, state.model_copy(update={"changes": (*state.changes, change)}))
            self._commit(repo, f"{record.label}: pruned: {reason}")
        return self.resolve(image, version)

    # ---------------------------------------------------------------- internals

    def _image_dir(self, image: str) -> Path:
        check_image_name(image)
        return self.path / "images" / image

    def _record_path(self, image: str, version: int) -> Path:
        return self._image_dir(image) / "versions" / f"v{version:04d}.json"

    def _next_number(self, image: str) -> int:
        numbers = [r.version for r in self.versions(image)]
        store = self.store_dir / image
        if store.is_dir():  # a crashed registration may have left a folder: never reuse it
            numbers += [
                int(m[1]) for p in store.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))
            ]
        return max(numbers, default=0) + 1

    def _previous(self, image: str, state: ImageState, channel: str) -> VersionRecord | None:
        """The newest usable version `channel` held before its current one, if any."""
        history = state.channels.get(channel)
        if not history:
            known = ", ".join(sorted(state.channels)) or "none"
            raise BadInputError(f"{image} has no channel {channel!r} (channels: {known})")
        versions = {r.version: r for r in self.versions(image)}
        unusable = {c.version for c in state.changes}
        current = history[-1].version
        for move in reversed(history):
            if move.version != current and move.version not in unusable:
                return versions[move.version]
        return None

    def _state(self, image: str) -> ImageState:
        path = self._image_dir(image) / "state.json"
        state = self._read(path, ImageState, missing_ok=True)
        assert state is None or isinstance(state, ImageState)
        return state or ImageState()

    def _write_state(self, image: str, state: ImageState) -> None:
        _write_json(self._image_dir(image) / "state.json", state.model_dump(mode="json"))

    def _read_record(self, path: Path) -> VersionRecord:
        record = self._read(path, VersionRecord, missing_ok=False)
        assert isinstance(record, VersionRecord)
        return record

    def _read(
        self, path: Path, model: type[VersionRecord] | type[ImageState], *, missing_ok: bool
    ) -> VersionRecord | ImageState | None:
        """A registry file, parsed once per change (see the class docstring)."""
        try:
            info = path.stat()
        except FileNotFoundError:
            if missing_ok:
                self._cache.pop(path, None)
                return None
            raise BadInputError(f"registry file {path} disappeared while reading") from None
        except OSError as exc:
            raise BadInputError(f"registry file {path} is unreadable: {exc.strerror}") from None
        signature = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = self._cache.get(path)
        if cached is not None and cached.signature == signature:
            return cached.value
        try:
            value = model.model_validate(_read_json(path))
        except ValidationError as exc:
            raise BadInputError(f"registry file {path} is corrupt: {_first_error(exc)}") from None
        self.parsed += 1
        self._cache[path] = _Cached(signature, value)
        return value

    @contextmanager
    def _writing(self) -> Iterator[git.Repo]:
        if self._lock is None:
            from filelock import FileLock

            lock = str(self.path.parent / f".{self.path.name}.lock")
            self._lock = FileLock(lock, mode=FILE_MODE)
        private_dir(self.path.parent)
        with self._lock:
            yield self._open_or_create()

    def _open_or_create(self) -> git.Repo:
        import git

        if (self.path / ".git").is_dir():
            return git.Repo(self.path)
        if self.path.exists() and any(self.path.iterdir()):
            raise BadInputError(
                f"registry {self.path} is not a git repository and not empty: point "
                "`registry:` in imagepipe.yml at an empty or new folder"
            )
        private_dir(self.path)  # owner-only: git's files inside keep the umask's modes
        repo = git.Repo.init(self.path)
        with repo.config_writer() as config:
            config.set_value("user", "name", ACTOR_NAME)
            config.set_value("user", "email", ACTOR_EMAIL)
        readme = self.path / "README"
        readme.write_text("imagepipe image registry: see `imagepipe images list`.\n")
        repo.index.add(["README"])
        actor = git.Actor(ACTOR_NAME, ACTOR_EMAIL)
        repo.index.commit("registry created", author=actor, committer=actor)
        return repo

    def _commit(self, repo: git.Repo, message: str) -> None:
        repo.git.add("--all", "images")
        import git

        actor = git.Actor(ACTOR_NAME, ACTOR_EMAIL)
        repo.index.commit(message, author=actor, committer=actor)

    def check_readable(self) -> None:
        """BadInputError when the registry path exists but is not a registry."""
        if self.path.exists() and not (self.path / ".git").is_dir():
            raise BadInputError(f"registry {self.path} is not a git repository")


def _version_number(ref: str) -> int | None:
    try:
        number = names.version_number(ref)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    if number is None:
        _check_channel(ref)
    return number


def _check_channel(channel: str) -> None:
    error = names.channel_error(channel)
    if error is not None:
        raise BadInputError(error)


def _numbers(versions: dict[int, VersionRecord]) -> str:
    return ", ".join(f"v{n}" for n in sorted(versions))


def check_image_name(image: str) -> None:
    """BadInputError unless `image` follows the registry's naming rule."""
    error = names.image_error(image)
    if error is not None:
        raise BadInputError(error)


def _move(state: ImageState, channel: str, version: int, by: str) -> ImageState:
    history = (*state.channels.get(channel, ()), ChannelMove(version=version, at=now_iso(), by=by))
    return state.model_copy(update={"channels": {**state.channels, channel: history}})


def _tag_message(record: VersionRecord) -> str:
    files = ", ".join(f"{a.name} {a.sha256[:12]}" for a in record.artifacts)
    return f"{record.label}\nfingerprint {record.fingerprint}\nartifacts: {files}\n"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"[:200]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_json(path: Path) -> Any:
    """A registry file's JSON: at most MAX_REGISTRY_FILE bytes of UTF-8, finite numbers,
    nested no deeper than the records are; BadInputError naming the file otherwise."""
    try:
        text = read_text(path, limit=MAX_REGISTRY_FILE)
        data = json.loads(text, parse_constant=_refuse_constant)
    except ConfigError as exc:
        raise BadInputError(f"registry file {exc}") from None
    except (ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BadInputError(f"registry file {path} is corrupt: {reason}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"registry file {path} is corrupt: expected a JSON object")
    return data


def _write_json(path: Path, data: Any) -> None:
    """Atomic: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _store_artifacts(files: Sequence[Path], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=False)
    for path in files:
        target = directory / path.name
        shutil.move(str(path), target)
        os.chmod(target, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.chmod(directory, 0o555)


def _remove_tree(directory: Path) -> None:
    if not directory.exists():
        return
    os.chmod(directory, 0o755)
    shutil.rmtree(directory)
