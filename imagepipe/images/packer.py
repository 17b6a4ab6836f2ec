"""The one wrapper around the `packer` program: version, init, validate, build.

A build runs in its own process group, so a Ctrl-C on the terminal reaches imagepipe only;
imagepipe forwards it to Packer's group and waits for Packer to clean up (it stops its VM and
removes its output), then reports the interruption.
"""

from __future__ import annotations

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

from imagepipe.errors import (
    BadInputError,
    CommandError,
    EnvironmentMissingError,
    OperationFailedError,
)
from imagepipe.images.stream import PackerEvent, StreamParser, StreamSummary, summarize
from imagepipe.log import fields

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
        try:
            cached = json.loads(self.version_cache.read_text())
            if cached["binary"] == key:
                return parse_version(f"Packer v{cached['version']}")
        except (OSError, ValueError, KeyError, TypeError, OperationFailedError):
            pass  # none yet, or unreadable: ask Packer
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

    def validate(self, template: Path, env: Mapping[str, str], *, syntax_only: bool) -> None:
        """BadInputError with Packer's own message when the rendered template is wrong."""
        argv = [self._path(), "validate", *(["-syntax-only"] if syntax_only else []), template.name]
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
        only: Sequence[str] = (),
        on_event: Callable[[PackerEvent], None] = lambda _event: None,
    ) -> RunResult:
        """`packer build -machine-readable -on-error=cleanup`, streaming events to on_event."""
        argv = [self._path(), "build", "-machine-readable", "-on-error=cleanup", "-color=false"]
        argv += [f"-only={','.join(only)}"] if only else []
        argv.append(template.name)
        run_env = self.base_env({**env, "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log_path)})
        log.info("packer build", extra=fields(template=str(template), log=str(log_path)))
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
                for event in parser.feed(line):
                    events.append(event)
                    on_event(event)
            returncode = _wait(process, interrupted)
        return RunResult(returncode, summarize(events), bool(interrupted))


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
