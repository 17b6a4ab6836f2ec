"""The pool-file key `start: boot | restore` (instant desktops)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.config import load_pool_file
from imagepipe.errors import ConfigError
from imagepipe.pool.model import StartMode


def pool(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "lab.yml"
    path.write_text(f"name: lab\nimage: tiny\n{extra}")
    return path


def test_a_pool_restores_its_desktops_unless_it_says_otherwise(tmp_path: Path) -> None:
    assert load_pool_file(pool(tmp_path)).start is StartMode.RESTORE


def test_a_pool_can_choose_to_boot_its_desktops(tmp_path: Path) -> None:
    assert load_pool_file(pool(tmp_path, "start: boot\n")).start is StartMode.BOOT


def test_an_unknown_start_is_refused_naming_the_key_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_pool_file(pool(tmp_path, "start: resume\n"))
    message = str(caught.value)
    assert "start" in message and "boot" in message and "restore" in message
