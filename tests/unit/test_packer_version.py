"""`packer version` is asked once per installed Packer, not once per `imagepipe build`: it is
part of every build's fingerprint, and asking costs more than the rest of an up-to-date build."""

from __future__ import annotations

from pathlib import Path

from imagepipe.images.packer import Packer, PackerVersion

SCRIPT = """#!/bin/sh
echo asked >> {calls}
echo 'Packer v{version}'
"""


def _install(folder: Path, version: str) -> Path:
    """A `packer` program that says its version and counts how often it was asked."""
    binary = folder / "packer"
    written = folder / "packer.new"  # a new file, as a package upgrade writes one
    written.write_text(SCRIPT.format(calls=folder / "calls", version=version))
    written.chmod(0o755)
    written.replace(binary)
    return binary


def _asked(folder: Path) -> int:
    calls = folder / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_the_version_is_asked_once_per_installed_packer(tmp_path: Path) -> None:
    binary = _install(tmp_path, "1.6.6")
    cache = tmp_path / "store" / ".packer-version.json"
    assert Packer(str(binary), version_cache=cache).version() == PackerVersion(1, 6, 6)
    assert Packer(str(binary), version_cache=cache).version() == PackerVersion(1, 6, 6)
    assert _asked(tmp_path) == 1
    _install(tmp_path, "1.9.4")  # upgraded
    assert Packer(str(binary), version_cache=cache).version() == PackerVersion(1, 9, 4)
    assert _asked(tmp_path) == 2


def test_a_broken_or_unwritable_cache_only_costs_asking_again(tmp_path: Path) -> None:
    binary = _install(tmp_path, "1.6.6")
    cache = tmp_path / ".packer-version.json"
    cache.write_text("{not json")
    assert Packer(str(binary), version_cache=cache).version() == PackerVersion(1, 6, 6)
    assert Packer(str(binary), version_cache=cache).version() == PackerVersion(1, 6, 6)
    assert _asked(tmp_path) == 1  # rewritten by the first
    (tmp_path / "a-file").write_text("")
    nowhere = tmp_path / "a-file" / ".packer-version.json"  # cannot be made, even by root
    assert Packer(str(binary), version_cache=nowhere).version() == PackerVersion(1, 6, 6)
    assert Packer(str(binary), version_cache=nowhere).version() == PackerVersion(1, 6, 6)
    assert _asked(tmp_path) == 3
