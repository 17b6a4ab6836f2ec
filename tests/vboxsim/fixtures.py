"""Helpers for tests running imagepipe on the simulated VirtualBox."""

from __future__ import annotations

import subprocess
from pathlib import Path

from imagepipe.pool.model import BaseImage, Endpoint
from tests.vboxsim.api import Boot, Host


def blank_disk(path: Path, size_mb: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mb}M"],
        check=True,
        timeout=60,
    )
    return path


def base_vm(
    host: Host, disk: Path, *, image: str = "tiny", version: int = 1, boot: Boot | None = None
) -> BaseImage:
    """A base VM imagepipe-<image>-v<N> with a `clean` snapshot, as a registered version
    built by virtualbox-iso and imported would have."""
    name = f"imagepipe-{image}-v{version}"
    host.create_base_vm(name, disk, boot=boot, snapshot="clean")
    return BaseImage(image=image, version=version, directory=disk.parent, vm=name, snapshot="clean")


def tiny_vm(
    host: Host, directory: Path, *, version: int = 1, cmdline: str | None = None
) -> BaseImage:
    """The tiny image (a real guest: kernel, initramfs, disk) built into `directory` and
    registered as the base VM imagepipe-tiny-v<N> with a `clean` snapshot, as an imported
    version has it; `cmdline` replaces the guest's kernel command line."""
    from tests.guest import tiny_base_image

    tiny = tiny_base_image(directory, version=version)
    d = tiny.directory
    boot = Boot(d / (tiny.kernel or ""), d / (tiny.initrd or ""), cmdline or tiny.cmdline or "")
    name = f"imagepipe-tiny-v{version}"
    host.create_base_vm(name, d / (tiny.disk or ""), boot=boot, snapshot="clean")
    return BaseImage("tiny", version, d, vm=name, snapshot="clean")


def vnc_display() -> Endpoint:
    """A free loopback port QEMU's VNC, standing in for VRDE, can serve (5900 and up)."""
    from tests.host import free_port

    port = free_port()
    while port < 5900:
        port = free_port()
    return Endpoint("127.0.0.1", port)
