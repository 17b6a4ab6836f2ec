"""Log lines as an administrator reads them: in a terminal, in the journal, as JSON."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from imagepipe.log import (
    JournalFormatter,
    JsonFormatter,
    KeyValueFormatter,
    fields,
    under_journald,
)


def record(level: int, message: str, **values: object) -> logging.LogRecord:
    rec = logging.LogRecord("imagepipe.test", level, __file__, 1, message, None, None)
    for key, value in fields(**values).items():
        setattr(rec, key, value)
    return rec


def test_in_the_journal_a_line_has_a_priority_prefix_and_no_timestamp_of_its_own() -> None:
    fmt = JournalFormatter()

    assert fmt.format(record(logging.ERROR, "clone failed", pool="lab")) == (
        '<3>"clone failed" pool=lab'
    )
    assert fmt.format(record(logging.WARNING, "x")).startswith("<4>")
    assert fmt.format(record(logging.INFO, "x")).startswith("<6>")
    assert fmt.format(record(logging.DEBUG, "x")).startswith("<7>")


def test_in_a_terminal_a_line_starts_with_time_and_level() -> None:
    line = KeyValueFormatter().format(record(logging.INFO, "clone ready", clone="lab-1"))

    stamp, level, rest = line.split(" ", 2)
    assert len(stamp) == 19 and stamp[10] == "T" and level == "info"
    assert rest == '"clone ready" clone=lab-1'


def test_stderr_is_the_journal_only_when_journal_stream_names_that_very_stream(
    tmp_path: Path,
) -> None:
    target = tmp_path / "stream"
    with target.open("w") as stream:
        info = target.stat()
        mine = f"{info.st_dev}:{info.st_ino}"

        assert under_journald({"JOURNAL_STREAM": mine}, stream)
        assert not under_journald({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream)
        assert not under_journald({}, stream)
        assert not under_journald({"JOURNAL_STREAM": "garbage"}, stream)
    assert not under_journald({"JOURNAL_STREAM": mine}, io.StringIO())  # no file descriptor


def test_a_field_named_like_a_secret_is_never_written() -> None:
    rec = record(logging.INFO, "login", user="alice", password="hunter2", api_token="abc")

    for fmt in (KeyValueFormatter(), JournalFormatter(), JsonFormatter()):
        line = fmt.format(rec)
        assert "hunter2" not in line and "abc" not in line and "alice" in line


def test_json_lines_carry_level_message_and_fields() -> None:
    doc = json.loads(JsonFormatter().format(record(logging.WARNING, "drain", clone="lab-0")))

    assert (doc["level"], doc["message"], doc["clone"]) == ("warning", "drain", "lab-0")
