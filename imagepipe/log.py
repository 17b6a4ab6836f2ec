"""Logging: one line per event with key=value fields; `--log-format json` for machines.

    log = logging.getLogger(__name__)
    log.info("clone ready", extra=fields(pool="lab", clone="lab-3", action="create"))

Never pass a password or token in a field; a field named like one (password, token, secret,
key, …) is written as `***` all the same.

Under systemd, when stderr is the journal (`$JOURNAL_STREAM` names stderr's device and inode),
text lines carry no timestamp (journald adds its own) and start with a syslog priority prefix
(`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) so `journalctl -p` can filter them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

_FIELDS = "imagepipe_fields"
_SECRET = re.compile(r"pass(word|phrase)?|secret|token|credential|api_?key|private_?key", re.I)
REDACTED = "***"
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields rendered as key=value (or JSON keys)."""
    return {
        _FIELDS: {
            k: REDACTED if _SECRET.search(k) else v for k, v in values.items() if v is not None
        }
    }


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="')) else text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname.lower()} {self._body(record)}"

    def _body(self, record: logging.LogRecord) -> str:
        extra: dict[str, Any] = getattr(record, _FIELDS, {})
        parts = [_quote(record.getMessage())]
        parts += [f"{k}={_quote(v)}" for k, v in extra.items()]
        if record.exc_info:
            parts.append("error=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


class JournalFormatter(KeyValueFormatter):
    """For stderr connected to journald: a priority prefix, no timestamp of our own."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelname, 6)}>{self._body(record)}"


def under_journald(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """stderr is systemd's journal: $JOURNAL_STREAM is `device:inode` of this very stream."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
