"""Error translation: pydantic's error locations -> file:line: key: what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from imagepipe.errors import ConfigError
from imagepipe.names import shown
from imagepipe.yamlsrc import KeyPath, Located, format_path


@dataclass(frozen=True)
class Issue:
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
        issues.append(issue_at(doc, (), f"expected a mapping of keys, got {_show(doc.data)}"))
        return {}
    return doc.data


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], raw: dict[str, Any], doc: Located, issues: list[Issue]) -> M | None:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            issues.append(_translate(error, doc, model))
        return None


def _translate(error: ErrorDetails, doc: Located, model: type[BaseModel]) -> Issue:
    path: KeyPath = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx", {})
    if kind == "extra_forbidden":
        return unknown_key(doc, path, model)
    if kind == "missing":
        return issue_at(doc, path, "required key is missing")
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif kind in ("literal_error", "enum"):
        message = f"expected {ctx.get('expected')}, got {_show(value)}"
    elif kind.startswith("int_"):
        message = f"expected a whole number, got {_show(value)}"
    elif kind.startswith("bool_"):
        message = f"expected true or false, got {_show(value)}"
    elif kind.startswith("string_"):
        message = f"expected text, got {_show(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        message = f"expected a mapping of keys, got {_show(value)}"
    elif kind == "list_type":
        message = f"expected a list, got {_show(value)}"
    elif kind in ("path_type", "path_parsing"):
        message = f"expected a path, got {_show(value)}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        message = f"must be {bound[0]} {ctx.get(bound[1])}, got {_show(value)}"
    else:
        message = error["msg"]
    return issue_at(doc, path, message)


def unknown_key(doc: Located, path: KeyPath, model: type[BaseModel]) -> Issue:
    valid = _valid_keys(model, path[:-1])
    key = str(path[-1])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "valid keys here: " + ", ".join(valid)
    return issue_at(doc, path, f"unknown key; {hint}")


def _valid_keys(model: type[BaseModel], parent: KeyPath) -> list[str]:
    current: Any = model
    for part in parent:
        if isinstance(part, int):
            continue
        fields = {(f.alias or name): f for name, f in current.model_fields.items()}
        annotation = fields[part].annotation if part in fields else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return [f.alias or name for name, f in current.model_fields.items() if name != "source"]


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return shown(value)
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"
