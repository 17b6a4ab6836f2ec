"""The inputs fingerprint of a build: if it matches a registered version, nothing changed.

sha256 over: the image definition, every file in the image folder, the rendered templates
(secrets replaced by placeholders), the variable values, the names (never the values) of the
secrets, the parent version for update builds, and the Packer version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagepipe import schema
from imagepipe.images.checksum import sha256_file
from imagepipe.images.definition import Image
from imagepipe.images.records import ScalarValue
from imagepipe.images.templates import RenderedFile


def folder_digests(folder: Path) -> dict[str, str]:
    """Checksum of every file under the image folder (hidden files and caches excluded)."""
    digests: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file():
            digests[relative.as_posix()] = sha256_file(path)
    return digests


def fingerprint(
    image: Image,
    rendered: Sequence[RenderedFile],
    variables: Mapping[str, ScalarValue],
    packer_version: str,
    parent: int | None,
) -> str:
    document = {
        "definition": schema.dump(image.definition, by_key=True),
        "folder": folder_digests(image.folder),
        "rendered": {f.path: f.sha256 for f in rendered},
        "variables": {k: variables[k] for k in sorted(variables)},
        "secrets": sorted(image.definition.secrets),
        "parent": parent,
        "packer": packer_version,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
