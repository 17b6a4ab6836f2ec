"""Settings (imagepipe.yml) and pool files (pools/*.yml): loaded, validated, turned into
plain values (Settings, PoolSpec).

Every error names the file, the line and the key path, and says what was expected:

    pools/lab.yml:7: sessions.recycle_after: expected a duration such as 90s, 1m, 2h,
    1h30m or 1d, got '1 minute'

All errors of a file are reported together (one ConfigError, one line each, first line
first); nothing is changed when a file is bad.
"""

from __future__ import annotations

import difflib
import os
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import ErrorDetails

from imagepipe.errors import ConfigError
from imagepipe.pool.model import CloneMode, LearnSpec, OnLogoff, PoolSpec, ScheduleRule, Standby
from imagepipe.units import format_size, parse_duration, parse_size
from imagepipe.yamlsrc import KeyPath, Located, format_path, load_file

SYSTEM_SETTINGS = Path("/etc/imagepipe/imagepipe.yml")
SETTINGS_NAME = "imagepipe.yml"
MIN_MEMORY = 32 * 1024**2

# --------------------------------------------------------------------------------------
# Value parsers: each raises ValueError with what was expected
# --------------------------------------------------------------------------------------


def _duration(value: object) -> float:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return parse_duration(value)
    raise ValueError(f"expected a duration such as 90s, 1m, 2h or 1h30m, got {value!r}")


def _optional_duration(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _duration(value)


def _size(value: object) -> int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return parse_size(value)
    raise ValueError(f"expected a size such as 512M or 4G, got {value!r}")


_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def _pool_name(value: object) -> str:
    if isinstance(value, str) and _NAME.match(value) and not value.endswith("-"):
        return value
    raise ValueError(
        "expected a name of up to 32 lowercase letters, digits and '-', starting with a "
        f"letter (it names the desktops: lab-0, lab-1, ...), got {value!r}"
    )


_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _word(what: str) -> Any:
    def check(value: object) -> str:
        if isinstance(value, str) and _WORD.match(value):
            return value
        raise ValueError(f"expected {what} (letters, digits, '.', '_', '-'), got {value!r}")

    return check


def _optional_channel(value: object) -> str | None:
    return None if value is None else str(_word("a channel name such as latest or stable")(value))


def _optional_vip(value: object) -> str | None:
    return None if value is None else str(_word("an IP address such as 10.0.0.10")(value))


def _optional_path(value: object) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise ValueError(f"expected a path, got {value!r}")


def _optional_version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"v?\d+", value.strip()):
        value = int(value.strip().lstrip("v"))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected a version number such as 3 or v3, got {value!r}")


def _port_range(value: object) -> tuple[int, int]:
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


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_GROUPS = {
    "daily": range(7),
    "everyday": range(7),
    "all": range(7),
    "weekdays": range(5),
    "weekends": range(5, 7),
}


def _day(text: str) -> int:
    word = text.strip().lower()
    if word in _DAYS:
        return _DAYS.index(word)
    if word in _FULL_DAYS:
        return _FULL_DAYS.index(word)
    raise KeyError(word)


def _days(value: object) -> frozenset[int]:
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
                    start, end = (_day(w) for w in word.split("-", 1))
                    span = (end - start) % 7 + 1  # fri-mon wraps over the weekend
                    days.update((start + i) % 7 for i in range(span))
                else:
                    days.add(_day(word))
            except (KeyError, ValueError):
                raise ValueError(expected) from None
    return frozenset(days)


def _time_of_day(value: object) -> int:
    text = value.strip() if isinstance(value, str) else ""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    raise ValueError(f'expected a time of day such as "07:00" or "18:30", got {value!r}')


def _timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; expected an IANA name such as Europe/Berlin or UTC"
        ) from None
    return value


def _host_port(value: object) -> str:
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return value
    raise ValueError(f"expected an address such as 127.0.0.1:5999, got {value!r}")


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
OptionalDuration = Annotated[float | None, BeforeValidator(_optional_duration)]
Size = Annotated[int, BeforeValidator(_size)]
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
TimeOfDay = Annotated[int, BeforeValidator(_time_of_day)]

# --------------------------------------------------------------------------------------
# Settings (imagepipe.yml)
# --------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HypervisorSettings(_Section):
    driver: Literal["libvirt", "virtualbox"] = "libvirt"
    uri: StrictStr = "qemu:///system"


