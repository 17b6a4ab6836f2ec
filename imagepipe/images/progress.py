"""How a build shows its progress: a spinner on a terminal, plain lines in a log, or JSON
events (one per line) for CI."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from imagepipe.images.build import BuildEvent, PhaseEvent

if TYPE_CHECKING:  # rich is imported by the spinner alone (a terminal), not for logs or JSON
    from rich.console import Console
    from rich.progress import TaskID


def event_document(event: BuildEvent) -> dict[str, Any]:
    """A JSON-ready dict: {"event": kind, ...fields}."""
    body = dataclasses.asdict(event)
    kind = body.pop("kind")
    return {"event": kind, **body}


def describe(event: BuildEvent) -> str | None:
    """The one line a human sees for an event, or None for detail not worth a line."""
    if isinstance(event, PhaseEvent):
        return event.text
    # Packer's own events come only once Packer runs (an up-to-date build has none)
    from imagepipe.images.stream import ArtifactEvent, ErrorEvent, StepEvent

    if isinstance(event, StepEvent):
        return f"{event.build}: {event.text}" if event.build else event.text
    if isinstance(event, ErrorEvent) and not event.final:
        return f"error: {event.text}"
    if isinstance(event, ArtifactEvent):
        files = ", ".join(event.artifact.files) or event.artifact.description
        return f"{event.artifact.build}: artifact {files}"
    return None


class JsonProgress:
    """One JSON object per event on `out`, with seconds since the start."""

    def __init__(self, out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):
        self._out = out or sys.stdout
        self._clock = clock
        self._start = clock()

    def __call__(self, event: BuildEvent) -> None:
        doc = {"elapsed": round(self._clock() - self._start, 3), **event_document(event)}
        self._out.write(json.dumps(doc) + "\n")
        self._out.flush()


class PlainProgress:
    """One line per step, `[  12.3s] text` (for logs and non-terminals)."""

    def __init__(self, out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):
        self._out = out or sys.stderr
        self._clock = clock
        self._start = clock()

    def __call__(self, event: BuildEvent) -> None:
        line = describe(event)
        if line is not None:
            self._out.write(f"[{self._clock() - self._start:6.1f}s] {line}\n")
            self._out.flush()


class SpinnerProgress:
    """On a terminal: past steps scroll by, the current one has a spinner and elapsed time."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> SpinnerProgress:
        self._progress.start()
        self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, event: BuildEvent) -> None:
        line = describe(event)
        if line is None or self._task is None:
            return
        if event.kind in ("step", "phase"):
            self._progress.update(self._task, description=line)
        self._progress.console.print(f"  {line}", markup=False, highlight=False)
