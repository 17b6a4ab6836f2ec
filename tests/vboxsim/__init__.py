"""A simulated VirtualBox at the `vboxapi` boundary, so pyvbox's own code runs on it.

    host = vboxsim.start(tmp_path / "vbox", version="7.0.14")   # VBoxSVC for this test
    host.create_base_vm("imagepipe-tiny-v1", disk, boot=Boot(kernel, initrd, cmdline))
    hv = VirtualBoxHypervisor(...)                                  # pyvbox -> vboxapi -> host
    ...
    vboxsim.stop(host)

See api.py for what is simulated and how faithfully; process.py for running machines (real
QEMU guests of the tiny image, VNC on the VRDE port, users from the guest agent).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.vboxsim.api import HOSTS, Boot, Host, MemoryProcess, ProcessFactory

__all__ = ["Boot", "Host", "install", "start", "stop"]

SIM_DIR = str(Path(__file__).resolve().parent)


def install() -> None:
    """Make `import vboxapi` find the simulated module."""
    if SIM_DIR not in sys.path:
        sys.path.insert(0, SIM_DIR)


def start(
    home: Path, *, version: str = "6.1.50", process_factory: ProcessFactory = MemoryProcess
) -> Host:
    install()
    host = Host(home, version=version, process_factory=process_factory)
    HOSTS.use(host)
    return host


def stop(host: Host) -> None:
    host.shutdown()
    HOSTS.use(None)


class Server:
    """A simulated VBoxSVC in its own process (tests/vboxsim/remote.py), for tests where
    several processes (a keeper, `imagepipe status`) share one VirtualBox.

        with Server(home, qemu=True) as server:
            env = server.env()          # for subprocesses: PYTHONPATH and the socket
            server.host.create_base_vm(...)   # the simulated host, through a proxy
    """

    def __init__(self, home: Path, *, version: str = "7.0.14", qemu: bool = False) -> None:
        import os
        import subprocess
        import time

        from tests.vboxsim.remote import Remote, connect

        install()
        home.mkdir(parents=True, exist_ok=True)
        self.socket = home / "vboxsvc.sock"
        repo = str(Path(SIM_DIR).parents[1])
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, SIM_DIR])}
        argv = [sys.executable, "-m", "tests.vboxsim.remote", "--home", str(home)]
        argv += ["--socket", str(self.socket), "--version", version, *(["--qemu"] * qemu)]
        self.log = home / "vboxsvc.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, env=self._env, stdout=out, stderr=subprocess.STDOUT, cwd=repo
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simulated VBoxSVC did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.connection = connect(str(self.socket))
        self.host: Any = self.connection.ask("host", 0)
        self._remote_type = Remote

    def env(self) -> dict[str, str]:
        return {**self._env, "IMAGEPIPE_VBOXSIM_SOCKET": str(self.socket)}

    def console(self, machine: str) -> Path:
        return Path(self.connection.ask("console", 0, machine))

    def close(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
