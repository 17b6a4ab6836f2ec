"""YAML with line numbers, read defensively: every key path mapped to the line it is on.

Configuration errors must name the file, the line and the key. This module turns YAML text
into plain Python values plus a map `key path -> line` (1-based), e.g.
("sessions", "recycle_after") -> 7, ("schedule", 0) -> 12.

Scalars follow the YAML 1.2 core schema, not PyYAML's YAML 1.1 defaults: `07:00` stays the
text "07:00" (not 420), and `no`, `off`, `none` stay text. Booleans are true/false,
null is null, ~ or empty.

The files are written by people and scripts and read by a root service, so the reader is
bounded whatever the bytes are (see docs/configuration.md, "What a file may not hold"):

- files over MAX_FILE_BYTES are refused before they are read; only regular files are read;
- the text must be UTF-8 without control characters (tab and line ends are fine);
- nesting deeper than MAX_DEPTH, or more than MAX_NODES values after aliases are expanded,
  is refused, so nesting bombs and alias bombs ("billion laughs") cost nothing;
- an alias inside the collection it names (`a: &a [*a]`) is refused;
- only the core tags (!!str, !!int, !!float, !!bool, !!null, !!map, !!seq) are allowed, and a
  value must fit its tag; integers must fit in 64 bits; .inf and .nan are refused;
- text values may not hold control characters or lone surrogates (from escapes).

The document is built from the parser's event stream (libyaml's when PyYAML has it), without
recursion, so no input can exhaust the Python stack.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagepipe.errors import ConfigError
from imagepipe.record import Record

KeyPath = tuple[str | int, ...]

MAX_FILE_BYTES = 1024 * 1024  # configuration files are a few KiB; 1 MiB is far beyond
MAX_DEPTH = 32  # a pool file nests 3 deep
MAX_NODES = 20_000  # values in one document, aliases expanded
MAX_PATH_CHARS = 4096  # Linux PATH_MAX
MAX_NAME_BYTES = 255  # Linux NAME_MAX, one path component
INT64 = 2**63

# What the text may hold: tab, line feed, carriage return, printable ASCII, and every other
# Unicode character except C1 controls, surrogates and the non-characters U+FFFE/U+FFFF.
# Written as the characters refused, not the complement of those allowed: the same set (every
# code point checked), compiled in a tenth of the time every command start paid.
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# In values (after escapes such as "\0" are decoded): no control characters either.
_BAD_VALUE_CHAR = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")

_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_NULL = re.compile(r"~|null|Null|NULL|")
_MAX_NUMBER_CHARS = 64  # a number written with more characters is refused before parsing

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}


class Located(Record, kw_only=False):
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
            if len(part) > 80:  # a key of thousands of characters stays one readable line
                part = f"{part[:60]}…({len(part)} characters)"
            text += f".{part}" if text else part
    return text


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def check_path(path: Path, name: str) -> None:
    """ConfigError when the file system would refuse the path by its length alone."""
    text = os.fsencode(path)
    if len(text) > MAX_PATH_CHARS:
        raise ConfigError(
            f"the path is {len(text)} bytes long; the limit is {MAX_PATH_CHARS}", file=_short(name)
        )
    for part in text.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            raise ConfigError(
                f"a name in the path is {len(part)} bytes long; the limit is {MAX_NAME_BYTES}",
                file=_short(name),
            )


def path_kind(path: Path, name: str | None = None) -> str:
    """ "file", "dir", "missing" or "other" for `path`; ConfigError when the file system
    refuses to look (a name too long, no permission on a folder on the way)."""
    shown = _short(name if name is not None else str(path))
    check_path(path, shown)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise ConfigError(f"cannot look at it: {exc.strerror}", file=shown) from None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def expand_user(path: Path, name: str) -> Path:
    """`~/x` and `~user/x` expanded; ConfigError for a user that does not exist."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise ConfigError("the home folder in this path is unknown", file=_short(name)) from None


