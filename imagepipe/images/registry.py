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
import random
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from imagepipe import names, schema
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
from imagepipe.record import Record
from imagepipe.yamlsrc import read_text

if TYPE_CHECKING:  # GitPython and filelock are imported by the first write: reads need neither
    import git
    from filelock import FileLock

log = logging.getLogger(__name__)

LATEST = "latest"
MAX_REGISTRY_FILE = 1024 * 1024  # a record is ~2 KiB; state.json grows by ~100 B per move
ACTOR_NAME, ACTOR_EMAIL = "imagepipe", "imagepipe@localhost"
BRANCH = "main"  # the branch a shared registry lives on, in the remote
PUSH_ATTEMPTS = 10  # writes beaten by another writer's push are applied again this often
PUSH_BACKOFF = 0.05  # seconds; a beaten writer waits up to this * 2^attempt (random, ≤ 2 s)
GIT_TIMEOUT = 60.0  # seconds a fetch or push to the remote may take
_REMOTE_REF = f"refs/remotes/origin/{BRANCH}"
# what git says when another push got to the remote first (the tip moved, or its ref was
# locked by a push under way; --atomic then refuses the whole push)
_LOST_RACE = (
    "[rejected]",
    "fetch first",
    "non-fast-forward",
    "cannot lock ref",
    "failed to update ref",
    "incorrect old value",
)
_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
T = TypeVar("T")


class NewVersion(Record, kw_only=False):
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


class _Cached(Record, kw_only=False):
    """A parsed registry file and the stat signature it was parsed from."""

    signature: tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns
    value: VersionRecord | ImageState


