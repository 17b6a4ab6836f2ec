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
