"""`imagepipe build`: render → fingerprint → (skip if up to date) → prepare → packer validate →
packer build → register. A failed or interrupted build registers nothing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from imagepipe import schema
from imagepipe.errors import (
    EnvironmentMissingError,
    ImagepipeError,
    OperationFailedError,
)
from imagepipe.images.definition import Image, list_images, load_image
from imagepipe.images.fingerprint import fingerprint
from imagepipe.images.packer import (
    BuildInterruptedError,
    Packer,
    PackerVersion,
    debug_log_asked,
)
from imagepipe.images.records import ScalarValue, VersionRecord
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.images.source import source_state
from imagepipe.images.templates import (
    render_image,
    render_string,
    rendered_digests,
    secret_outputs,
)
from imagepipe.images.variables import resolve_secrets, resolve_variables
from imagepipe.log import fields

if TYPE_CHECKING:  # the stream parser is loaded when Packer builds (an up-to-date build never)
    from imagepipe.images.stream import PackerEvent

log = logging.getLogger(__name__)

PREPARE_OUTPUT = "guest-out"
PACKER_LOG = "packer.log"  # what Packer printed
PACKER_DEBUG_LOG = "packer-debug.log"  # Packer's debug log (PACKER_LOG=1), when asked


class BuildSettings(Protocol):
    """The settings a build reads (imagepipe.config.Settings has them all)."""

    @property
    def packer_dir(self) -> Path: ...

    @property
    def registry(self) -> Path: ...

    @property
    def image_store(self) -> Path: ...


class BuildRuntime(Protocol):
    """What a build works with: the settings, the registry, Packer. The composition root's
    Runtime (imagepipe/app/bootstrap.py) is one; nothing here builds them."""

    @property
    def settings(self) -> BuildSettings: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def packer(self) -> Packer: ...


@dataclass(frozen=True)
class PhaseEvent:
    """imagepipe's own steps around Packer's."""

    phase: str
    text: str
    kind: str = "phase"


BuildEvent: TypeAlias = "PackerEvent | PhaseEvent"
Progress: TypeAlias = Callable[[BuildEvent], None]


class Outcome(StrEnum):
    BUILT = "built"
    UP_TO_DATE = "up-to-date"
    DRY_RUN = "dry-run"


@dataclass(frozen=True)
class BuildResult:
    image: str
    outcome: Outcome
    fingerprint: str
    record: VersionRecord | None  # the new version, or the matching one when up to date
    build_dir: Path | None  # kept only with --keep-build-dir (or a dry run with it)
    seconds: float

    @property
    def message(self) -> str:
        if self.outcome is Outcome.UP_TO_DATE and self.record:
            return f"up to date: {self.record.label}"
        if self.outcome is Outcome.BUILT and self.record:
            return f"built {self.record.label} in {self.seconds:.1f}s"
        where = f" (rendered in {self.build_dir})" if self.build_dir else ""
        return f"{self.image}: templates render and validate{where}"


class BuildFailedError(OperationFailedError):
    """Packer failed; nothing was registered."""


@dataclass(frozen=True)
class _Plan:
    image: Image
    variables: dict[str, ScalarValue]
    context: dict[str, Any]
    fingerprint: str
    parent: VersionRecord | None
    packer_version: PackerVersion


def build_image(
    runtime: BuildRuntime,
    image: str,
    *,
    variables: Mapping[str, str] | None = None,
    var_files: Sequence[Path] = (),
    only: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    keep_build_dir: bool = False,
    debug_log: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """`debug_log` (or PACKER_LOG in the environment): Packer writes its debug log too."""
    started = time.monotonic()
    emit: Progress = progress or (lambda _event: None)
    settings, registry, packer = runtime.settings, runtime.registry, runtime.packer
    registry.check_readable()
    loaded = load_image(settings.packer_dir, image)
    missing = [p for p in loaded.definition.requires if shutil.which(p) is None]
    if missing and not dry_run:
        raise EnvironmentMissingError(
            f"image {image} cannot be built on this host: it needs {', '.join(missing)} "
            f"(builder {loaded.definition.builder})"
        )
    emit(PhaseEvent("render", f"rendering {image}"))
    plan = _plan(registry, loaded, packer, variables or {}, var_files, stand_in_parent=dry_run)
    name = loaded.registers_as
    if not force:
        existing = registry.find_fingerprint(name, plan.fingerprint)
        if existing is not None:
            result = BuildResult(
                name, Outcome.UP_TO_DATE, plan.fingerprint, existing, None, _since(started)
            )
            emit(PhaseEvent("up-to-date", result.message))
            return result
    secrets = resolve_secrets(loaded, placeholders=dry_run)
    build_dir = _new_build_dir(settings.image_store, image)
    keep = keep_build_dir
    try:
        render_image(loaded, {**plan.context, **secrets}, build_dir)
        template = build_dir / loaded.definition.output_name(loaded.definition.template)
        version = registry.next_version(name)
        env = {f"PKR_VAR_{k}": v for k, v in secrets.items()}
        env["PKR_VAR_image_version"] = str(version)
        if plan.packer_version.needs_init:
            emit(PhaseEvent("init", "packer init"))
            packer.init(template, env)
        syntax_only = bool(missing) and loaded.definition.validate_without_requires != "full"
        if packer.validate(template, env, syntax_only=syntax_only):
            emit(PhaseEvent("validate", "packer validate"))
        else:
            emit(PhaseEvent("validate", "packer validate: unchanged, validated before"))
        if dry_run:
            result = BuildResult(
                name,
                Outcome.DRY_RUN,
                plan.fingerprint,
                None,
                build_dir if keep else None,
                _since(started),
            )
            emit(PhaseEvent("dry-run", result.message))
            return result
        # git's view of the image folder, read while Packer builds (it takes ~0.2 s on a large
        # checkout): the state the build started from
        source = _Background(lambda: source_state(loaded.folder))
        if loaded.definition.prepare:
            emit(PhaseEvent("prepare", f"running {loaded.definition.prepare}"))
            _prepare(loaded, build_dir)
        emit(PhaseEvent("build", f"packer build {template.name}"))
        log_path = build_dir / PACKER_LOG
        debug_path = (
            build_dir / PACKER_DEBUG_LOG if debug_log or debug_log_asked(os.environ) else None
        )
        run = packer.build(
            template, env=env, log_path=log_path, debug_log=debug_path, only=only, on_event=emit
        )
        if run.interrupted:
            raise BuildInterruptedError(
                f"build of {image} interrupted: Packer cleaned up, nothing was registered"
            )
        if run.returncode != 0 or run.summary.error_count:
            keep = True  # the log is there
            reason = run.summary.last_error or f"packer exited with {run.returncode}"
            more = (
                f"Packer's debug log: {debug_path}"
                if debug_path
                else "run again with --debug-log for Packer's debug log"
            )
            raise BuildFailedError(
                f"build of {image} failed, nothing registered: {reason} (log: {log_path}); {more}"
            )
        emit(PhaseEvent("register", f"registering {name}"))
        record = registry.register(
            _new_version(loaded, plan, build_dir, version, registry.versions(name), source.result())
        )
        result = BuildResult(name, Outcome.BUILT, plan.fingerprint, record, None, _since(started))
        emit(PhaseEvent("done", result.message))
        return result
    finally:
        if keep:
            _remove_secret_files(loaded, build_dir)
            log.info("build directory kept", extra=fields(image=image, path=str(build_dir)))
        else:
            shutil.rmtree(build_dir, ignore_errors=True)


def _plan(
    registry: Registry,
    image: Image,
    packer: Packer,
    overrides: Mapping[str, str],
    var_files: Sequence[Path],
    *,
    stand_in_parent: bool = False,
) -> _Plan:
    values = resolve_variables(image, overrides, var_files)
    version = packer.version()
    parent = None
    if image.definition.parent is not None:
        ref = image.definition.parent
        if stand_in_parent and not registry.versions(ref.image):
            parent = _stand_in_parent(ref.image)
        else:
            parent = registry.resolve(ref.image, ref.channel)
    context: dict[str, Any] = {
        **values,
        "image": image.registers_as,
        "packer": {"version": str(version), "init": version.needs_init},
        "parent": schema.dump(parent) if parent else None,
    }
    placeholders = resolve_secrets(image, placeholders=True)
    placeholders = {k: f"<secret:{k}>" for k in placeholders}
    rendered = rendered_digests(image, {**context, **placeholders})
    digest = fingerprint(image, rendered, values, str(version), parent.version if parent else None)
    return _Plan(image, values, context, digest, parent, version)


def _stand_in_parent(image: str) -> VersionRecord:
    """For a dry run of an update build before its parent exists (CI on a pull request)."""
    return VersionRecord(
        image=image,
        version=0,
        created_at="",
        fingerprint="",
        builder="stand-in",
        packer_version="",
        directory="",
        vm=f"{image}-base",
        snapshot=f"{image}-v0",
    )


def _new_version(
    image: Image,
    plan: _Plan,
    build_dir: Path,
    version: int,
    existing: Sequence[VersionRecord],
    source_git: tuple[str | None, bool],
) -> NewVersion:
    spec = image.definition.artifact
    files: list[Path] = []
    for pattern in spec.files:
        matched = sorted(p for p in build_dir.glob(pattern) if p.is_file())
        if not matched:
            raise BuildFailedError(
                f"Packer finished but the artifact {pattern} is missing in {build_dir}: "
                f"check artifact.files in {image.definition_file}"
            )
        files += matched
    context = {**plan.context, "image_version": version}
    source = str(image.definition_file)
    commit, dirty = source_git
    usable = [r for r in existing if r.usable]
    parent = plan.parent.version if plan.parent else (usable[-1].version if usable else None)
    return NewVersion(
        image=image.registers_as,
        fingerprint=plan.fingerprint,
        builder=image.definition.builder,
        packer_version=str(plan.packer_version),
        files=tuple(files),
        source_commit=commit,
        source_dirty=dirty,
        parent=parent,
        disk=spec.disk,
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        vm=render_string(spec.vm, context, source) if spec.vm else None,
        snapshot=render_string(spec.snapshot, context, source) if spec.snapshot else None,
        variables=tuple(sorted(plan.variables.items())),
    )


class _Background:
    """`work` in a daemon thread; `result()` waits for it and returns (or raises) its outcome."""

    def __init__(self, work: Callable[[], tuple[str | None, bool]]) -> None:
        self._outcome: tuple[str | None, bool] | BaseException | None = None

        def run() -> None:
            try:
                self._outcome = work()
            except BaseException as exc:  # handed to the caller of result()
                self._outcome = exc

        self._thread = threading.Thread(target=run, name="imagepipe-source-state", daemon=True)
        self._thread.start()

    def result(self) -> tuple[str | None, bool]:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


def _prepare(image: Image, build_dir: Path) -> None:
    assert image.definition.prepare is not None
    script = image.folder / image.definition.prepare
    out = build_dir / PREPARE_OUTPUT
    out.mkdir(exist_ok=True)
    log_path = build_dir / "prepare.log"
    with log_path.open("w") as handle:
        done = subprocess.run(
            [str(script), str(out)],
            cwd=image.folder,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BuildFailedError(
            f"{script} exited with {done.returncode}: {tail[0]} (log: {log_path})"
        )


def _remove_secret_files(image: Image, build_dir: Path) -> None:
    """A kept build directory keeps its logs, never a rendered file that carries a secret."""
    for name in secret_outputs(image):
        path = build_dir / name
        if path.exists():
            path.unlink()
            log.info(
                "rendered file with a secret removed",
                extra=fields(image=image.name, path=str(path)),
            )


def _new_build_dir(image_store: Path, image: str) -> Path:
    """Beside the image store, so registering is a rename on the same filesystem."""
    parent = image_store / ".builds"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{image}-", dir=parent))
    os.chmod(path, 0o700)
    return path


def _since(started: float) -> float:
    return time.monotonic() - started


@dataclass(frozen=True)
class ChangedResult:
    """One image in `imagepipe build --changed`."""

    image: str
    outcome: str  # built | up-to-date | unavailable | failed
    message: str
    version: int | None = None


def build_changed(
    runtime: BuildRuntime, *, debug_log: bool = False, progress: Progress | None = None
) -> list[ChangedResult]:
    """Build every image whose inputs differ from its registered versions; go on after a
    failure or an image this host cannot build."""
    results: list[ChangedResult] = []
    for name in list_images(runtime.settings.packer_dir):
        try:
            result = build_image(runtime, name, debug_log=debug_log, progress=progress)
        except EnvironmentMissingError as exc:
            results.append(ChangedResult(name, "unavailable", str(exc)))
            continue
        except BuildInterruptedError:
            raise
        except ImagepipeError as exc:
            results.append(ChangedResult(name, "failed", str(exc)))
            continue
        version = result.record.version if result.record else None
        results.append(ChangedResult(name, result.outcome.value, result.message, version))
    return results
