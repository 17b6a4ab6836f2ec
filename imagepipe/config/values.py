"""Value parsers for settings and pool files: durations, sizes, names, days, times, ports.

Each parser raises ValueError saying what was expected; imagepipe.schema turns that into an
issue at the key's line (see errors.py). The readers at the bottom add the bounds the
settings and pool sections share.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from pathlib import Path
from typing import Any

from imagepipe import names, schema, units


def parse_duration(value: object) -> float:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return units.parse_duration(value)
    raise ValueError(f"expected a duration such as 90s, 1m, 2h or 1h30m, got {shown(value)}")


def parse_optional_duration(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return parse_duration(value)


def parse_size(value: object) -> int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return units.parse_size(value)
    raise ValueError(f"expected a size such as 512M or 4G, got {shown(value)}")


# Every name and number below is ASCII: they end up in libvirt domain names, HAProxy's
# configuration, the kernel's IPVS table, folder names and git tags. `re.ASCII` keeps `\d`
# and `\w` from matching other scripts' digits and letters.

_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_URI = re.compile(r"[\x21-\x7e]{1,1024}")
_ZONE = re.compile(r"[A-Za-z0-9_+-]{1,64}(?:/[A-Za-z0-9_+-]{1,64}){0,3}")
MAX_PATH = 4096
MAX_TEXT = 1024


def parse_pool_name(value: object) -> str:
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    raise ValueError(
        "expected a name of up to 32 lowercase letters, digits and '-', starting with a "
        f"letter (it names the desktops: lab-0, lab-1, ...), got {shown(value)}"
    )


def parse_word(what: str) -> Any:
    def check(value: object) -> str:
        if isinstance(value, str) and _WORD.fullmatch(value):
            return value
        raise ValueError(f"expected {what} (letters, digits, '.', '_', '-'), got {shown(value)}")

    return check


def parse_image_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an image name such as win10 or tiny, got {shown(value)}")
    error = names.image_error(value)
    if error is not None:
        raise ValueError(f"{error}; registered image names are lowercase")
    return value


def parse_optional_channel(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a channel name such as latest or stable, got {shown(value)}")
    error = names.channel_error(value)
    if error is not None:
        raise ValueError(error)
    return value


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `text` spells, or None when it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_ip_address(value: object) -> str:
    """An IPv4 or IPv6 address (`[fd00::10]` too), ASCII, in its normal form."""
    if isinstance(value, str) and value.isascii() and (ip := _ip(value.strip("[]"))) is not None:
        return str(ip)
    raise ValueError(f"expected an IP address such as 10.0.0.10 or fd00::10, got {shown(value)}")


def parse_optional_vip(value: object) -> str | None:
    return None if value is None else parse_ip_address(value)


def parse_listen_address(value: object) -> str:
    """An IP address or an ASCII host name (QEMU resolves it when the desktop starts)."""
    if (
        isinstance(value, str)
        and value.isascii()
        and (_HOSTNAME.fullmatch(value) or _ip(value) is not None)
    ):
        return value
    raise ValueError(f"expected an address such as 127.0.0.1 or ::1, got {shown(value)}")


def parse_uri(value: object) -> str:
    if isinstance(value, str) and _URI.fullmatch(value):
        return value
    raise ValueError(
        "expected a libvirt URI such as qemu:///system (ASCII, no spaces, at most 1024 "
        f"characters), got {shown(value)}"
    )


_LIBVIRT_URI = re.compile(
    r"(?P<driver>[a-z][a-z0-9]*)(?:\+(?P<transport>tls|ssh|libssh|libssh2|tcp|unix|ext))?"
    r"://(?P<server>[^/\s]*)/(?P<path>[^?\s]+)(?:\?\S*)?",
    re.ASCII,
)


def parse_libvirt_uri(value: object) -> str:
    """A libvirt connection URI: driver[+transport]://[user@][host[:port]]/path[?params]."""
    if isinstance(value, str) and _URI.fullmatch(value) and _LIBVIRT_URI.fullmatch(value):
        return value
    raise ValueError(
        "expected a libvirt URI such as qemu+tls://host1.example.org/system, "
        f"qemu+ssh://root@host1/system or qemu:///system, got {shown(value)}"
    )


def parse_host_selector(value: object) -> str:
    """A pool's host: a host's name, or `label:NAME` for every host with that label."""
    if isinstance(value, str):
        label = value.removeprefix("label:")
        if _NAME.fullmatch(label):
            return value
    raise ValueError(
        f"expected a host name (lab1) or a label (label:gpu) from the settings' hosts, got "
        f"{shown(value)}"
    )


def parse_size_with_unit(value: object) -> int:
    """A size that names its unit ("64G", "512M"): a bare number is refused, as it is too
    easily meant in another unit."""
    if isinstance(value, str) and not value.strip().isdigit():
        return parse_size(value)
    raise ValueError(f"expected a size with its unit such as 64G or 512M, got {shown(value)}")


def parse_path(value: object) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, got {shown(value)}")
    if value.startswith("~"):
        try:
            value = os.path.expanduser(value)
        except RuntimeError:
            raise ValueError(f"the home folder in this path is unknown: {shown(value)}") from None
    encoded = value.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH or any(len(part) > 255 for part in encoded.split(b"/")):
        raise ValueError(
            f"the path is too long (at most {MAX_PATH} bytes, 255 per name), got {shown(value)}"
        )
    return Path(value)