class BalancerSettings(_Section):
    driver: Literal["haproxy", "ipvs", "none"] = "haproxy"
    bind: Annotated[str, BeforeValidator(_host_port)] = "127.0.0.1:5999"
    # None: load_settings fills in run_dir/haproxy.sock
    admin_socket: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    manage: StrictBool = True
    balance: Literal["leastconn", "first"] = "leastconn"
    vip: Annotated[str | None, BeforeValidator(lambda v: _ipvs_vip(v))] = None
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 3389
    # ipvs (README "IPVS"): how the kernel picks, reaches and keeps a user's desktop
    scheduler: Literal[
        "wlc", "lc", "rr", "wrr", "sed", "nq", "sh", "dh", "lblc", "lblcr", "fo", "ovf", "mh"
    ] = "wlc"  # fmt: skip
    forward: Literal["masq", "droute"] = "masq"  # NAT, or direct routing on the same L2
    persistence: Annotated[Duration, Field(le=31 * 86400)] = 0.0  # ipvsadm -p; 0 = off
    ipvs_names_file: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    ipvs_sysctls: StrictBool = True  # set net.ipv4.vs.expire_nodest_conn / _quiescent_template


def _ipvs_vip(value: object) -> str | None:
    """balancer.vip is an IPv4 or IPv6 address (replaces _optional_vip, which refused IPv6)."""
    import ipaddress

    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(str(value).strip("[]")))
    except ValueError:
        raise ValueError(f"expected an IP address such as 10.0.0.10, got {value!r}") from None


class KeeperSettings(_Section):
    tick: PositiveDuration = 5.0
    parallel: Positive = 4
    action_timeout: PositiveDuration = 600.0


def _default_pools_dir() -> Path:
    local = Path.cwd() / "pools"
    return local if local.is_dir() else Path("/etc/imagepipe/pools")


class Settings(_Section):
    """Global settings; every field has a default, so no file is needed."""

    pools_dir: Path = Field(default_factory=_default_pools_dir)
    packer_dir: Path = Field(default_factory=lambda: Path.cwd() / "packer")
    state_db: Path = Path("/var/lib/imagepipe/state.db")
    registry: Path = Path("/var/lib/imagepipe/registry")
    image_store: Path = Path("/var/lib/imagepipe/images")
    run_dir: Path = Path("/run/imagepipe")
    hypervisor: HypervisorSettings = HypervisorSettings()
    balancer: BalancerSettings = BalancerSettings()
    keeper: KeeperSettings = KeeperSettings()
    source: str = "defaults"

    @property
    def admin_socket_path(self) -> Path:
        """HAProxy's admin socket: balancer.admin_socket, else run_dir/haproxy.sock."""
        return self.balancer.admin_socket or self.run_dir / "haproxy.sock"


_PATH_FIELDS = ("pools_dir", "packer_dir", "state_db", "registry", "image_store", "run_dir")


def find_settings_file(
    explicit: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    system: Path | None = None,
) -> Path | None:
    """--config, $IMAGEPIPE_CONFIG, ./imagepipe.yml, /etc/imagepipe/imagepipe.yml; None = defaults.

    A file named explicitly (option or variable) must exist.
    """
    environ = os.environ if env is None else env
    for given, how in (
        (explicit, "--config"),
        (environ.get("IMAGEPIPE_CONFIG"), "IMAGEPIPE_CONFIG"),
    ):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise ConfigError(f"settings file given by {how} does not exist", file=str(path))
            return path
    for candidate in ((cwd or Path.cwd()) / SETTINGS_NAME, system or SYSTEM_SETTINGS):
        if candidate.is_file():
            return candidate
    return None


def load_settings(explicit: Path | None = None) -> Settings:
    """The settings from the first file found (see find_settings_file), else the defaults."""
    path = find_settings_file(explicit)
    if path is None:
        settings = Settings()
    else:
        settings = parse_settings(load_file(path), base=path.resolve().parent)
    if settings.balancer.admin_socket is None:
        balancer = settings.balancer.model_copy(update={"admin_socket": settings.admin_socket_path})
        settings = settings.model_copy(update={"balancer": balancer})
    return settings


