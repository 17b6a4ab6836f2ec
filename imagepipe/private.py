"""Owner-only folders and files, whatever the umask: the state database (who used which
desktop when), its folder, the run folder (HAProxy's admin socket) and the registry's working
files are the keeper's alone. Only what this creates gets these modes; `imagepipe doctor`
warns about looser modes on what exists already."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create `path` and each missing parent as an owner-only folder (mode set after the
    mkdir, so the umask cannot loosen or tighten it). Existing folders are left as they are."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made by another process meanwhile: its modes are its own
        os.chmod(folder, DIR_MODE)
    if not path.is_dir():
        path.mkdir()  # raises FileExistsError/NotADirectoryError with the path, as mkdir does


def private_file(path: Path) -> None:
    """Create `path` empty and owner-only when it does not exist (never follows a link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
