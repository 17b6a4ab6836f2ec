"""Login traces: who logs in when, and for how long.

CSV, one login per line: `user,login_time,session_length`. login_time is HH:MM, HH:MM:SS
or seconds after midnight; session_length is a duration ("45m", "1h30m", "3600").
A header line starting with `user` and lines starting with `#` are skipped.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from imagepipe.errors import ConfigError
from imagepipe.units import parse_duration

_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


@dataclass(frozen=True)
class Login:
    user: str
    at: float  # seconds after the simulated day's local midnight
    length: float  # session length in seconds


def parse_time_of_day(text: str) -> float:
    """Seconds after midnight from "08:30", "08:30:15" or "30600"."""
    text = text.strip()
    match = _CLOCK.match(text)
    if match:
        hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        if minutes > 59 or seconds > 59:
            raise ValueError(f"expected a time such as 08:30 or 08:30:15, got {text!r}")
        return float(hours * 3600 + minutes * 60 + seconds)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"expected a time such as 08:30, 08:30:15 or seconds after midnight, got {text!r}"
        ) from None
    if value < 0:
        raise ValueError(f"a login time cannot be negative, got {text!r}")
    return value


def parse_trace(text: str, source: str = "<trace>") -> list[Login]:
    """Logins sorted by time. ConfigError names file:line and the bad column."""
    logins: list[Login] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() == "user":
            continue
        if len(row) != 3:
            raise ConfigError(
                f"expected 3 columns (user,login_time,session_length), found {len(row)}",
                file=source,
                line=number,
            )
        user, at, length = (cell.strip() for cell in row)
        if not user:
            raise ConfigError("the user column is empty", file=source, line=number, key="user")
        try:
            start = parse_time_of_day(at)
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, line=number, key="login_time") from None
        try:
            duration = parse_duration(length)
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, line=number, key="session_length") from None
        logins.append(Login(user=user, at=start, length=duration))
    if not logins:
        raise ConfigError("the trace has no logins", file=source)
    return sorted(logins, key=lambda login: (login.at, login.user))


def load_trace(path: Path) -> list[Login]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the trace: {exc.strerror}", file=str(path)) from None
    return parse_trace(text, str(path))