def parse_settings(doc: Located, *, base: Path) -> Settings:
    """Validate a parsed settings file; relative paths are taken from `base`."""
    issues: list[Issue] = []
    raw = _mapping(doc, issues)
    if isinstance(raw, dict) and "source" in raw:
        issues.append(_unknown_key(doc, ("source",), Settings))
        raw = {k: v for k, v in raw.items() if k != "source"}
    settings = _validate(Settings, raw, doc, issues)
    if settings is not None:
        balancer = settings.balancer
        if balancer.driver == "ipvs" and balancer.vip is None:
            issues.append(
                _issue(
                    doc,
                    ("balancer", "driver"),
                    "the ipvs balancer needs balancer.vip (the virtual address users connect to)",
                )
            )
    _raise_if(issues)
    assert settings is not None
    update: dict[str, Any] = {"source": doc.file}
    for name in _PATH_FIELDS:
        update[name] = _resolve(getattr(settings, name), base)
    if settings.balancer.admin_socket is not None:
        socket = _resolve(settings.balancer.admin_socket, base)
        update["balancer"] = settings.balancer.model_copy(update={"admin_socket": socket})
    return settings.model_copy(update=update)


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


# --------------------------------------------------------------------------------------
# Pool files (pools/*.yml)
# --------------------------------------------------------------------------------------


class _SizeSection(_Section):
    initial: Count = 1
    free: Count = 1
    max: Positive = 5


class _MachineSection(_Section):
    cpus: Annotated[StrictInt, Field(ge=1, le=256)] = 1
    memory: Size = 256 * 1024**2


class _DisplaySection(_Section):
    port_range: Annotated[tuple[int, int], BeforeValidator(_port_range)] = (5900, 5999)
    address: Annotated[str, BeforeValidator(_word("an address such as 127.0.0.1"))] = "127.0.0.1"


class _SessionsSection(_Section):
    on_logoff: OnLogoff = OnLogoff.RESET
    recycle_after: Duration = 60.0
    disconnect_timeout: Duration = 8 * 3600.0


class _IdleSection(_Section):
    shrink_after: Duration = 2 * 3600.0
    standby: Standby = Standby.NONE


class _ScheduleRule(_Section):
    days: Annotated[frozenset[int], BeforeValidator(_days)]
    from_: TimeOfDay = Field(alias="from")
    to: TimeOfDay
    free: Count


class _FailuresSection(_Section):
    max: Positive = 5
    backoff: Duration = 10.0
    cooldown: Duration = 600.0


class _RolloutSection(_Section):
    drain_deadline: OptionalDuration = None


class _LearnSection(_Section):
    """Learned warm-up: free desktops for the logins expected soon, learned by time of week."""

    enabled: StrictBool = False
    lead: Annotated[float, BeforeValidator(_duration), Field(gt=0, le=86400)] = 600.0
    shrink_after: Duration = 300.0
    min_free: Count | None = None

    def spec(self) -> LearnSpec | None:
        if not self.enabled:
            return None
        return LearnSpec(lead=self.lead, shrink_after=self.shrink_after, min_free=self.min_free)


class PoolFile(_Section):
    """A pool file as written; pool_spec() turns it into the planner's PoolSpec."""

    name: Annotated[str, BeforeValidator(_pool_name)]
    image: Annotated[str, BeforeValidator(_word("an image name such as win10 or tiny"))]
    channel: Annotated[str | None, BeforeValidator(_optional_channel)] = None
    version: Annotated[int | None, BeforeValidator(_optional_version)] = None
    clone: CloneMode = CloneMode.LINKED
    size: _SizeSection = _SizeSection()
    machine: _MachineSection = _MachineSection()
    display: _DisplaySection = _DisplaySection()
    sessions: _SessionsSection = _SessionsSection()
    idle: _IdleSection = _IdleSection()
    schedule: list[_ScheduleRule] = []
    learn: _LearnSection = _LearnSection()
    timezone: Annotated[StrictStr, AfterValidator(_timezone)] = "UTC"
    assignments: dict[str, StrictInt] = {}
    failures: _FailuresSection = _FailuresSection()
    boot_timeout: PositiveDuration = 300.0
    rollout: _RolloutSection = _RolloutSection()

    def pool_spec(self, source: str) -> PoolSpec:
        return PoolSpec(
            name=self.name,
            image=self.image,
            channel=None if self.version is not None else (self.channel or "latest"),
            version=self.version,
            clone=self.clone,
            initial=self.size.initial,
            free=self.size.free,
            max=self.size.max,
            cpus=self.machine.cpus,
            memory=self.machine.memory,
            port_first=self.display.port_range[0],
            port_last=self.display.port_range[1],
            display_address=self.display.address,
            on_logoff=self.sessions.on_logoff,
            recycle_after=self.sessions.recycle_after,
            disconnect_timeout=self.sessions.disconnect_timeout,
            shrink_after=self.idle.shrink_after,
            standby=self.idle.standby,
            schedule=tuple(
                ScheduleRule(days=r.days, start_minute=r.from_, end_minute=r.to, free=r.free)
                for r in self.schedule
            ),
            learn=self.learn.spec(),
            timezone=self.timezone,
            assignments=dict(self.assignments),
            boot_timeout=self.boot_timeout,
            max_failures=self.failures.max,
            retry_backoff=self.failures.backoff,
            breaker_cooldown=self.failures.cooldown,
            drain_deadline=self.rollout.drain_deadline,
            source=source,
        )


