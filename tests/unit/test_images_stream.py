"""Packer's machine-readable stream, parsed from real recorded runs (Packer 1.6.6)."""

from __future__ import annotations

from pathlib import Path

from imagepipe.images.stream import (
    ArtifactEvent,
    ErrorEvent,
    MessageEvent,
    StepEvent,
    StreamParser,
    parse_stream,
    split_line,
    summarize,
)

DATA = Path(__file__).parent / "data" / "packer"


def _events(name: str) -> list[object]:
    return list(parse_stream((DATA / name).read_text()))


def test_successful_tiny_build_yields_its_steps_and_the_disk_artifact() -> None:
    events = _events("tiny-success.txt")
    steps = [e.text for e in events if isinstance(e, StepEvent)]
    assert "Starting VM, booting from CD-ROM" in steps
    assert "Waiting for shutdown..." in steps
    summary = summarize(events)  # type: ignore[arg-type]
    assert summary.error_count == 0
    assert summary.last_error is None
    [artifact] = summary.artifacts
    assert artifact.build == "qemu.tiny"
    assert artifact.builder_id == "transcend.qemu"
    assert artifact.files == ("output/disk.qcow2",)


def test_failed_build_reports_the_reason_from_the_summary_line() -> None:
    summary = summarize(_events("tiny-shutdown-timeout.txt"))  # type: ignore[arg-type]
    assert summary.error_count == 1
    assert summary.last_error == "Failed to shutdown"
    assert summary.artifacts == ()


def test_provisioner_failure_keeps_escaped_commas_and_stderr_lines() -> None:
    events = _events("provisioner-failure.txt")
    messages = [e.text for e in events if isinstance(e, MessageEvent)]
    assert "step one, with comma" in messages
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert ErrorEvent("null.x", "oops") in errors
    assert summarize(events).last_error == (  # type: ignore[arg-type]
        "Script exited with non-zero exit status: 3.Allowed exit codes are: [0]"
    )


def test_several_artifacts_of_one_build_are_told_apart_by_index() -> None:
    artifacts = [
        e.artifact for e in _events("null-two-artifacts.txt") if isinstance(e, ArtifactEvent)
    ]
    assert [a.index for a in artifacts] == [0, 1]
    assert all(
        a.description == "Did not export anything. This is the null builder" for a in artifacts
    )
    assert all(a.files == () for a in artifacts)


def test_escaped_newlines_and_commas_are_restored() -> None:
    raw = split_line("17,,ui,say,\\n==> Builds finished%!(PACKER_COMMA) ok\n")
    assert raw is not None
    assert raw.data == ("say", "\n==> Builds finished, ok")
    [event] = StreamParser().feed("17,,ui,say,\\n==> Builds finished%!(PACKER_COMMA) ok\n")
    assert event == StepEvent(None, "Builds finished, ok", 17)


def test_a_line_that_is_not_machine_readable_becomes_a_message() -> None:
    assert StreamParser().feed("panic: something broke\n") == [
        MessageEvent(None, "panic: something broke")
    ]
    assert StreamParser().feed("\n") == []


def test_artifact_files_arrive_in_index_order_even_when_interleaved() -> None:
    parser = StreamParser()
    lines = [
        "1,b,artifact,0,builder-id,x",
        "1,b,artifact,0,file,1,second.vmdk",
        "1,b,artifact,0,file,0,first.ovf",
        "1,b,artifact,0,end",
    ]
    events = [e for line in lines for e in parser.feed(line)]
    [event] = events
    assert isinstance(event, ArtifactEvent)
    assert event.artifact.files == ("first.ovf", "second.vmdk")
