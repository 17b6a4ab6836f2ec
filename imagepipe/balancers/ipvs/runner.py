"""The one way the IPVS adapter reaches the kernel: a command runner.

On a real director it is `LocalRunner` (the keeper runs there, as root). Tests point the same
adapter at a runner that executes inside an IPVS test machine instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from imagepipe.errors import EnvironmentMissingError


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line: the command, its exit code and the first line of its stderr."""
        first = next((line for line in self.stderr.splitlines() if line.strip()), "")
        return f"`{' '.join(self.argv)}` exited {self.returncode}" + (f": {first}" if first else "")


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        """Run argv (LANG=C, as root on the director) and return what it did; never raises
        for a non-zero exit, only when the command cannot be run at all."""
        ...


class LocalRunner:
    """Runs commands on this host."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        env = {**os.environ, "LANG": "C", "LC_ALL": "C"}
        try:
            done = subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                env=env,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise EnvironmentMissingError(
                f"{argv[0]} is not installed: run `apt-get install {_package(argv[0])}`"
            ) from None
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(argv), 124, "", f"timed out after {self.timeout:g} s")
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)


def _package(program: str) -> str:
    return {"ipvsadm": "ipvsadm", "ip": "iproute2", "sysctl": "procps"}.get(program, program)
