"""Pool files (pools/*.yml): one pool each, checked alone and against each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagepipe.config.errors import Issue, issue_at, raise_if, top_mapping, validate
from imagepipe.config.values import (
    DAY_NAMES,
    count,
    duration,
    parse_days,
    parse_host_selector,
    parse_image_name,
    parse_listen_address,
    parse_optional_channel,
    parse_optional_duration,
    parse_optional_version,
    parse_pool_name,
    parse_port_range,
    parse_size,
    parse_time_of_day,
    parse_timezone,
    positive,
    positive_duration,
)
from imagepipe.errors import ConfigError
from imagepipe.pool.model import (
    CloneMode,
    HostSpec,
    LearnSpec,
    OnLogoff,
    PoolSpec,
    ScheduleRule,
    Standby,
    StartMode,
)
from imagepipe.schema import (
    Section,
    bounded,
    flag,
    key,
    list_of,
    mapping_of,
    member,
    optional,
    section,
    text,
    whole,
)
from imagepipe.units import format_size
from imagepipe.yamlsrc import KeyPath, Located, load_file, path_kind

MIN_MEMORY = 32 * 1024**2


class _SizeSection(Section):
    initial: int = key(count, default=1)
    free: int = key(count, default=1)
    max: int = key(positive, default=5)


class _MachineSection(Section):
    cpus: int = key(whole(ge=1, le=256), default=1)
    memory: int = key(parse_size, default=256 * 1024**2)


class _DisplaySection(Section):
    port_range: tuple[int, int] = key(parse_port_range, default=(5900, 5999))
    address: str = key(parse_listen_address, default="127.0.0.1")


class _SessionsSection(Section):
    on_logoff: OnLogoff = key(member(OnLogoff), default=OnLogoff.RESET)
    recycle_after: float = key(duration, default=60.0)
    disconnect_timeout: float = key(duration, default=8 * 3600.0)


class _IdleSection(Section):
    shrink_after: float = key(duration, default=2 * 3600.0)
    standby: Standby = key(member(Standby), default=Standby.NONE)


class _ScheduleRule(Section):
    days: frozenset[int] = key(parse_days)
    from_: int = key(parse_time_of_day, name="from")
    to: int = key(parse_time_of_day)
    free: int = key(count)


class _FailuresSection(Section):
    max: int = key(positive, default=5)
    backoff: float = key(duration, default=10.0)
    cooldown: float = key(duration, default=600.0)


class _RolloutSection(Section):
    drain_deadline: float | None = key(parse_optional_duration, default=None)


class _LearnSection(Section):
    """Learned warm-up: free desktops for the logins expected soon, learned by time of week.
    On unless the pool file says `enabled: false`: it only adds free desktops within `max`
    and never keeps fewer than `size.free` (unless `min_free` allows it)."""

    enabled: bool = key(flag, default=True)
    lead: float = key(bounded(positive_duration, le=86400), default=600.0)
    shrink_after: float = key(duration, default=300.0)
    min_free: int | None = key(optional(count), default=None)

    def spec(self) -> LearnSpec | None:
        if not self.enabled:
            return None
        return LearnSpec(lead=self.lead, shrink_after=self.shrink_after, min_free=self.min_free)


def _timezone(value: object) -> str:
    return parse_timezone(text(value))


class PoolFile(Section):
    """A pool file as written; pool_spec() turns it into the planner's PoolSpec."""

    name: str = key(parse_pool_name)
    image: str = key(parse_image_name)
    channel: str | None = key(parse_optional_channel, default=None)
    version: int | None = key(parse_optional_version, default=None)
    clone: CloneMode = key(member(CloneMode), default=CloneMode.LINKED)
    start: StartMode = key(member(StartMode), default=StartMode.RESTORE)
    size: _SizeSection = key(section(_SizeSection), default=_SizeSection())
    machine: _MachineSection = key(section(_MachineSection), default=_MachineSection())
    display: _DisplaySection = key(section(_DisplaySection), default=_DisplaySection())
    sessions: _SessionsSection = key(section(_SessionsSection), default=_SessionsSection())
    idle: _IdleSection = key(section(_IdleSection), default=_IdleSection())
    schedule: list[_ScheduleRule] = key(list_of(section(_ScheduleRule)), default_factory=list)
    learn: _LearnSection = key(section(_LearnSection), default=_LearnSection())
    timezone: str = key(_timezone, default="UTC")
    assignments: dict[str, int] = key(mapping_of(whole()), default_factory=dict)
    failures: _FailuresSection = key(section(_FailuresSection), default=_FailuresSection())
    boot_timeout: float = key(positive_duration, default=300.0)
    rollout: _RolloutSection = key(section(_RolloutSection), default=_RolloutSection())
    hosts: list[str] = key(list_of(parse_host_selector), default_factory=list)

    def pool_spec(self, source: str) -> PoolSpec:
        return PoolSpec(
            name=self.name,
            image=self.image,
            channel=None if self.version is not None else (self.channel or "latest"),
            version=self.version,
            clone=self.clone,
            start=self.start,
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
            hosts=tuple(self.hosts),
            source=source,
        )


