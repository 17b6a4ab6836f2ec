"""Human-readable durations ("90s", "1h30m", "1d") and sizes ("512M", "4G", binary).

Only ASCII digits; bounded so no value overflows, prints as inf, or ends in JSON as Infinity:
durations up to MAX_DURATION (10 years), sizes up to MAX_SIZE (1 PiB).
"""

from __future__ import annotations

import math
import re

MAX_DURATION = 10 * 365 * 86400
MAX_SIZE = 1024**5
_MAX_CHARS = 40  # "1w2d3h4m5s" is 10; anything much longer is not a duration or a size

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def _bounded_duration(seconds: float, value: object) -> float:
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"a duration of at most 10 years (3650d) is allowed, got {_shown(value)}")
    return seconds


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def parse_duration(value: str | int | float) -> float:
    """Seconds from "90s", "1m", "2h", "1h30m", "1d", or a plain number of seconds.

    Raises ValueError with what was expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 90s, 1m, 2h or 1h30m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {_shown(value)}")
        if isinstance(value, int) and value > MAX_DURATION:
            return _bounded_duration(math.inf, value)
        return _bounded_duration(float(value), value)
    text = str(value).strip().lower().replace(" ", "")
    if len(text) > _MAX_CHARS:
        raise ValueError(
            f"expected a duration such as 90s, 1m, 2h, 1h30m or 1d, got {_shown(value)}"
        )
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return _bounded_duration(float(text), value)
    pos = 0
    total = 0.0
    seen: set[str] = set()
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos or match.group(2) in seen:
            break
        seen.add(match.group(2))
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"expected a duration such as 90s, 1m, 2h, 1h30m or 1d, got {value!r}")
    return _bounded_duration(total, value)


def parse_size(value: str | int) -> int:
    """Bytes from "512M", "4G", "2M" (binary units), or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512M or 4G, got {value!r}")
    too_big = f"a size of at most 1024T is allowed, got {_shown(value)}"
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {_shown(value)}")
        if value > MAX_SIZE:
            raise ValueError(too_big)
        return value
    text = str(value).strip()
    match = _SIZE.fullmatch(text) if len(text) <= _MAX_CHARS else None
    if not match:
        raise ValueError(f"expected a size such as 512M, 4G or 2048 (bytes), got {_shown(value)}")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if not size <= MAX_SIZE:
        raise ValueError(too_big)
    return int(size)


def format_duration(seconds: float) -> str:
    """The shortest exact-enough form: 90 -> "1m30s", 7200 -> "2h", 0.5 -> "0.5s"."""
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    rest = round(seconds)
    if rest == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def format_size(size: int) -> str:
    """Binary units: 536870912 -> "512M", 1536 -> "1.5K"."""
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit]
        if size >= scale:
            value = size / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{size}B"
