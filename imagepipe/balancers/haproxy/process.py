"""Start, reload and stop the HAProxy process imagepipe manages (balancer.manage: true).

`haproxy -f <cfg> -D -p <pidfile>`: HAProxy binds its listeners and the admin socket, then
daemonizes, so it outlives a keeper restart. A reload hands the listening sockets over
(`-x <admin socket>`) and lets the old process finish its sessions (`-sf <old pid>`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imagepipe.balancers.haproxy.admin_socket import AdminSocket
from imagepipe.errors import BadInputError, BalancerError, CommandError
from imagepipe.log import fields

log = logging.getLogger(__name__)

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
POLL = 0.05


class HAProxyProcess:
    def __init__(
        self,
        *,
        program: str,
        config_path: Path,
        pid_file: Path,
        admin: AdminSocket,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.program = program
        self.config_path = config_path
        self.pid_file = pid_file
        self.admin = admin
        self._sleep = sleep
        self._clock = clock

    def pid(self) -> int | None:
        """The pid in the pid file, if that process is alive and is our HAProxy."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        is_ours = any(b"haproxy" in part for part in cmdline[:1]) and (
            str(self.config_path).encode() in cmdline
        )
        return pid if is_ours else None

    def check_config(self) -> None:
        """`haproxy -c`: reject a bad configuration before touching the running process."""
        argv = [self.program, "-c", "-q", "-f", str(self.config_path)]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, env=_env()
        )
        if result.returncode != 0:
            raise BadInputError(
                f"HAProxy rejects {self.config_path}: {_first_alert(result.stderr)}"
            )

    def start(self) -> int:
        """Start a new HAProxy and wait until its admin socket answers. Returns its pid."""
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.admin.path.parent.mkdir(parents=True, exist_ok=True)
        self._run([self.program, "-f", str(self.config_path), "-D", "-p", str(self.pid_file)])
        return self._wait_started("started")

    def reload(self, old_pid: int) -> int:
        """Start a new HAProxy on the new configuration, taking over the listeners; the old
        process stops accepting and exits when its last session ends."""
        self._run(
            [
                self.program,
                "-f",
                str(self.config_path),
                "-D",
                "-p",
                str(self.pid_file),
                "-x",
                str(self.admin.path),
                "-sf",
                str(old_pid),
            ]
        )
        return self._wait_started("reloaded")

    def stop(self) -> None:
        """Stop our HAProxy (SIGTERM, then SIGKILL). Sessions through it end."""
        pid = self.pid()
        if pid is None:
            return
        log.info("stopping haproxy", extra=fields(pid=pid))
        _signal(pid, signal.SIGTERM)
        if not self._wait_gone(pid):
            _signal(pid, signal.SIGKILL)
            self._wait_gone(pid)

    def _run(self, argv: list[str]) -> None:
        with tempfile.TemporaryFile() as err:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=30,
                check=False,
                env=_env(),
            )
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if result.returncode != 0:
            raise CommandError(argv, result.returncode, _first_alert(stderr))

    def _wait_started(self, what: str) -> int:
        deadline = self._clock() + START_TIMEOUT
        while True:
            pid = self.pid()
            if pid is not None and self.admin.answers():
                log.info(f"haproxy {what}", extra=fields(pid=pid, config=str(self.config_path)))
                return pid
            if self._clock() >= deadline:
                raise BalancerError(
                    f"HAProxy started but its admin socket {self.admin.path} did not answer "
                    f"within {START_TIMEOUT:g} s"
                )
            self._sleep(POLL)

    def _wait_gone(self, pid: int) -> bool:
        deadline = self._clock() + STOP_TIMEOUT
        while _alive(pid):
            if self._clock() >= deadline:
                return False
            self._sleep(POLL)
        return True


def _env() -> dict[str, str]:
    return {**os.environ, "LANG": "C", "LC_ALL": "C"}


def _first_alert(text: str) -> str:
    """HAProxy's first [ALERT] line says what is wrong; its [NOTICE] lines do not."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    alerts = [line for line in lines if "[ALERT]" in line]
    return (alerts or lines or ["no error output"])[0]


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        raise BalancerError(f"cannot stop HAProxy (pid {pid}): {exc}") from None


def _alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