@dataclass(frozen=True)
class _LoadedPool:
    spec: PoolSpec
    doc: Located


def load_pool_file(path: Path) -> PoolSpec:
    """One pool file, validated on its own."""
    loaded, issues = _load_pool(path)
    raise_if(issues)
    assert loaded is not None
    return loaded.spec


def load_pools(paths: Sequence[Path], hosts: Sequence[HostSpec] | None = None) -> list[PoolSpec]:
    """Pool files and directories of *.yml / *.yaml, validated alone and together
    (unique names, no shared ports). All errors of all files are reported at once.
    `hosts`: the settings' hosts, which a pool's `hosts:` must name (None: not checked)."""
    files: list[Path] = []
    for path in paths:
        kind = path_kind(path)
        if kind == "dir":
            files += _pool_files_in(path)
        elif kind == "missing":
            raise ConfigError("no such pool file or directory", file=str(path))
        else:
            files.append(path)
    issues: list[Issue] = []
    loaded: list[_LoadedPool] = []
    for file in files:
        pool, file_issues = _load_pool(file)
        issues += file_issues
        if pool is not None:
            loaded.append(pool)
    issues += _cross_pool_issues(loaded)
    if hosts is not None:
        issues += _host_issues(loaded, hosts)
    raise_if(issues)
    return [p.spec for p in loaded]


def _host_issues(pools: Sequence[_LoadedPool], hosts: Sequence[HostSpec]) -> list[Issue]:
    """A pool's `hosts:` names hosts and labels of the settings' `hosts:` list."""
    names = {h.name for h in hosts}
    labels = {label for h in hosts for label in h.labels}
    issues: list[Issue] = []
    for pool in pools:
        for index, selector in enumerate(pool.spec.hosts):
            if not hosts:
                issues.append(
                    issue_at(
                        pool.doc,
                        ("hosts",),
                        "the settings have no 'hosts:' list (one host, hypervisor.uri): remove "
                        "'hosts' from the pool file or list the hosts in the settings",
                    )
                )
                break
            label = selector.removeprefix("label:")
            if selector.startswith("label:") and label not in labels:
                known = ", ".join(sorted(labels)) or "none"
                issues.append(
                    issue_at(
                        pool.doc,
                        ("hosts", index),
                        f"no host has the label {label!r} (labels: {known})",
                    )
                )
            elif not selector.startswith("label:") and selector not in names:
                issues.append(
                    issue_at(
                        pool.doc,
                        ("hosts", index),
                        f"no host named {selector!r} in the settings (hosts: "
                        f"{', '.join(sorted(names))})",
                    )
                )
    return issues


def _pool_files_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))
    except OSError as exc:
        raise ConfigError(f"cannot list the folder: {exc.strerror}", file=str(folder)) from None


def _load_pool(path: Path) -> tuple[_LoadedPool | None, list[Issue]]:
    try:
        doc = load_file(path)
    except ConfigError as exc:
        return None, [Issue(exc.file or str(path), exc.line or 1, exc.key or "", exc.detail)]
    issues: list[Issue] = []
    pool = validate(PoolFile, top_mapping(doc, issues), doc, issues)
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
        issues.append(issue_at(doc, path, message))

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
                day = DAY_NAMES[min(common)]
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
                    issue_at(
                        pool.doc, ("name",), f"pool {spec.name!r} is already defined in {where}"
                    )
                )
            elif spec.port_first <= other.port_last and other.port_first <= spec.port_last:
                issues.append(
                    issue_at(
                        pool.doc,
                        ("display", "port_range"),
                        f"ports {spec.port_first}-{spec.port_last} overlap pool {other.name!r} "
                        f"({other.port_first}-{other.port_last}, {where}); give each pool "
                        "its own range",
                    )
                )
    return issues
