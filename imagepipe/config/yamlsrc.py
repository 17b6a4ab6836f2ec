"""YAML with line numbers: every key path of a document mapped to the line it is on.

Configuration errors must name the file, the line and the key. PyYAML's composer gives nodes
with positions; this module turns a node tree into plain Python values plus a map
`key path -> line` (1-based), e.g. ("sessions", "recycle_after") -> 7, ("schedule", 0) -> 12.

Scalars follow the YAML 1.2 core schema, not PyYAML's YAML 1.1 defaults: `07:00` stays the
text "07:00" (not 420), and `no`, `off`, `none` stay text. Booleans are true/false,
null is null, ~ or empty.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagepipe.errors import ConfigError

KeyPath = tuple[str | int, ...]


class _CoreLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema implicit types."""


_CoreLoader.yaml_implicit_resolvers = {}
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


@dataclass(frozen=True)
class Located:
    """A parsed YAML document and the line of every key path in it."""

    data: Any
    lines: Mapping[KeyPath, int]
    file: str

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest ancestor that is in the file."""
        for cut in range(len(path), -1, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                return line
        return 1


def format_path(path: KeyPath) -> str:
    """("schedule", 0, "days") -> "schedule[0].days"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def load_text(text: str, file: str) -> Located:
    """Parse one YAML document. Malformed YAML raises ConfigError with file:line."""
    loader = _CoreLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {(): 1}
        data = _convert(loader, node, (), lines, file) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "cannot be parsed"
        raise ConfigError(f"malformed YAML: {problem}", file=file, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=file) from exc
    finally:
        loader.dispose()
    return Located(data=data, lines=lines, file=file)


def load_file(path: Path, display: str | None = None) -> Located:
    """Read and parse a YAML file; `display` is the name used in messages."""
    name = display if display is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=name) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", file=name) from exc
    return load_text(text, name)


def _convert(
    loader: _CoreLoader, node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], file: str
) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)  # `1001: 3` under assignments is the user "1001"
            if not isinstance(key, str):
                raise ConfigError(
                    f"keys must be plain words, got {key!r}",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    key=format_path(path) or None,
                )
            child = (*path, key)
            if key in result:
                raise ConfigError(
                    f"duplicate key (first given on line {lines[child]})",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    key=format_path(child),
                )
            lines[child] = key_node.start_mark.line + 1
            result[key] = _convert(loader, value_node, child, lines, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        items: list[Any] = []
        for index, item_node in enumerate(node.value):
            child = (*path, index)
            lines[child] = item_node.start_mark.line + 1
            items.append(_convert(loader, item_node, child, lines, file))
        return items
    return loader.construct_object(node, deep=True)
