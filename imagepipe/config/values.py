"""Value parsers for settings and pool files: durations, sizes, names, days, times, ports.

Each parser raises ValueError saying what was expected; pydantic turns that into an issue
at the key's line (see errors.py). The Annotated aliases at the bottom are the field types
the settings and pool models use.
"""

from __future__ import annotations

import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictInt

from imagepipe import units


def parse_duration(value: object) -> float:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return units.parse_duration(value)
    raise ValueError(f"expected a duration such as 90s, 1m, 2h or 1h30m, got {value!r}")


def parse_optional_duration(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return parse_duration(value)


def parse_size(value: object) -> int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return units.parse_size(value)
    raise ValueError(f"expected a size such as 512M or 4G, got {value!r}")


_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def parse_pool_name(value: object) -> str:
    if isinstance(value, str) and _NAME.match(value) and not value.endswith("-"):
        return value
    raise ValueError(
        "expected a name of up to 32 lowercase letters, digits and '-', starting with a "
        f"letter (it names the desktops: lab-0, lab-1, ...), got {value!r}"
    )


_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_word(what: str) -> Any:
    def check(value: object) -> str:
        if isinstance(value, str) and _WORD.match(value):
            return value
        raise ValueError(f"expected {what} (letters, digits, '.', '_', '-'), got {value!r}")

    return check


def parse_optional_channel(value: object) -> str | None:
    return (
        None if value is None else str(parse_word("a channel name such as latest or stable")(value))
    )


def parse_optional_vip(value: object) -> str | None:
    return None if value is None else str(parse_word("an IP address such as 10.0.0.10")(value))


def parse_optional_path(value: object) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise ValueError(f"expected a path, got {value!r}")


def parse_optional_version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"v?\d+", value.strip()):
        value = int(value.strip().lstrip("v"))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected a version number such as 3 or v3, got {value!r}")


def parse_port_range(value: object) -> tuple[int, int]:
    expected = f"expected a port range such as 5900-5999, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)):
        first, last = int(m.group(1)), int(m.group(2))
    else:
        raise ValueError(expected)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"ports must be between 1 and 65535, got {value!r}")
    if first > last:
        raise ValueError(f"the first port must not be above the last, got {value!r}")
    return first, last


DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_GROUPS = {
    "daily": range(7),
    "everyday": range(7),
    "all": range(7),
    "weekdays": range(5),
    "weekends": range(5, 7),
}


def parse_day(text: str) -> int:
    word = text.strip().lower()
    if word in DAY_NAMES:
        return DAY_NAMES.index(word)
    if word in FULL_DAY_NAMES:
        return FULL_DAY_NAMES.index(word)
    raise KeyError(word)


def parse_days(value: object) -> frozenset[int]:
    expected = f"expected days such as mon-fri, sat,sun, weekdays or daily, got {value!r}"
    items: list[object] = value if isinstance(value, list) else [value]
    days: set[int] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(expected)
        for part in item.split(","):
            word = part.strip().lower()
            try:
                if word in _DAY_GROUPS:
                    days.update(_DAY_GROUPS[word])
                elif "-" in word:
                    start, end = (parse_day(w) for w in word.split("-", 1))
                    span = (end - start) % 7 + 1  # fri-mon wraps over the weekend
                    days.update((start + i) % 7 for i in range(span))
                else:
                    days.add(parse_day(word))
            except (KeyError, ValueError):
                raise ValueError(expected) from None
    return frozenset(days)


def parse_time_of_day(value: object) -> int:
    text = value.strip() if isinstance(value, str) else ""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    raise ValueError(f'expected a time of day such as "07:00" or "18:30", got {value!r}')


def parse_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; expected an IANA name such as Europe/Berlin or UTC"
        ) from None
    return value


def parse_host_port(value: object) -> str:
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return value
    raise ValueError(f"expected an address such as 127.0.0.1:5999, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
OptionalDuration = Annotated[float | None, BeforeValidator(parse_optional_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
TimeOfDay = Annotated[int, BeforeValidator(parse_time_of_day)]
