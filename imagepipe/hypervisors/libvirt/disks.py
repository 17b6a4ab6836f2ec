"""Clone disks of the libvirt adapter, through qemu-img: overlays, full copies, checks.

One wrapper decides success (LANG=C, typed error with the argv and stderr's last line).
A clone disk is written as `<clone>.qcow2.partial` and renamed when complete; a partial that
a killed process left behind is removed the next time a disk is made in its folder (or by
remove_partial_disks), whether or not its slot is ever used again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

from imagepipe.errors import CloneNotFoundError, EnvironmentMissingError, FatalHypervisorError
from imagepipe.pool.model import CloneMode

QEMU_IMG_TIMEOUT = 600.0
PARTIAL_SUFFIX = ".partial"

# partial disks this process is writing right now (a sweep must leave them alone)
_writing: set[Path] = set()
_writing_lock = threading.Lock()


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise EnvironmentMissingError(
            "qemu-img is not installed: run ./install.sh (apt-get install qemu-utils)"
        )
    return path


def run_qemu_img(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; raise FatalHypervisorError naming the command when it fails."""
    argv = [_qemu_img(), *args]
    env = {**os.environ, "LANG": "C", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=QEMU_IMG_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FatalHypervisorError(f"{' '.join(argv)} took more than {exc.timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no error output"
        raise FatalHypervisorError(f"qemu-img {args[0]} failed ({done.returncode}): {tail}")
    return done


def disk_usable(path: Path) -> bool:
    """The disk is a complete image and no running QEMU holds it open for writing.

    `qemu-img info` without --force-share asks for QEMU's image locks, so it fails while a
    VM (a Packer build, a running base) writes the file; clones only read their backing file.
    """
    if not path.is_file():
        return False
    try:
        done = run_qemu_img(["info", "--output=json", str(path)])
        info = json.loads(done.stdout)
    except (FatalHypervisorError, json.JSONDecodeError):
        return False
    return isinstance(info, dict) and info.get("format") in ("qcow2", "raw")


def disk_format(path: Path) -> str:
    done = run_qemu_img(["info", "--output=json", "--force-share", str(path)])
    fmt = json.loads(done.stdout).get("format")
    return str(fmt) if fmt else "raw"


def make_clone_disk(base: Path, target: Path, mode: CloneMode) -> None:
    """Write a fresh clone disk: a qcow2 overlay on `base`, or a full qcow2 copy.

    Written beside the target and renamed, so a crash never leaves a half disk in place.
    """
    if not base.is_file():
        raise CloneNotFoundError(
            f"base disk {base} does not exist: build or re-register the image version"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX).absolute()
    with _writing_lock:
        _writing.add(partial)
    try:
        remove_partial_disks(target.parent)
        partial.unlink(missing_ok=True)
        fmt = disk_format(base)
        if mode is CloneMode.LINKED:
            run_qemu_img(
                ["create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", fmt, str(partial)]
            )
        else:
            run_qemu_img(["convert", "-q", "-f", fmt, "-O", "qcow2", str(base), str(partial)])
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        with _writing_lock:
            _writing.discard(partial)


def remove_partial_disks(directory: Path) -> list[Path]:
    """Remove the half-written clone disks (`*.qcow2.partial`) in `directory` that no
    make_clone_disk of this process is writing: what a kill during `qemu-img` leaves.
    Returns the files removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.glob("*.qcow2" + PARTIAL_SUFFIX)):
        with _writing_lock:
            if path.absolute() in _writing:
                continue
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
