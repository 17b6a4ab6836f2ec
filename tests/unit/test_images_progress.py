"""What a user sees while a build runs: JSON events, plain lines, or a spinner."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from rich.console import Console

from imagepipe.images.build import PhaseEvent
from imagepipe.images.progress import JsonProgress, PlainProgress, SpinnerProgress
from imagepipe.images.stream import Artifact, ArtifactEvent, ErrorEvent, MessageEvent, StepEvent


def _clock(times: list[float]) -> Iterator[float]:
    yield from times


def test_json_progress_prints_one_event_per_line_with_elapsed_seconds() -> None:
    out = io.StringIO()
    ticks = _clock([100.0, 100.5, 102.25])
    progress = JsonProgress(out, clock=lambda: next(ticks))
    progress(PhaseEvent("validate", "packer validate"))
    progress(StepEvent("qemu.tiny", "Waiting for shutdown...", 17))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {"elapsed": 0.5, "event": "phase", "phase": "validate", "text": "packer validate"},
        {
            "elapsed": 2.25,
            "event": "step",
            "build": "qemu.tiny",
            "text": "Waiting for shutdown...",
            "at": 17,
        },
    ]


def test_plain_progress_prints_steps_errors_and_artifacts_but_not_detail() -> None:
    out = io.StringIO()
    ticks = _clock([0.0, 1.0, 2.0, 3.0, 4.0])
    progress = PlainProgress(out, clock=lambda: next(ticks))
    progress(StepEvent("qemu.tiny", "Starting VM", 1))
    progress(MessageEvent("qemu.tiny", "detail nobody needs"))
    progress(ErrorEvent("qemu.tiny", "Failed to shutdown"))
    progress(ArtifactEvent(Artifact("qemu.tiny", 0, files=("output/disk.qcow2",))))
    assert out.getvalue().splitlines() == [
        "[   1.0s] qemu.tiny: Starting VM",
        "[   2.0s] error: Failed to shutdown",
        "[   3.0s] qemu.tiny: artifact output/disk.qcow2",
    ]


def test_spinner_progress_keeps_past_steps_on_screen() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with SpinnerProgress(console) as progress:
        progress(PhaseEvent("render", "rendering tiny"))
        progress(StepEvent("qemu.tiny", "Waiting for shutdown...", 1))
    text = out.getvalue()
    assert "rendering tiny" in text
    assert "qemu.tiny: Waiting for shutdown..." in text