def parse_optional_path(value: object) -> Path | None:
    return None if value is None else parse_path(value)


def parse_optional_version(value: object) -> int | None:
    if value is None:
        return None
    expected = f"expected a version number such as 3 or v3, got {shown(value)}"
    if isinstance(value, str):
        try:
            number = names.version_number(value.strip())
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if number is None:
            raise ValueError(expected)
        value = number
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 10**9:
        return value
    raise ValueError(expected)


def parse_port_range(value: object) -> tuple[int, int]:
    expected = f"expected a port range such as 5900-5999, got {shown(value)}"
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and (
        m := re.fullmatch(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*", value, re.ASCII)
    ):
        first, last = int(m.group(1)), int(m.group(2))
    else:
        raise ValueError(expected)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"ports must be between 1 and 65535, got {shown(value)}")
    if first > last:
        raise ValueError(f"the first port must not be above the last, got {shown(value)}")
    return first, last


def shown(value: object) -> str:
    """A value for a one-line message: as schema.show, but null is written None."""
    return "None" if value is None else schema.show(value)


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
    expected = f"expected days such as mon-fri, sat,sun, weekdays or daily, got {shown(value)}"
    if value == []:
        raise ValueError("days is empty, so the rule would never apply; give days such as mon-fri")
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
    match = re.fullmatch(r"([0-9]{1,2}):([0-9]{2})", text)
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    raise ValueError(f'expected a time of day such as "07:00" or "18:30", got {shown(value)}')


def parse_timezone(value: str) -> str:
    unknown = (
        f"unknown time zone {shown(value)}; expected an IANA name such as Europe/Berlin or UTC"
    )
    if not _ZONE.fullmatch(value):
        raise ValueError(unknown)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(unknown) from None
    return value


def parse_state_dsn(value: object) -> str | None:
    """`state:` a PostgreSQL URL such as postgresql://imagepipe@db.example:5432/imagepipe: a
    user, a host and a database; without a password (that is in state_password_file or
    libpq's PGPASSWORD / passfile), so neither the settings file nor a message shows it."""
    from urllib.parse import SplitResult, urlsplit

    if value is None:
        return None
    expected = "expected a URL such as postgresql://imagepipe@db.example:5432/imagepipe"
    if not isinstance(value, str) or not value.isascii() or re.search(r"\s", value):
        raise ValueError(f"{expected}, got {shown(value)}")
    try:
        url: SplitResult | None = urlsplit(value)
        port = url.port if url else None
    except ValueError:
        url, port = None, None
    if url is not None and url.password is not None:
        hidden = value.replace(f":{url.password}@", ":***@", 1)
        raise ValueError(
            f"the URL has a password ({hidden}); put the password in the file named by "
            "state_password_file, or in PGPASSWORD or ~/.pgpass, never in the settings"
        )
    if (
        url is None
        or url.scheme not in ("postgresql", "postgres")
        or not url.hostname
        or not url.username
        or not url.path.strip("/")
        or port == 0
    ):
        raise ValueError(f"{expected} (a user, a host and a database), got {shown(value)}")
    return value


def parse_git_remote(value: object) -> str | None:
    """`registry_remote:` a git URL (ssh://host/path.git, git@host:path.git, file:///path,
    https://host/path.git) or an absolute path of a bare repository. Never a password: git
    over ssh uses the user's ssh configuration, https a git credential helper."""
    from urllib.parse import urlsplit

    if value is None:
        return None
    expected = "expected a git URL such as ssh://git.example/srv/registry.git or a bare path"
    if not isinstance(value, str) or not value.isascii() or not value or re.search(r"\s", value):
        raise ValueError(f"{expected}, got {shown(value)}")
    if value.startswith("-"):
        raise ValueError(f"{expected}, got {shown(value)} (git would read it as an option)")
    if "://" in value:
        try:
            url = urlsplit(value)
            password = url.password
        except ValueError:
            raise ValueError(f"{expected}, got {shown(value)}") from None
        if url.scheme not in ("ssh", "git", "http", "https", "file"):
            raise ValueError(
                f"{expected}; git transport {url.scheme!r} is not one of ssh, git, "
                "http, https, file"
            )
        if password is not None:
            raise ValueError(
                "the URL has a password: use ssh keys (the user's ssh configuration) or a git "
                "credential helper for https, never a password in the settings"
            )
        return value
    if value.startswith("/") or re.fullmatch(r"[\w.-]+@[\w.-]+:.+", value):
        return value
    raise ValueError(f"{expected}, got {shown(value)} (a path must be absolute)")


def parse_host_port(value: object) -> str:
    """ "127.0.0.1:5999" or "[::1]:5999": an IP address and a port, ASCII only (HAProxy and
    the kernel read it)."""
    if isinstance(value, str) and value.isascii():
        host, _, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535 and _ip(host) is not None:
            return value
    raise ValueError(
        f'expected an IP address and port such as 127.0.0.1:5999 or "[::1]:5999", '
        f"got {shown(value)}"
    )


duration = schema.bounded(parse_duration, ge=0)
positive_duration = schema.bounded(parse_duration, gt=0)
size_with_unit = schema.bounded(parse_size_with_unit, gt=0)
count = schema.whole(ge=0)
positive = schema.whole(ge=1)