@dataclass(frozen=True)
class _LoadedPool:
    spec: PoolSpec
    doc: Located


def load_pool_file(path: Path) -> PoolSpec:
    """One pool file, validated on its own."""
    loaded, issues = _load_pool(path)
    _raise_if(issues)
    assert loaded is not None
    return loaded.spec


def load_pools(paths: Sequence[Path]) -> list[PoolSpec]:
    """Pool files and directories of *.yml / *.yaml, validated alone and together
    (unique names, no shared ports). All errors of all files are reported at once."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yml", ".yaml"))
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError("no such pool file or directory", file=str(path))
    issues: list[Issue] = []
    loaded: list[_LoadedPool] = []
    for file in files:
        pool, file_issues = _load_pool(file)
        issues += file_issues
        if pool is not None:
            loaded.append(pool)
    issues += _cross_pool_issues(loaded)
    _raise_if(issues)
    return [p.spec for p in loaded]


def _load_pool(path: Path) -> tuple[_LoadedPool | None, list[Issue]]:
    try:
        doc = load_file(path)
    except ConfigError as exc:
        return None, [Issue(exc.file or str(path), exc.line or 1, exc.key or "", exc.detail)]
    issues: list[Issue] = []
    pool = _validate(PoolFile, _mapping(doc, issues), doc, issues)
    if pool is None:
        return None, issues
    issues += _pool_issues(pool, doc)
    if issues:
        return None, issues
    return _LoadedPool(pool.pool_spec(doc.file), doc), []


def _pool_issues(pool: PoolFile, doc: Located) -> list[Issue]:
    """Checks that need several keys of one pool."""
    issues: list[Issue] = []

    def add(path: KeyPath, message: str) -> None:
        issues.append(_issue(doc, path, message))

    if pool.channel is not None and pool.version is not None:
        add(("version",), "give either channel or version, not both")
    size = pool.size
    if size.initial > size.max:
        add(("size", "initial"), f"initial {size.initial} is more than size.max {size.max}")
    if size.free > size.max:
        add(("size", "free"), f"free {size.free} is more than size.max {size.max}")
    first, last = pool.display.port_range
    room = last - first + 1
    if size.max > room:
        add(
            ("size", "max"),
            f"max {size.max} does not fit display.port_range {first}-{last}, which has room "
            f"for {room} desktops; widen the port range or lower size.max",
        )
    if pool.machine.memory < MIN_MEMORY:
        add(
            ("machine", "memory"),
            f"{pool.machine.memory} bytes is too little memory (at least "
            f"{format_size(MIN_MEMORY)}); write units, e.g. 512M or 4G",
        )
    for index, rule in enumerate(pool.schedule):
        if rule.from_ >= rule.to:
            add(
                ("schedule", index, "to"),
                "must be later than 'from' (split a rule that crosses midnight in two)",
            )
        if rule.free > size.max:
            add(("schedule", index, "free"), f"free {rule.free} is more than size.max {size.max}")
        for other in range(index):
            prior = pool.schedule[other]
            common = rule.days & prior.days
            if common and rule.from_ < prior.to and prior.from_ < rule.to:
                day = _DAYS[min(common)]
                add(("schedule", index), f"overlaps schedule[{other}] on {day}")
    if pool.learn.min_free is not None and pool.learn.min_free > size.free:
        add(
            ("learn", "min_free"),
            f"min_free {pool.learn.min_free} is more than size.free {size.free}: it only "
            "allows fewer free desktops in quiet hours",
        )
    owners: dict[int, str] = {}
    for user, slot in pool.assignments.items():
        if not 0 <= slot < size.max:
            add(
                ("assignments", user),
                f"slot {slot} is outside the pool: slots are 0 to {size.max - 1} (size.max "
                f"{size.max})",
            )
        elif slot in owners:
            add(("assignments", user), f"slot {slot} is already assigned to {owners[slot]!r}")
        else:
            owners[slot] = user
    return issues


def _cross_pool_issues(pools: Sequence[_LoadedPool]) -> list[Issue]:
    issues: list[Issue] = []
    for index, pool in enumerate(pools):
        spec = pool.spec
        for prior in pools[:index]:
            other = prior.spec
            where = f"{prior.doc.file}:{prior.doc.line_of(('name',))}"
            if spec.name == other.name:
                issues.append(
                    _issue(pool.doc, ("name",), f"pool {spec.name!r} is already defined in {where}")
                )
            elif spec.port_first <= other.port_last and other.port_first <= spec.port_last:
                issues.append(
                    _issue(
                        pool.doc,
                        ("display", "port_range"),
                        f"ports {spec.port_first}-{spec.port_last} overlap pool {other.name!r} "
                        f"({other.port_first}-{other.port_last}, {where}); give each pool "
                        "its own range",
                    )
                )
    return issues


# --------------------------------------------------------------------------------------
# Errors: pydantic's error locations -> file:line: key: what was expected
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One thing wrong in a file."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{key} {self.message}"


class ConfigIssues(ConfigError):
    """Several configuration errors at once; the message has one line per issue."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        first = issues[0]
        more = f" (and {len(issues) - 1} more below)" if len(issues) > 1 else ""
        rest = "".join(f"\n{issue}" for issue in issues[1:])
        super().__init__(
            first.message + more + rest, file=first.file, line=first.line, key=first.key or None
        )
        self.issues = tuple(issues)


