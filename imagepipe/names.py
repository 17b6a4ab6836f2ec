"""Names of images, channels and versions: one rule each, shared by the registry, the pool
files and the CLI, so a name one of them accepts the others accept too.

All ASCII: they become folder names, git tag names and parts of desktop names.
"""

from __future__ import annotations

import re

MAX_NAME = 64
MAX_VERSION_DIGITS = 9

IMAGE_RULE = (
    f"lowercase letters, digits, '.', '_', '-', starting with a letter or digit, at most "
    f"{MAX_NAME} characters"
)
CHANNEL_RULE = (
    f"lowercase letters, digits, '_', '-', starting with a letter, at most {MAX_NAME} characters"
)

_IMAGE = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_NAME - 1}}}")
_CHANNEL = re.compile(rf"[a-z][a-z0-9_-]{{0,{MAX_NAME - 1}}}")
_VERSION = re.compile(r"v?([0-9]+)")


def shown(text: str) -> str:
    """A user's text fit for a one-line message: quoted, and cut when it is long."""
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}… ({len(text)} characters)"


def image_error(name: str) -> str | None:
    """Why `name` is not an image name, or None when it is one."""
    if not name:
        return "the image name is empty"
    if _IMAGE.fullmatch(name):
        return None
    return f"{shown(name)} is not an image name ({IMAGE_RULE})"


def channel_error(name: str) -> str | None:
    """Why `name` is not a channel name, or None when it is one."""
    if not name:
        return "the channel name is empty"
    if _CHANNEL.fullmatch(name):
        return None
    return f"{shown(name)} is not a channel name ({CHANNEL_RULE})"


def version_number(ref: str) -> int | None:
    """7 from "7" or "v7"; None when `ref` is not written as a version number.

    ValueError when it is one but has more than MAX_VERSION_DIGITS digits.
    """
    match = _VERSION.fullmatch(ref)
    if match is None:
        return None
    digits = match[1]
    if len(digits) > MAX_VERSION_DIGITS:
        raise ValueError(
            f"version {shown(ref)} has {len(digits)} digits; versions have at most "
            f"{MAX_VERSION_DIGITS}"
        )
    return int(digits)
