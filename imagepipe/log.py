"""Logging: one line per event with key=value fields; `--log-format json` for machines.

    log = logging.getLogger(__name__)
    log.info("clone ready", extra=fields(pool="lab", clone="lab-3", action="create"))

Never pass a password or token in a field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "imagepipe_fields"


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields rendered as key=value (or JSON keys)."""
    return {_FIELDS: {k: v for k, v in values.items() if v is not None}}


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="')) else text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        extra: dict[str, Any] = getattr(record, _FIELDS, {})
        parts = [stamp, record.levelname.lower(), _quote(record.getMessage())]
        parts += [f"{k}={_quote(v)}" for k, v in extra.items()]
        if record.exc_info:
            parts.append("error=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


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
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