def _raise_if(issues: Sequence[Issue]) -> None:
    if issues:
        raise ConfigIssues(sorted(issues, key=lambda i: (i.file, i.line)))


def _issue(doc: Located, path: KeyPath, message: str) -> Issue:
    return Issue(doc.file, doc.line_of(path), format_path(path), message)


def _mapping(doc: Located, issues: list[Issue]) -> dict[str, Any]:
    if doc.data is None:
        return {}
    if not isinstance(doc.data, dict):
        issues.append(_issue(doc, (), f"expected a mapping of keys, got {_show(doc.data)}"))
        return {}
    return doc.data


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], raw: dict[str, Any], doc: Located, issues: list[Issue]) -> M | None:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            issues.append(_translate(error, doc, model))
        return None


def _translate(error: ErrorDetails, doc: Located, model: type[BaseModel]) -> Issue:
    path: KeyPath = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx", {})
    if kind == "extra_forbidden":
        return _unknown_key(doc, path, model)
    if kind == "missing":
        return _issue(doc, path, "required key is missing")
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif kind in ("literal_error", "enum"):
        message = f"expected {ctx.get('expected')}, got {_show(value)}"
    elif kind.startswith("int_"):
        message = f"expected a whole number, got {_show(value)}"
    elif kind.startswith("bool_"):
        message = f"expected true or false, got {_show(value)}"
    elif kind.startswith("string_"):
        message = f"expected text, got {_show(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        message = f"expected a mapping of keys, got {_show(value)}"
    elif kind == "list_type":
        message = f"expected a list, got {_show(value)}"
    elif kind in ("path_type", "path_parsing"):
        message = f"expected a path, got {_show(value)}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        message = f"must be {bound[0]} {ctx.get(bound[1])}, got {_show(value)}"
    else:
        message = error["msg"]
    return _issue(doc, path, message)


def _unknown_key(doc: Located, path: KeyPath, model: type[BaseModel]) -> Issue:
    valid = _valid_keys(model, path[:-1])
    key = str(path[-1])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "valid keys here: " + ", ".join(valid)
    return _issue(doc, path, f"unknown key; {hint}")


def _valid_keys(model: type[BaseModel], parent: KeyPath) -> list[str]:
    current: Any = model
    for part in parent:
        if isinstance(part, int):
            continue
        fields = {(f.alias or name): f for name, f in current.model_fields.items()}
        annotation = fields[part].annotation if part in fields else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return [f.alias or name for name, f in current.model_fields.items() if name != "source"]


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)
