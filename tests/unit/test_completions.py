"""The shell completions shipped in completions/ are current and really complete commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from gen_completions import SHELLS, script  # noqa: E402


@pytest.mark.parametrize("shell", SHELLS)
def test_shipped_completion_is_current(shell: str) -> None:
    shipped = (ROOT / "completions" / f"imagepipe.{shell}").read_text()
    assert shipped == script(shell), "completions are stale: run scripts/gen_completions.py"


def test_bash_completion_offers_the_subcommands() -> None:
    env = dict(
        os.environ, _IMAGEPIPE_COMPLETE="complete_bash", COMP_WORDS="imagepipe po", COMP_CWORD="1"
    )
    done = subprocess.run(
        [sys.executable, "-m", "imagepipe"], env=env, capture_output=True, text=True, check=False
    )
    assert "pools" in done.stdout.split()
