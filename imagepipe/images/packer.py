"""The one wrapper around the `packer` program: version, init, validate, build.

A build runs in its own process group, so a Ctrl-C on the terminal reaches imagepipe only;
imagepipe forwards it to Packer's group and waits for Packer to clean up (it stops its VM and
removes its output), then reports the interruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from imagepipe.errors import (
    BadInputError,
    CommandError,
    EnvironmentMissingError,
    OperationFailedError,
)
from imagepipe.log import fields
from imagepipe.private import FILE_MODE

if TYPE_CHECKING:  # the stream parser is loaded when Packer builds (an up-to-date build never)
    from imagepipe.images.stream import PackerEvent, StreamSummary

log = logging.getLogger(__name__)

_VERSION = re.compile(r"Packer v?(\d+)\.(\d+)\.(\d+)")
CLEANUP_GRACE = 120.0  # seconds Packer gets to clean up after an interrupt


class BuildInterruptedError(OperationFailedError):
    """The user interrupted the build (Ctrl-C or SIGTERM). Nothing was registered."""

    exit_code = 130


@dataclass(frozen=True, order=True)
class PackerVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def needs_init(self) -> bool:
        """From 1.7 plugins are declared (`required_plugins`) and installed by `packer init`."""
        return (self.major, self.minor) >= (1, 7)


def parse_version(text: str) -> PackerVersion:
    match = _VERSION.search(text)
    if not match:
        raise OperationFailedError(f"cannot read the Packer version from {text.strip()!r}")
    return PackerVersion(int(match[1]), int(match[2]), int(match[3]))


@dataclass(frozen=True)
class RunResult:
    returncode: int
    summary: StreamSummary
    interrupted: bool


@dataclass
class Packer:
    """`packer` at `binary`; `env` is added to every call (secrets go here, never argv).

    `version_cache`: a file remembering `packer version` for the installed binary (by inode,
    size, mtime and ctime, so an upgrade is asked again): the version is part of every
    build's fingerprint, and asking Packer costs more than the rest of an up-to-date build."""

    binary: str = "packer"
    version_cache: Path | None = None
    validated_cache: Path | None = None  # digests of validated inputs (see `validate`)
    _version: PackerVersion | None = field(default=None, init=False, repr=False)

    def _path(self) -> str:
        path = shutil.which(self.binary)
        if path is None:
            raise EnvironmentMissingError(
                f"{self.binary} is not installed or not on PATH (install Packer, e.g. "
                "apt-get install packer)"
            )
        return path

    def base_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CHECKPOINT_DISABLE": "1", "LANG": "C", "LC_ALL": "C"})
        env.update(extra or {})
        return env

    def version(self) -> PackerVersion:
        """Detected once per Packer object, and once per installed binary with a cache."""
        if self._version is None:
            path = self._path()
            key = _identity(path)
            self._version = self._cached_version(key)
            if self._version is None:
                argv = [path, "version"]
                done = subprocess.run(
                    argv, capture_output=True, text=True, env=self.base_env(), check=False
                )
                if done.returncode != 0:
                    raise CommandError(argv, done.returncode, done.stderr or done.stdout)
                self._version = parse_version(done.stdout)
                self._remember_version(key, self._version)
        return self._version

    def _cached_version(self, key: list[object]) -> PackerVersion | None:
        if self.version_cache is None:
            return None
        # none yet, or unreadable: None, and Packer is asked
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, OperationFailedError):
            cached = json.loads(self.version_cache.read_text())
            if cached["binary"] == key:
                return parse_version(f"Packer v{cached['version']}")
        return None

    def _remember_version(self, key: list[object], version: PackerVersion) -> None:
        if self.version_cache is None:
            return
        written = self.version_cache.with_name(f".{self.version_cache.name}.{os.getpid()}")
        try:
            self.version_cache.parent.mkdir(parents=True, exist_ok=True)
            written.write_text(json.dumps({"binary": key, "version": str(version)}))
            written.replace(self.version_cache)
        except OSError as exc:  # only slower next time
            log.debug("packer version not cached", extra=fields(error=str(exc)))

    def init(self, template: Path, env: Mapping[str, str]) -> None:
        self._run([self._path(), "init", template.name], template.parent, env)

    def validate(self, template: Path, env: Mapping[str, str], *, syntax_only: bool) -> bool:
        """BadInputError with Packer's own message when the rendered template is wrong.

        With `validated_cache`, a template is validated once: when the rendered files, the
        variables, the Packer binary and its plugins are exactly those of a template that
        validated before, Packer is not asked again (False is returned; True when it was
        asked). A failed validation is never remembered."""
        path = self._path()
        key = _validate_key(path, template, env, syntax_only) if self.validated_cache else ""
        if key and key in self._validated():
            log.info("packer validate skipped: validated before", extra=fields(template=key))
            return False
        argv = [path, "validate", *(["-syntax-only"] if syntax_only else []), template.name]
        done = subprocess.run(
            argv,
            cwd=template.parent,
            capture_output=True,
            text=True,
            env=self.base_env(env),
            check=False,
        )
        if done.returncode != 0:
            message = " ".join((done.stderr + done.stdout).split())
            raise BadInputError(f"packer validate {template}: {message}")
        if key:
            self._remember_validated(key)
        return True

    def _validated(self) -> list[str]:
        assert self.validated_cache is not None
        try:
            data = json.loads(self.validated_cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []  # none yet, or unreadable: validate
        if not isinstance(data, list):
            return []
        return [k for k in data if isinstance(k, str) and re.fullmatch(r"[0-9a-f]{64}", k)]

    def _remember_validated(self, key: str) -> None:
        """Best effort, owner-only (the digest covers secret values); the newest keys kept."""
        assert self.validated_cache is not None
        kept = [k for k in self._validated() if k != key][-(_VALIDATED_KEPT - 1) :]
        keys = [*kept, key]
        tmp = self.validated_cache.with_name(f".{self.validated_cache.name}.{os.getpid()}")
        try:
            self.validated_cache.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(keys, handle)
            os.replace(tmp, self.validated_cache)
        except OSError as exc:  # only slower next time
            log.debug("packer validation not remembered", extra=fields(error=str(exc)))
            tmp.unlink(missing_ok=True)

    def _run(self, argv: list[str], cwd: Path, env: Mapping[str, str]) -> None:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, env=self.base_env(env), check=False
        )
        if done.returncode != 0:
            raise CommandError(argv, done.returncode, done.stderr or done.stdout)

    def build(
        self,
        template: Path,
        *,
        env: Mapping[str, str],
        log_path: Path,
        debug_log: Path | None = None,
        only: Sequence[str] = (),
        on_event: Callable[[PackerEvent], None] = lambda _event: None,
    ) -> RunResult:
        """`packer build -machine-readable -on-error=cleanup`, streaming events to on_event.

        `log_path` gets what Packer printed, line for line (the machine-readable stream these
        events are read from). Packer's debug log (PACKER_LOG=1) is written to `debug_log`
        only when one is given (it slows a build by a tenth), else it is switched off."""
        from imagepipe.images.stream import StreamParser, summarize

        argv = [self._path(), "build", "-machine-readable", "-on-error=cleanup", "-color=false"]
        argv += [f"-only={','.join(only)}"] if only else []
        argv.append(template.name)
        run_env = self.base_env(env)
        run_env.pop("PACKER_LOG_PATH", None)
        if debug_log is None:
            run_env.pop("PACKER_LOG", None)
        else:
            run_env.update({"PACKER_LOG": "1", "PACKER_LOG_PATH": str(debug_log)})
        log.info(
            "packer build",
            extra=fields(template=str(template), log=str(log_path), debug_log=str(debug_log)),
        )
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        with open(fd, "w", encoding="utf-8", buffering=1) as printed:  # line by line: tail -f
            process = subprocess.Popen(
                argv,
                cwd=template.parent,
                env=run_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            parser = StreamParser()
            events: list[PackerEvent] = []
            with _forward_signals(process) as interrupted:
                assert process.stdout is not None
                for line in process.stdout:
                    printed.write(line)
                    for event in parser.feed(line):
                        events.append(event)
                        on_event(event)
                returncode = _wait(process, interrupted)
        return RunResult(returncode, summarize(events), bool(interrupted))


def debug_log_asked(environ: Mapping[str, str]) -> bool:
    """Whether the user's environment asks Packer for its debug log (PACKER_LOG set to
    anything but empty or 0, as Packer reads it)."""
    return environ.get("PACKER_LOG", "") not in ("", "0")


_VALIDATED_KEPT = 64
# The version number imagepipe gives each build: part of the key only where a `validation`
# block could look at it, else every forced build would validate again for nothing.
_BUILD_NUMBER = "PKR_VAR_image_version"


def _validate_key(binary: str, template: Path, env: Mapping[str, str], syntax_only: bool) -> str:
    """sha256 over everything `packer validate` reads: the binary, its plugins and config, the
    rendered files beside the template (at validation nothing else is there), the variables."""
    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            digest.update(len(data).to_bytes(8, "big") + data)

    add("validate", syntax_only, template.name, *_identity(binary))
    mentions_validation = False
    for path in sorted(p for p in template.parent.rglob("*") if p.is_file()):
        content = path.read_bytes()
        mentions_validation = mentions_validation or b"validation" in content
        add(path.relative_to(template.parent).as_posix(), content)
    for name, value in sorted(os.environ.items()):
        if name.startswith(("PACKER_", "PKR_VAR_", "CHECKPOINT_")):
            add(name, value)
    for name, value in sorted(env.items()):
        if name != _BUILD_NUMBER or mentions_validation:
            add(name, value)
    for place in _plugin_places(binary):
        found = sorted(place.rglob("*")) if place.is_dir() else [place]
        for path in found:
            if path.is_file():
                info = path.stat()
                add(path, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return digest.hexdigest()


def _plugin_places(binary: str) -> list[Path]:
    """Where Packer (1.6 and later) finds plugins and its config: `packer-*` beside the
    binary, ~/.packer.d, ~/.config/packer, ~/.packerconfig, PACKER_PLUGIN_PATH and
    PACKER_CONFIG_DIR."""
    home = Path.home()
    places = sorted(Path(os.path.realpath(binary)).parent.glob("packer-*"))
    places += [home / ".packer.d", home / ".config" / "packer", home / ".packerconfig"]
    places += [Path(p) for p in os.environ.get("PACKER_PLUGIN_PATH", "").split(":") if p]
    if os.environ.get("PACKER_CONFIG_DIR"):
        places.append(Path(os.environ["PACKER_CONFIG_DIR"]))
    return places


def _identity(path: str) -> list[object]:
    """The installed binary: a reinstall or upgrade gives another inode, mtime or ctime."""
    real = os.path.realpath(path)
    info = os.stat(real)
    return [real, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _wait(process: subprocess.Popen[str], interrupted: list[int]) -> int:
    try:
        return process.wait(timeout=CLEANUP_GRACE if interrupted else None)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid, signal.SIGKILL)
        return process.wait()


def _kill_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        log.debug("packer process group already gone", extra=fields(pid=pid))


@contextmanager
def _forward_signals(process: subprocess.Popen[str]) -> Iterator[list[int]]:
    """While Packer runs, SIGINT/SIGTERM go to its process group instead of raising here.

    The yielded list collects the signals received (empty = not interrupted). A second
    signal kills the group outright.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        hard = len(received) > 1
        _kill_group(process.pid, signal.SIGKILL if hard else signal.SIGINT)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
