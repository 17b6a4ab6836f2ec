"""Parse `packer build -machine-readable` output into typed events. Pure: no I/O.

Each line is `timestamp,target,type,data...`; commas inside data are written as
`%!(PACKER_COMMA)` and newlines as a literal backslash-n. `ui` lines have an empty target;
`artifact` lines arrive as a block per artifact ending in `<n>,end`; a failed build ends with
`error-count` and one `<build>,error,<message>` per failed build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STEP = re.compile(r"^==> (?:(?P<build>[^:\s]+): )?(?P<text>.*)$", re.DOTALL)
_MESSAGE = re.compile(r"^\s+(?P<build>[^:\s]+): (?P<text>.*)$", re.DOTALL)


def unescape(value: str) -> str:
    """Undo Packer's machine-readable escaping."""
    return value.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")


@dataclass(frozen=True)
class RawLine:
    """One machine-readable line, split and unescaped."""

    timestamp: int
    target: str
    kind: str
    data: tuple[str, ...]


def split_line(line: str) -> RawLine | None:
    """`None` for a line that is not machine-readable (e.g. a crash message on stderr)."""
    parts = line.rstrip("\r\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    return RawLine(int(parts[0]), parts[1], parts[2], tuple(unescape(p) for p in parts[3:]))


@dataclass(frozen=True)
class StepEvent:
    """Packer started a step (`==> build: Creating hard drive...`)."""

    build: str | None
    text: str
    at: int
    kind: str = "step"


@dataclass(frozen=True)
class MessageEvent:
    """Detail output below a step; also any line that is not machine-readable."""

    build: str | None
    text: str
    kind: str = "message"


@dataclass(frozen=True)
class ErrorEvent:
    """An error, from a `ui,error` line or a `<build>,error` summary line."""

    build: str | None
    text: str
    final: bool = False  # from the end-of-run summary: the reason a build failed
    kind: str = "error"


@dataclass(frozen=True)
class Artifact:
    build: str
    index: int
    builder_id: str = ""
    id: str = ""
    description: str = ""
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArtifactEvent:
    artifact: Artifact
    kind: str = "artifact"


@dataclass(frozen=True)
class ErrorCountEvent:
    count: int
    kind: str = "error-count"


PackerEvent = StepEvent | MessageEvent | ErrorEvent | ArtifactEvent | ErrorCountEvent


@dataclass
class _PendingArtifact:
    builder_id: str = ""
    id: str = ""
    description: str = ""
    files: dict[int, str] = field(default_factory=dict)


class StreamParser:
    """Feed lines, get events. Keeps only the artifact blocks still being read."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], _PendingArtifact] = {}

    def feed(self, line: str) -> list[PackerEvent]:
        raw = split_line(line)
        if raw is None:
            text = line.rstrip("\r\n")
            return [MessageEvent(None, text)] if text.strip() else []
        if raw.kind == "ui":
            return self._ui(raw)
        if raw.kind == "artifact":
            return self._artifact(raw)
        if raw.kind == "error-count" and raw.data and raw.data[0].isdigit():
            return [ErrorCountEvent(int(raw.data[0]))]
        if raw.kind == "error" and raw.target:
            return [ErrorEvent(raw.target, raw.data[0] if raw.data else "", final=True)]
        return []

    def _ui(self, raw: RawLine) -> list[PackerEvent]:
        if len(raw.data) < 2:
            return []
        level, text = raw.data[0], ",".join(raw.data[1:]).strip("\n")
        if not text.strip():
            return []
        if level == "error":
            step = _STEP.match(text)
            if step:
                return [ErrorEvent(step["build"], step["text"])]
            return [ErrorEvent(None, text.strip())]
        step = _STEP.match(text)
        if level == "say" and step:
            return [StepEvent(step["build"], step["text"], raw.timestamp)]
        message = _MESSAGE.match(text)
        if message:
            return [MessageEvent(message["build"], message["text"])]
        return [MessageEvent(None, text.strip())]

    def _artifact(self, raw: RawLine) -> list[PackerEvent]:
        if len(raw.data) < 2 or not raw.data[0].isdigit():
            return []
        index, key, values = int(raw.data[0]), raw.data[1], raw.data[2:]
        pending = self._pending.setdefault((raw.target, index), _PendingArtifact())
        value = values[0] if values else ""
        if key == "builder-id":
            pending.builder_id = value
        elif key == "id":
            pending.id = value
        elif key == "string":
            pending.description = value
        elif key == "file" and len(values) >= 2 and values[0].isdigit():
            pending.files[int(values[0])] = values[1]
        elif key == "end":
            del self._pending[(raw.target, index)]
            files = tuple(pending.files[i] for i in sorted(pending.files))
            artifact = Artifact(
                raw.target, index, pending.builder_id, pending.id, pending.description, files
            )
            return [ArtifactEvent(artifact)]
        return []


@dataclass(frozen=True)
class StreamSummary:
    """What a whole run said: its artifacts, and its errors (last one = the reason)."""

    artifacts: tuple[Artifact, ...]
    errors: tuple[ErrorEvent, ...]
    error_count: int

    @property
    def last_error(self) -> str | None:
        finals = [e for e in self.errors if e.final]
        chosen = finals[-1] if finals else (self.errors[-1] if self.errors else None)
        return chosen.text if chosen else None


def summarize(events: list[PackerEvent]) -> StreamSummary:
    artifacts = tuple(e.artifact for e in events if isinstance(e, ArtifactEvent))
    errors = tuple(e for e in events if isinstance(e, ErrorEvent))
    counts = [e.count for e in events if isinstance(e, ErrorCountEvent)]
    return StreamSummary(artifacts, errors, counts[-1] if counts else 0)


def parse_stream(text: str) -> list[PackerEvent]:
    """All events of a recorded stream."""
    parser = StreamParser()
    return [event for line in text.splitlines() for event in parser.feed(line)]