class Registry:
    """Reads are cached per file by (inode, size, mtime, ctime): a keeper pass that resolves
    every pool's image stats the files but parses only those another process changed (the
    registry replaces files atomically, so a change always gives a new inode).

    With a `remote` (a git URL), the registry is shared: writes fetch, apply on the remote's
    tip and push (see _write); reads follow the remote at most every `fetch_every` seconds
    (see refresh)."""

    def __init__(
        self,
        path: Path,
        store_dir: Path,
        *,
        remote: str | None = None,
        fetch_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.store_dir = store_dir
        self.remote = remote
        self.fetch_every = fetch_every
        self._clock = clock
        self._fetched_at: float | None = None
        self._offline = False  # the last fetch failed (said once in the log)
        self._writing = False  # inside _write: reads must not move the copy under it
        self._cache: dict[Path, _Cached] = {}
        self._lock: FileLock | None = None  # made by the first write
        self.parsed = 0  # files parsed (not served from the cache), for tests and metrics

    # ---------------------------------------------------------------- reading

    def images(self) -> list[str]:
        self.refresh()
        return self._local_images()

    def _local_images(self) -> list[str]:
        root = self.path / "images"
        if not root.is_dir():
            return []
        # a folder made by hand with another name is not an image (and cannot be read as one)
        return sorted(
            p.name for p in root.iterdir() if p.is_dir() and names.image_error(p.name) is None
        )

    def versions(self, image: str, *, fetch: bool = True) -> list[VersionRecord]:
        """Every version of `image`, oldest first, with its current status."""
        if fetch:
            self.refresh()
        folder = self._image_dir(image) / "versions"
        if not folder.is_dir():
            return []
        state = self._state(image)
        records = [self._read_record(p) for p in sorted(folder.glob("v*.json"))]
        changes = {c.version: c for c in state.changes}  # later changes win
        merged = [
            schema.replace(
                r,
                status=changes[r.version].status,
                status_reason=changes[r.version].reason,
                status_at=changes[r.version].at,
            )
            if r.version in changes
            else r
            for r in records
        ]
        return sorted(merged, key=lambda r: r.version)

    def channels(self, image: str) -> dict[str, tuple[ChannelMove, ...]]:
        self.refresh()
        return dict(self._state(image).channels)

    def resolve(
        self, image: str, ref: str | int | None = None, *, fetch: bool = True
    ) -> VersionRecord:
        """A version by number (7, "7", "v7") or channel name; None means `latest`.
        `fetch`: follow the remote first (writers have just done so)."""
        versions = {r.version: r for r in self.versions(image, fetch=fetch)}
        if not versions:
            known = ", ".join(self._local_images()) or "none yet"
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
        """Move the artifacts into the store, write the record, move `latest`, commit, tag.

        With a remote, the number is taken from the remote's tip; when another builder pushed
        first, the number is taken again from the new tip and the artifacts' folder renamed."""
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
        stored: list[Path] = []  # the folder holding the artifacts once they are moved

        def apply(repo: git.Repo) -> tuple[VersionRecord, str]:
            number = self._next_number(new.image, mine=stored[0] if stored else None)
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
            try:  # the folder is claimed by making it: a builder sharing the store got it first
                if not stored:
                    _store_artifacts(new.files, directory)
                    stored.append(directory)
                elif stored[0] != directory:
                    _restore_artifacts(stored[0], directory)
                    stored[0] = directory
            except FileExistsError:
                raise _LostRace from None
            _write_json(self._record_path(new.image, number), schema.dump(record))
            state = self._state(new.image)
            self._write_state(new.image, _move(state, LATEST, number, "build"))
            self._commit(repo, f"{record.label}: register ({new.fingerprint[:12]})")
            tag = f"{new.image}/v{number}"
            repo.create_tag(tag, message=_tag_message(record), force=True)
            return record, tag

        try:
            record = self._write(apply)
        except BaseException:
            if stored:
                _remove_tree(stored[0])
            raise
        log.info("registered", extra=fields(image=new.image, version=record.version))
        return record

    def promote(self, image: str, version: int, channel: str) -> VersionRecord:
        _check_channel(channel)

        def apply(repo: git.Repo) -> tuple[VersionRecord, None]:
            record = self.resolve(image, version, fetch=False)
            if not record.usable:
                raise BadInputError(
                    f"{record.label} is {record.status} ({record.status_reason}): "
                    "promote another version"
                )
            self._write_state(image, _move(self._state(image), channel, version, "promote"))
            self._commit(repo, f"{image}: {channel} -> v{version}")
            return record, None

        return self._write(apply)

    # ---------------------------------------------------------------- rollouts (Channels port)

    def channel_version(self, image: str, channel: str) -> int | None:
        self.refresh()
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

        def apply(repo: git.Repo) -> tuple[None, None]:
            record = self.resolve(image, version, fetch=False)
            if not record.usable:
                raise BadInputError(f"{record.label} is {record.status}: roll out another version")
            if self._state(image).current(channel) != version:
                self._write_state(image, _move(self._state(image), channel, version, by))
                self._commit(repo, f"{image}: {channel} -> v{version} ({by})")
            return None, None

        self._write(apply)

    def rollback(self, image: str, channel: str) -> VersionRecord:
        """Point `channel` back at the newest usable version it held before its current one."""

        def apply(repo: git.Repo) -> tuple[VersionRecord, None]:
            state = self._state(image)
            target = self._previous(image, state, channel)
            if target is None:
                raise BadInputError(
                    f"channel {channel} of {image} has no earlier usable version to roll back to"
                )
            self._write_state(image, _move(state, channel, target.version, "rollback"))
            self._commit(repo, f"{image}: {channel} rolled back to v{target.version}")
            return target, None

        return self._write(apply)

    def revoke(self, image: str, version: int, reason: str) -> VersionRecord:
        """Mark a version unusable; channels on it roll back to their previous version."""
        if not reason.strip():
            raise BadInputError("a revocation needs a reason (--reason TEXT)")

        def apply(repo: git.Repo) -> tuple[None, None]:
            record = self.resolve(image, version, fetch=False)
            if record.status is Status.REVOKED:
                return None, None
            state = self._state(image)
            change = StatusChange(
                version=version, status=Status.REVOKED, reason=reason, at=now_iso()
            )
            state = schema.replace(state, changes=(*state.changes, change))
            self._write_state(image, state)
            for channel in [c for c in state.channels if state.current(c) == version]:
                previous = self._previous(image, state, channel)
                if previous is not None:
                    state = _move(state, channel, previous.version, "revoke")
            self._write_state(image, state)
            self._commit(repo, f"{record.label}: revoked: {reason}")
            return None, None

        self._write(apply)
        return self.resolve(image, version, fetch=False)

    def prune(self, image: str, version: int, reason: str) -> VersionRecord:
        """Remove a version's artifacts from the store; the record stays, marked pruned.
        The files go once the record says so (and, with a remote, once that is pushed)."""

        def apply(repo: git.Repo) -> tuple[VersionRecord, None]:
            record = self.resolve(image, version, fetch=False)
            state = self._state(image)
            change = StatusChange(
                version=version, status=Status.PRUNED, reason=reason, at=now_iso()
            )
            self._write_state(image, schema.replace(state, changes=(*state.changes, change)))
            self._commit(repo, f"{record.label}: pruned: {reason}")
            return record, None

        record = self._write(apply)
        _remove_tree(Path(record.directory))
        return self.resolve(image, version, fetch=False)

    # ---------------------------------------------------------------- sharing (a git remote)

    def refresh(self, *, force: bool = False) -> None:
        """With a remote: fetch it and follow its tip, at most every `fetch_every` seconds
        (always when `force`). While it cannot be reached, reads keep the last fetched state
        and the log says so once."""
        if self.remote is None or self._writing:
            return
        now = self._clock()
        if not force and self._fetched_at is not None and now - self._fetched_at < self.fetch_every:
            return
        self._fetched_at = now
        try:
            with self._locked():
                repo = self._open_or_create()
                self._follow(repo)
        except OperationFailedError as exc:
            if not self._offline:
                self._offline = True
                log.warning(
                    "registry remote unreachable: reading the last fetched state",
                    extra=fields(remote=self.remote, error=str(exc)),
                )
            return
        if self._offline:
            self._offline = False
            log.info("registry remote reachable again", extra=fields(remote=self.remote))

    def check_remote(self) -> str:
        """What the remote's branch points at ("empty" for a new remote); OperationFailedError
        when it does not answer (doctor). Touches nothing local."""
        import git

        if self.remote is None:
            return "no remote"
        try:
            out = git.cmd.Git().execute(
                ["git", "ls-remote", "--heads", "--", self.remote, BRANCH], **self._git_options()
            )
        except git.GitCommandError as exc:
            raise OperationFailedError(
                f"registry remote {self.remote} unreachable: {_git_reason(exc)}"
            ) from None
        tip = str(out).split()[:1]
        return f"{BRANCH} at {tip[0][:12]}" if tip else "empty (the first write fills it)"

    def _write(self, apply: Callable[[git.Repo], tuple[T, str | None]]) -> T:
        """Run `apply` (which commits) under the lock; with a remote, on top of the remote's
        fetched tip, then push; a push someone else's push beat is applied again on the new
        tip, up to PUSH_ATTEMPTS times. Whatever fails leaves the local copy at the remote's
        state: nothing is half-written."""
        with self._locked():
            self._writing = True
            try:
                return self._write_locked(apply)
            finally:
                self._writing = False

    def _write_locked(self, apply: Callable[[git.Repo], tuple[T, str | None]]) -> T:
        repo = self._open_or_create()
        if self.remote is None:
            before = _rev(repo, "HEAD")
            try:
                for _ in range(PUSH_ATTEMPTS - 1):
                    try:
                        return apply(repo)[0]
                    except _LostRace:
                        self._discard(repo, before)
                return apply(repo)[0]
            except BaseException:
                self._discard(repo, before)
                raise
        for attempt in range(PUSH_ATTEMPTS):
            if attempt:  # beaten: let the other writer finish before fetching again
                time.sleep(random.uniform(0, min(2.0, PUSH_BACKOFF * 2**attempt)))
            self._follow(repo)  # raises while the remote is unreachable: nothing changed
            try:
                result, tag = apply(repo)
                pushed = self._push(repo, tag)
            except _LostRace:
                self._discard(repo)
                continue
            except BaseException:
                self._discard(repo)
                raise
            if pushed:
                self._fetched_at = self._clock()
                return result
            if tag is not None:
                repo.git.tag("-d", tag)
            log.info("registry push lost a race: applying again on the remote's new tip")
        self._discard(repo)
        raise OperationFailedError(
            f"registry remote {self.remote}: {PUSH_ATTEMPTS} pushes in a row were beaten by "
            "other writers; nothing was registered or changed, try again"
        )

    def _follow(self, repo: git.Repo) -> None:
        """Fetch the remote and make the local copy its tip (unpushed local commits are the
        leftovers of failed writes: dropped). An empty remote gets the local history from the
        first write."""
        self._git(repo, "fetch", "--force", "origin", *_REFSPECS)
        if _rev(repo, _REMOTE_REF) is None:
            return
        repo.git.checkout("-q", "-f", "-B", BRANCH, _REMOTE_REF)
        repo.git.clean("-q", "-f", "-d")

    def _attach(self, repo: git.Repo) -> None:
        """A registry that was local until now (or shared through another remote) follows
        `remote`: refused when both hold histories unrelated to each other (neither is lost)."""
        previous = _origin(repo)
        _set_origin(repo, self.remote or "")
        try:
            self._git(repo, "fetch", "--force", "origin", *_REFSPECS)
            head, tip = _rev(repo, "HEAD"), _rev(repo, _REMOTE_REF)
            if head is not None and tip is not None and not _is_ancestor(repo, head, tip):
                raise BadInputError(
                    f"registry {self.path} has versions or moves the remote {self.remote} "
                    "lacks: point `registry:` at a new folder to use the remote's, or push "
                    "this one to an empty remote"
                )
        except BaseException:
            if previous is None:
                repo.delete_remote(repo.remotes.origin)
            else:
                repo.remotes.origin.set_url(previous)
            raise

    def _push(self, repo: git.Repo, tag: str | None) -> bool:
        """True when pushed; False when the remote moved meanwhile (push rejected)."""
        import git

        refs = [f"HEAD:refs/heads/{BRANCH}"] + ([f"refs/tags/{tag}"] if tag else [])
        if _rev(repo, _REMOTE_REF) is None:  # the first push: the history and all its tags
            refs.append("refs/tags/*:refs/tags/*")
        try:
            repo.git.push("--atomic", "--porcelain", "origin", *refs, **self._git_options())
        except git.GitCommandError as exc:
            output = f"{exc.stdout}\n{exc.stderr}"
            if any(sign in output for sign in _LOST_RACE):
                return False
            raise OperationFailedError(
                f"registry remote {self.remote}: push failed: {_push_reason(exc)}; nothing changed"
            ) from None
        return True

    def _discard(self, repo: git.Repo, local_head: str | None = None) -> None:
        """Back to the remote's last fetched tip, or to `local_head` without a remote (a
        failed write leaves nothing behind)."""
        if self.remote is not None and _rev(repo, _REMOTE_REF) is not None:
            repo.git.checkout("-q", "-f", "-B", BRANCH, _REMOTE_REF)
        elif local_head is not None:
            repo.git.reset("-q", "--hard", local_head)
        repo.git.clean("-q", "-f", "-d", "--", "images")
        self._cache.clear()

    def _git(self, repo: git.Repo, *args: str) -> str:
        """A git command that talks to the remote: bounded in time, never prompting."""
        import git

        try:
            return str(repo.git.execute(["git", *args], **self._git_options()))
        except git.GitCommandError as exc:
            raise OperationFailedError(
                f"registry remote {self.remote} unreachable ({args[0]}): {_git_reason(exc)}; "
                "nothing was changed"
            ) from None

    def _git_options(self) -> dict[str, Any]:
        return {
            "kill_after_timeout": GIT_TIMEOUT,
            "env": {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": _ssh_command()},
        }

    # ---------------------------------------------------------------- internals

    def _image_dir(self, image: str) -> Path:
        check_image_name(image)
        return self.path / "images" / image

    def _record_path(self, image: str, version: int) -> Path:
        return self._image_dir(image) / "versions" / f"v{version:04d}.json"

    def _next_number(self, image: str, mine: Path | None = None) -> int:
        """One more than any registered version and any folder in the store (a crashed
        registration, or a builder sharing the store, may have left one: never reuse it);
        `mine`: this registration's own folder, which does not count."""
        numbers = [r.version for r in self.versions(image, fetch=False)]
        store = self.store_dir / image
        if store.is_dir():
            numbers += [
                int(m[1])
                for p in store.iterdir()
                if (m := re.fullmatch(r"v(\d+)", p.name)) and p != mine
            ]
        return max(numbers, default=0) + 1

    def _previous(self, image: str, state: ImageState, channel: str) -> VersionRecord | None:
        """The newest usable version `channel` held before its current one, if any."""
        history = state.channels.get(channel)
        if not history:
            known = ", ".join(sorted(state.channels)) or "none"
            raise BadInputError(f"{image} has no channel {channel!r} (channels: {known})")
        versions = {r.version: r for r in self.versions(image, fetch=False)}
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
        _write_json(self._image_dir(image) / "state.json", schema.dump(state))

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
            value = schema.read(model, _read_json(path))
        except schema.Invalid as exc:
            raise BadInputError(f"registry file {path} is corrupt: {_first_error(exc)}") from None
        self.parsed += 1
        self._cache[path] = _Cached(signature, value)
        return value

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock is None:
            from filelock import FileLock

            lock = str(self.path.parent / f".{self.path.name}.lock")
            self._lock = FileLock(lock, mode=FILE_MODE)
        private_dir(self.path.parent)
        with self._lock:
            yield

    def _open_or_create(self) -> git.Repo:
        import git

        if (self.path / ".git").is_dir():
            repo = git.Repo(self.path)
            if self.remote is not None and _origin(repo) != self.remote:
                self._attach(repo)
            return repo
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
        if self.remote is not None:
            _set_origin(repo, self.remote)
            self._follow(repo)
            if _rev(repo, _REMOTE_REF) is not None:
                return repo  # the remote's history, checked out by _follow
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


def _origin(repo: git.Repo) -> str | None:
    return str(repo.remotes.origin.url) if "origin" in [r.name for r in repo.remotes] else None


def _set_origin(repo: git.Repo, url: str) -> None:
    names = [r.name for r in repo.remotes]
    if "origin" not in names:
        repo.create_remote("origin", url)
    elif repo.remotes.origin.url != url:
        repo.remotes.origin.set_url(url)


def _rev(repo: git.Repo, ref: str) -> str | None:
    return _rev_of(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")


def _rev_of(repo: git.Repo, *args: str) -> str | None:
    import git

    try:
        return str(repo.git.execute(["git", *args])).strip() or None
    except git.GitCommandError:
        return None


def _is_ancestor(repo: git.Repo, commit: str, of: str) -> bool:
    import git

    try:
        repo.git.execute(["git", "merge-base", "--is-ancestor", commit, of])
    except git.GitCommandError:
        return False
    return True


def _git_reason(exc: Exception) -> str:
    """git's last message line (a URL with credentials never reaches here: settings refuse
    them), without the command line GitPython puts first."""
    stderr = str(getattr(exc, "stderr", "") or "").strip().strip("'").strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _push_reason(exc: Exception) -> str:
    """git push --porcelain's refused refs ("!<tab>ref<tab>[remote rejected] (why)"), else
    its last message line."""
    refused = [
        " ".join(line.split("\t")[1:])
        for line in str(getattr(exc, "stdout", "") or "").strip("'").splitlines()
        if line.startswith("!")
    ]
    return "; ".join(refused)[:300] if refused else _git_reason(exc)


def _ssh_command() -> str:
    """The user's ssh (and ~/.ssh/config), never prompting; GIT_SSH_COMMAND when set."""
    return os.environ.get("GIT_SSH_COMMAND") or "ssh -o BatchMode=yes"


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
    return schema.replace(state, channels={**state.channels, channel: history})


def _tag_message(record: VersionRecord) -> str:
    files = ", ".join(f"{a.name} {a.sha256[:12]}" for a in record.artifacts)
    return f"{record.label}\nfingerprint {record.fingerprint}\nartifacts: {files}\n"


def _first_error(exc: schema.Invalid) -> str:
    """The first problem, on one short line (a key may be thousands of characters long)."""
    path, message = exc.problems[0]
    found = f"{'.'.join(str(p) for p in path)}: {message}"
    return found if len(found) <= 200 else f"{found[:199]}…"


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


def _restore_artifacts(old: Path, directory: Path) -> None:
    """Move a registration's artifacts to the folder of the number it got after all."""
    directory.mkdir(parents=False, exist_ok=False)
    os.chmod(old, 0o755)
    for path in old.iterdir():
        os.rename(path, directory / path.name)
    old.rmdir()
    os.chmod(directory, 0o555)


class _LostRace(Exception):
    """Another writer took what this write was about to (a version folder): apply again."""


def _remove_tree(directory: Path) -> None:
    if not directory.exists():
        return
    os.chmod(directory, 0o755)
    shutil.rmtree(directory)
