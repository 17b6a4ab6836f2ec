"""Login traces: who logs in when, and for how long.

CSV, one login per line: `user,login_time,session_length`. login_time is HH:MM, HH:MM:SS
or seconds after midnight (within the day); session_length is a duration ("45m", "1h30m",
"3600") of at most a day. A header line starting with `user` and lines starting with `#` are
skipped. The file is read with the configuration limits (at most 1 MiB of UTF-8 text, no
control characters); a user name is at most 256 characters.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from imagepipe.errors import ConfigError
from imagepipe.units import parse_duration
from imagepipe.yamlsrc import read_text

_CLOCK = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?")
_SECONDS = re.compile(r"[0-9]{1,5}(?:\.[0-9]{1,6})?")
DAY = 86400.0
MAX_USER = 256


@dataclass(frozen=True)
class Login:
    user: str
    at: float  # seconds after the simulated day's local midnight
    length: float  # session length in seconds


def parse_time_of_day(text: str) -> float:
    """Seconds after midnight from "08:30", "08:30:15" or "30600"."""
    text = text.strip()
    shown = repr(text) if len(text) <= 40 else f"{text[:30]!r}…"
    match = _CLOCK.fullmatch(text)
    if match:
        hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        if hours > 23 or minutes > 59 or seconds > 59:
            raise ValueError(f"expected a time such as 08:30 or 08:30:15, got {shown}")
        return float(hours * 3600 + minutes * 60 + seconds)
    if text.startswith("-"):
        raise ValueError(f"a login time cannot be negative, got {shown}")
    if not _SECONDS.fullmatch(text):
        raise ValueError(
            f"expected a time such as 08:30, 08:30:15 or seconds after midnight, got {shown}"
        )
    value = float(text)
    if value >= DAY:
        raise ValueError(f"a login time is within the day (below 86400 seconds), got {shown}")
    return value


def parse_trace(text: str, source: str = "<trace>") -> list[Login]:
    """Logins sorted by time. ConfigError names file:line and the bad column."""
    logins: list[Login] = []
    try:
        rows = list(enumerate(csv.reader(text.splitlines()), start=1))
    except csv.Error as exc:
        raise ConfigError(f"not a CSV file: {exc}", file=source) from None
    for number, row in rows:
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
        if len(user) > MAX_USER:
            raise ConfigError(
                f"a user name of at most {MAX_USER} characters, got {len(user)}",
                file=source,
                line=number,
                key="user",
            )
        try:
            start = parse_time_of_day(at)
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, line=number, key="login_time") from None
        try:
            duration = parse_duration(length)
            if duration > DAY:
                raise ValueError(f"a session of at most a day (24h), got {length[:40]!r}")
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, line=number, key="session_length") from None
        logins.append(Login(user=user, at=start, length=duration))
    if not logins:
        raise ConfigError("the trace has no logins", file=source)
    return sorted(logins, key=lambda login: (login.at, login.user))


def load_trace(path: Path) -> list[Login]:
    return parse_trace(read_text(path), str(path))
