"""Human-readable durations ("90s", "1h30m", "1d") and sizes ("512M", "4G", binary)."""

from __future__ import annotations

import re

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)


def parse_duration(value: str | int | float) -> float:
    """Seconds from "90s", "1m", "2h", "1h30m", "1d", or a plain number of seconds.

    Raises ValueError with what was expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 90s, 1m, 2h or 1h30m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
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
    return total


def parse_size(value: str | int) -> int:
    """Bytes from "512M", "4G", "2M" (binary units), or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512M or 4G, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"expected a size such as 512M, 4G or 2048 (bytes), got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


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