def read_text(path: Path, display: str | None = None, *, limit: int = MAX_FILE_BYTES) -> str:
    """The text of a small UTF-8 file, or ConfigError naming the file (and line) and why.

    Refused before reading: paths the file system cannot hold, anything but a regular file,
    files over `limit` bytes. Refused after: invalid UTF-8, control characters.
    """
    name = display if display is not None else str(path)
    check_path(path, name)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("file not found", file=_short(name)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {_reason(exc)}", file=_short(name)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError("is a folder, not a file", file=_short(name))
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("not a regular file", file=_short(name))
        if info.st_size > limit:
            raise ConfigError(
                f"the file is {info.st_size} bytes; the limit is {limit} bytes", file=_short(name)
            )
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {_reason(exc)}", file=_short(name)) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise ConfigError(f"the file is over the limit of {limit} bytes", file=name)
    return decode(data, name)


def decode(data: bytes, name: str) -> str:
    """UTF-8 text without control characters, else ConfigError with the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8",
            file=name,
            line=line,
        ) from None
    text = text.removeprefix("\ufeff")
    check_characters(text, name)
    return text


def check_characters(text: str, name: str) -> None:
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(
            f"control character U+{ord(bad.group()):04X} is not allowed; remove it",
            file=name,
            line=line,
        )


def load_file(path: Path, display: str | None = None) -> Located:
    """Read and parse a YAML file; `display` is the name used in messages."""
    name = display if display is not None else str(path)
    return load_text(read_text(path, name), name)


def _read_at_most(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "error")


def _short(name: str) -> str:
    """A file name fit for a one-line message (a hostile one can be thousands long)."""
    return name if len(name) <= 200 else f"{name[:120]}…({len(name)} characters)"


# --------------------------------------------------------------------------------------
# YAML text -> values, from the event stream, bounded
# --------------------------------------------------------------------------------------

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_text(text: str, file: str) -> Located:
    """Parse one YAML document. Malformed or hostile YAML raises ConfigError with file:line."""
    check_characters(text, file)
    builder = _Builder(file)
    try:
        for event in _events(text):
            builder.feed(event)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "cannot be parsed"
        raise ConfigError(f"malformed YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {_one_line(str(exc))}", file=file) from None
    return Located(data=builder.result, lines=builder.lines, file=file)


def _events(text: str) -> Iterator[yaml.Event]:
    loader = _Loader(text)
    try:
        while loader.check_event():
            yield loader.get_event()
    finally:
        loader.dispose()


@dataclass
class _Open:
    """A mapping or sequence being built (it is already in its parent)."""

    value: dict[str, Any] | list[Any]
    path: KeyPath
    anchor: str | None
    first_node: int  # builder.nodes before it started
    first_line: int  # len(builder.line_log) before it started
    height: int = 0  # levels of collections inside it
    key: str | None = None  # a mapping's key waiting for its value
    key_line: int = 0


class _Anchor(Record, kw_only=False):
    value: Any
    nodes: int
    height: int
    lines: tuple[tuple[KeyPath, int], ...]  # below the anchored value, relative to it


@dataclass
class _Builder:
    """Plain values and the line of every key path, from parser events, within the limits."""

    file: str
    result: Any = None
    lines: dict[KeyPath, int] = field(default_factory=lambda: {(): 1})
    nodes: int = 0
    documents: int = 0
    stack: list[_Open] = field(default_factory=list)
    anchors: dict[str, _Anchor] = field(default_factory=dict)
    line_log: list[tuple[KeyPath, int]] = field(default_factory=list)

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise self.error("more than one YAML document ('---'); give one", event)
        elif isinstance(event, yaml.ScalarEvent):
            self.count(1, event)
            value = self.scalar(event)
            if event.anchor is not None:
                self.anchors[event.anchor] = _Anchor(value, 1, 0, ())
            self.place(value, 0, event)
        elif isinstance(event, yaml.AliasEvent):
            self.alias(event)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            self.start(event)
        elif isinstance(event, yaml.CollectionEndEvent):
            self.end()

    def error(self, message: str, event: yaml.Event, path: KeyPath | None = None) -> ConfigError:
        key = format_path(path) if path else None
        return ConfigError(message, file=self.file, line=_line(event), key=key)

    def count(self, nodes: int, event: yaml.Event) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise self.error(
                f"more than {MAX_NODES} values (aliases expanded); a configuration file "
                "needs far fewer",
                event,
            )

    def note_line(self, path: KeyPath, line: int) -> None:
        if path not in self.lines:
            self.lines[path] = line
            self.line_log.append((path, line))

    def place(self, value: Any, height: int, event: yaml.Event) -> KeyPath:
        """Put a value into the open collection (or make it the document); its key path."""
        if not self.stack:
            self.result = value
            return ()
        top = self.stack[-1]
        top.height = max(top.height, height + 1)
        if isinstance(top.value, list):
            path: KeyPath = (*top.path, len(top.value))
            self.note_line(path, _line(event))
            top.value.append(value)
            return path
        if top.key is None:
            top.key = self.key(value, event, top)
            top.key_line = _line(event)
            return top.path
        path = (*top.path, top.key)
        self.note_line(path, top.key_line)
        top.value[top.key] = value
        top.key = None
        return path

    def key(self, value: Any, event: yaml.Event, top: _Open) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `1001: 3` under assignments is the user "1001"
        if not isinstance(value, str):
            raise self.error(f"keys must be plain words, got {_shown(value)}", event, top.path)
        assert isinstance(top.value, dict)
        if value in top.value:
            child = (*top.path, value)
            raise self.error(
                f"duplicate key (first given on line {self.lines[child]})", event, child
            )
        return value

    def start(self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent) -> None:
        is_map = isinstance(event, yaml.MappingStartEvent)
        if event.tag not in (None, "!", _TAG + ("map" if is_map else "seq")):
            raise self.error(f"the tag {_short_tag(str(event.tag))} is not allowed here", event)
        if self.awaiting_key():
            shown = "a mapping" if is_map else "a list"
            raise self.error(f"keys must be plain words, got {shown}", event, self.stack[-1].path)
        if len(self.stack) >= MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", event)
        first_node, first_line = self.nodes, len(self.line_log)
        self.count(1, event)
        value: dict[str, Any] | list[Any] = {} if is_map else []
        path = self.place(value, 0, event)
        self.stack.append(_Open(value, path, event.anchor, first_node, first_line))

    def end(self) -> None:
        done = self.stack.pop()
        if self.stack:
            self.stack[-1].height = max(self.stack[-1].height, done.height + 1)
        if done.anchor is not None:
            cut = len(done.path)
            lines = tuple((p[cut:], line) for p, line in self.line_log[done.first_line :])
            self.anchors[done.anchor] = _Anchor(
                done.value, self.nodes - done.first_node, done.height, lines
            )

    def alias(self, event: yaml.AliasEvent) -> None:
        name = str(event.anchor)
        if any(o.anchor == name for o in self.stack):
            raise self.error(f"the alias *{name} is inside the value it names", event)
        anchor = self.anchors.get(name)
        if anchor is None:
            raise self.error(f"unknown alias *{name}", event)
        if len(self.stack) + anchor.height > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", event)
        self.count(anchor.nodes, event)
        if self.awaiting_key() and isinstance(anchor.value, dict | list):
            raise self.error(
                f"keys must be plain words, got {_shown(anchor.value)}", event, self.stack[-1].path
            )
        path = self.place(anchor.value, anchor.height, event)
        for relative, line in anchor.lines:
            self.note_line((*path, *relative), line)

    def value_path(self) -> KeyPath | None:
        """The key path the next value goes to (its parent's, for a key)."""
        if not self.stack:
            return None
        top = self.stack[-1]
        if isinstance(top.value, list):
            return (*top.path, len(top.value))
        return top.path if top.key is None else (*top.path, top.key)

    def awaiting_key(self) -> bool:
        return (
            bool(self.stack)
            and isinstance(self.stack[-1].value, dict)
            and (self.stack[-1].key is None)
        )

    def scalar(self, event: yaml.ScalarEvent) -> Any:
        try:
            value = _scalar(event)
        except _BadScalar as exc:
            raise self.error(str(exc), event, self.value_path()) from None
        if isinstance(value, str):
            bad = _BAD_VALUE_CHAR.search(value)
            if bad is not None:
                raise self.error(
                    f"control character U+{ord(bad.group()):04X} in a value is not allowed",
                    event,
                    self.value_path(),
                )
        return value


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _scalar(event: yaml.ScalarEvent) -> Any:
    """The value of a scalar under the core schema, or a MarkedYAMLError."""
    text: str = event.value
    tag = event.tag
    if tag is None or tag == "!":
        if tag == "!" or event.style:  # quoted, block or `!`: text
            return text
        tag = _resolve(text)
    elif tag not in _SCALAR_TAGS:
        raise _BadScalar(f"the tag {_short_tag(tag)} is not allowed here")
    kind = tag.removeprefix(_TAG)
    if kind == "str":
        return text
    if kind == "null" and _NULL.fullmatch(text):
        return None
    if kind == "bool" and _BOOL.fullmatch(text):
        return text.lower() == "true"
    if kind == "int" and _INT.fullmatch(text):
        return _int(text)
    if kind == "float" and (_FLOAT.fullmatch(text) or _INT.fullmatch(text)):
        return _float(text)
    raise _BadScalar(f"{text!r} is not a valid !!{kind}")


def _resolve(text: str) -> str:
    if _NULL.fullmatch(text):
        return f"{_TAG}null"
    if _BOOL.fullmatch(text):
        return f"{_TAG}bool"
    if _INT.fullmatch(text):
        return f"{_TAG}int"
    if _FLOAT.fullmatch(text):
        return f"{_TAG}float"
    return f"{_TAG}str"


def _int(text: str) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _BadScalar(f"a number of {len(text)} characters is too large")
    if text.startswith("0o"):
        value = int(text[2:], 8)
    elif text.startswith("0x"):
        value = int(text[2:], 16)
    else:
        value = int(text, 10)
    if not -INT64 <= value < INT64:
        raise _BadScalar(f"{text} is too large (whole numbers must fit in 64 bits)")
    return value


def _float(text: str) -> float:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _BadScalar(f"a number of {len(text)} characters is too large")
    value = float("nan") if text.lower().lstrip("+-") in (".inf", ".nan") else float(text)
    if not math.isfinite(value):
        raise _BadScalar(f"{text} is not a finite number")
    return value


class _BadScalar(ValueError):
    """A scalar that does not fit its tag or the limits; the builder adds file and line."""


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 1


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag[:60]


def _one_line(text: str) -> str:
    return " ".join(text.split())
