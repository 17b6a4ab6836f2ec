"""A file's problems as issues: file:line: key: what was expected, all of them at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from imagepipe.errors import ConfigError
from imagepipe.record import Record
from imagepipe.schema import Invalid, Section, read, show
from imagepipe.yamlsrc import KeyPath, Located, format_path


class Issue(Record, kw_only=False):
    """One thing wrong in a file."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{key} {self.message}"


class ConfigIssues(ConfigError):
    """Several configuration errors at once; the message has one line per issue."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        first = issues[0]
        more = f" (and {len(issues) - 1} more below)" if len(issues) > 1 else ""
        rest = "".join(f"\n{issue}" for issue in issues[1:])
        super().__init__(
            first.message + more + rest, file=first.file, line=first.line, key=first.key or None
        )
        self.issues = tuple(issues)


def raise_if(issues: Sequence[Issue]) -> None:
    if issues:
        raise ConfigIssues(sorted(issues, key=lambda i: (i.file, i.line)))


def issue_at(doc: Located, path: KeyPath, message: str) -> Issue:
    return Issue(doc.file, doc.line_of(path), format_path(path), message)


def top_mapping(doc: Located, issues: list[Issue]) -> dict[str, Any]:
    if doc.data is None:
        return {}
    if not isinstance(doc.data, dict):
        issues.append(issue_at(doc, (), f"expected a mapping of keys, got {show(doc.data)}"))
        return {}
    return doc.data


S = TypeVar("S", bound=Section)


def validate(model: type[S], raw: dict[str, Any], doc: Located, issues: list[Issue]) -> S | None:
    """`raw` read as `model`; None, with one issue per problem at its key's line, if wrong."""
    try:
        return read(model, raw)
    except Invalid as exc:
        issues += [issue_at(doc, path, message) for path, message in exc.problems]
        return None
