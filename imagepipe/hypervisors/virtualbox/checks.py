"""Host checks of the VirtualBox driver (for `imagepipe doctor`): VirtualBox and its version,
the vboxdrv kernel driver, the VRDE extension pack, pyvbox with VirtualBox's vboxapi, and each
pool's base VM. They only look: VBoxManage is asked for its version and extension packs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imagepipe.checks import Check, fail, ok, warn
from imagepipe.errors import ImagepipeError
from imagepipe.hypervisors.virtualbox.driver import import_pyvbox
from imagepipe.pool.model import BaseImage

VBOX_DRIVER = Path("/dev/vboxdrv")


def _vboxmanage(*args: str) -> subprocess.CompletedProcess[str] | None:
    program = shutil.which("VBoxManage")
    if program is None:
        return None
    try:
        return subprocess.run(
            [program, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "LANG": "C"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_virtualbox_host(modules: Path = Path("/proc/modules")) -> list[Check]:
    """VirtualBox and its version, the vboxdrv kernel driver, the VRDE extension pack, and
    pyvbox + vboxapi importable; each with its fix."""
    install = "install VirtualBox 6.1 or 7.x from https://www.virtualbox.org/wiki/Linux_Downloads"
    done = _vboxmanage("--version")
    if done is None or done.returncode != 0:
        return [fail("virtualbox", "VBoxManage is not installed", install)]
    checks = [ok("virtualbox", f"VirtualBox {done.stdout.strip()}")]
    loaded = VBOX_DRIVER.exists() or (
        modules.exists() and "vboxdrv " in modules.read_text(errors="replace")
    )
    checks.append(
        ok("vboxdrv", "the VirtualBox kernel driver is loaded")
        if loaded
        else fail("vboxdrv", "the vboxdrv kernel module is not loaded", "run /sbin/vboxconfig")
    )
    packs = _vboxmanage("list", "extpacks")
    text = packs.stdout if packs is not None else ""
    checks.append(
        ok("vrde", "the extension pack provides VRDE (remote desktop)")
        if "Extension Pack" in text and "Usable:" in text and "true" in text
        else fail(
            "vrde",
            "no usable VirtualBox Extension Pack: clones would have no remote display",
            "VBoxManage extpack install Oracle_VM_VirtualBox_Extension_Pack-<version>"
            ".vbox-extpack (the version of VirtualBox)",
        )
    )
    try:
        import_pyvbox()
        checks.append(ok("pyvbox", "pyvbox and VirtualBox's vboxapi import"))
    except ImagepipeError as exc:
        checks.append(fail("pyvbox", str(exc), "pip install 'imagepipe[virtualbox]'"))
    return checks


class BaseChecker(Protocol):
    def base_ready(self, base: BaseImage) -> bool: ...


@dataclass(frozen=True)
class PoolBase:
    """The base VM a pool's desktops are cloned from: its image version's."""

    pool: str
    image: str
    base: BaseImage


def check_bases(hypervisor: BaseChecker, bases: Sequence[PoolBase]) -> list[Check]:
    """Per pool: is its image version's base VM there, powered off, unlocked, snapshotted?"""
    checks = []
    for wanted in bases:
        base, name = wanted.base, f"base:{wanted.pool}"
        if hypervisor.base_ready(base):
            checks.append(ok(name, f"base VM {base.vm} is powered off with {base.snapshot}"))
        else:
            checks.append(
                warn(
                    name,
                    f"base VM {base.vm} of {wanted.image} v{base.version} cannot be cloned "
                    "now (missing, running, locked by a session, or without its snapshot)",
                    f"power off {base.vm} and close its sessions, or re-import it with "
                    f"imagepipe images import {wanted.image} --from-vm VM",
                )
            )
    return checks
