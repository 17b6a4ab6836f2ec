"""Running `imagepipe` in-process on hostile input, and what every answer must look like.

Shared by the hostile-input corpus (tests/unit/test_hostile_*.py) and the fuzz suite
(tests/fuzz/): exit 0, 2 or 3; no Python traceback; an error is one line (per issue) that
starts with `imagepipe: error:` and, for a bad file, names the file.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from typing import Any

from imagepipe.cli.app import main

ALLOWED_EXITS = (0, 2, 3)


@dataclass(frozen=True)
class Answer:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        return self.err.strip().splitlines()[0] if self.err.strip() else ""


def run(argv: list[str]) -> Answer:
    """`imagepipe ARGV` in this process. An exception escaping main() is a traceback the
    user would see: it propagates and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return Answer(code, out.getvalue(), err.getvalue())


def check_answer(answer: Answer, *, file: str | None = None) -> None:
    """What every answer to any input must satisfy."""
    assert answer.code in ALLOWED_EXITS, answer
    assert "Traceback" not in answer.err + answer.out, answer
    if answer.code == 0:
        return
    lines = answer.err.strip().splitlines()
    assert lines, answer
    assert lines[0].startswith("imagepipe: error: ") or lines[0].startswith("Usage:"), answer
    assert all(len(line) <= 2000 for line in lines), "an error line of a whole file's length"
    if file is not None and answer.code == 2 and not lines[0].startswith("Usage:"):
        assert file in answer.err, f"exit 2 does not name {file}: {answer.err}"


def strict_json(text: str) -> Any:
    """JSON as other programs read it: no NaN or Infinity."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)
