"""Regenerate completions/ from the CLI (tests/unit/test_completions.py checks they match).

Run: .venv/bin/python scripts/gen_completions.py
"""

from __future__ import annotations

from pathlib import Path

from typer.completion import get_completion_script

SHELLS = ("bash", "zsh", "fish")
OUT = Path(__file__).resolve().parents[1] / "completions"


def script(shell: str) -> str:
    """The completion script for `shell`; it asks `imagepipe` itself for the candidates."""
    return get_completion_script(
        prog_name="imagepipe", complete_var="_IMAGEPIPE_COMPLETE", shell=shell
    )


if __name__ == "__main__":
    for name in SHELLS:
        (OUT / f"imagepipe.{name}").write_text(script(name))
