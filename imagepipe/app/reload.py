"""Reloading the keeper's configuration (SIGHUP, `systemctl reload imagepipe-keep`).

The settings file and the pool files are read and validated again. All or nothing: when any
file fails validation, the reload is refused with one log line naming the file, the line and
the key, and the keeper keeps its last good configuration. A pool whose file was removed is
not dropped: its desktops are not deleted without a command (`imagepipe pools down`), so the
keeper goes on looking after its sessions with growth stopped (`frozen`): no new desktop, no
idle desktop removed, free desktops stay in the balancer.

What a reload changes: the pools, `keeper.tick`, `keeper.parallel`, `keeper.action_timeout`,
and a `hosts:` list (hosts added, removed, their address, capacity, labels or uri changed;
going from one host to a list or back needs a restart). A host is removed only when none
of its desktops has a user (the store's records): otherwise the reload is refused, with
one log line naming the host and how to drain it, and the old configuration is kept. A
change of anything else (drivers, addresses, paths, metrics) is logged as needing a
restart and not applied.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagepipe import record, schema
from imagepipe.app.keeping import select_pools
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import ImagepipeError
from imagepipe.log import fields
from imagepipe.pool.model import PoolSpec
from imagepipe.record import replace

log = logging.getLogger(__name__)

RELOADABLE = ("pools_dir", "keeper")  # settings a reload applies; the rest needs a restart
# hosts: too, from one list to another (one host <-> a list changes the hypervisor)


@dataclass(frozen=True)
class KeeperConfig:
    """What the keeper runs with: settings, the pools it keeps, the ones it leaves alone."""

    settings: Settings
    specs: tuple[PoolSpec, ...]
    other_pools: tuple[str, ...]
    frozen: tuple[str, ...] = ()  # pools whose file is gone: kept with growth stopped


def load_keeper_config(
    config: Path | None, wanted: Sequence[str], previous: KeeperConfig | None = None
) -> KeeperConfig:
    """Settings and pools, validated (ConfigError otherwise). With `previous` (a reload),
    pools it kept whose file is gone are kept frozen, and only RELOADABLE settings change."""
    settings = load_settings(config)
    if previous is not None:
        settings = _reloadable(previous.settings, settings)
    configured = load_pools([settings.pools_dir], settings.host_specs())
    names = {s.name for s in configured}
    gone = [] if previous is None else [s for s in previous.specs if s.name not in names]
    specs = select_pools(configured, [w for w in wanted if w not in {g.name for g in gone}])
    others = [s.name for s in configured if s not in specs]
    return KeeperConfig(
        settings=settings,
        specs=(*specs, *(frozen(g) for g in gone)),
        other_pools=tuple(others),
        frozen=tuple(g.name for g in gone),
    )


def frozen(spec: PoolSpec) -> PoolSpec:
    """The pool with growth stopped: no desktop made (free and initial 0, no schedule), none
    removed for idling (shrink_after never); sessions, recycling and the balancer go on."""
    return replace(spec, initial=0, free=0, schedule=(), shrink_after=math.inf)


def _reloadable(old: Settings, new: Settings) -> Settings:
    """`new` with what a reload cannot change put back to `old`, said once in the log."""
    reloadable = (*RELOADABLE, "source", *(("hosts",) if old.hosts and new.hosts else ()))
    changed = [
        name
        for name in (f.attr for f in record.fields(old))
        if name not in reloadable and getattr(old, name) != getattr(new, name)
    ]
    if changed:
        log.warning(
            "settings changed that need a restart; not applied",
            extra=fields(keys=",".join(changed), restart="systemctl restart imagepipe-keep"),
        )
    kept = {name: getattr(old, name) for name in changed}
    return schema.replace(new, **kept) if kept else new


class Reloader:
    """Applies a reload to a running keeper; keeps the last good configuration."""

    def __init__(self, config: Path | None, wanted: Sequence[str], current: KeeperConfig) -> None:
        self.config = config
        self.wanted = tuple(wanted)
        self.current = current

    def reload(self, in_session: Callable[[str], int] = lambda host: 0) -> KeeperConfig | None:
        """The new configuration, or None (logged) when a file fails validation or a host
        removed from `hosts:` has desktops with users (`in_session(host)`: how many)."""
        try:
            new = load_keeper_config(self.config, self.wanted, self.current)
        except ImagepipeError as exc:
            log.error(
                "reload refused; keeping the last good configuration",
                extra=fields(error=every_problem(exc)),
            )
            return None
        kept = {h.name for h in new.settings.hosts}
        for host in self.current.settings.hosts:
            if host.name in kept:
                continue
            users = in_session(host.name)
            if users:
                log.error(
                    "reload refused; keeping the last good configuration",
                    extra=fields(
                        error=f"{new.settings.source}: host {host.name} is no longer under "
                        f"hosts:, but {users} desktop(s) on it have users; drain it first "
                        f"(imagepipe hosts drain {host.name} --wait), then remove it",
                        host=host.name,
                    ),
                )
                return None
        for name in new.frozen:
            if name not in self.current.frozen:
                log.warning(
                    "pool file removed: the pool makes no more desktops; its desktops stay "
                    "until `imagepipe pools down` removes them",
                    extra=fields(pool=name),
                )
        log.info(
            "configuration reloaded",
            extra=fields(
                pools=",".join(s.name for s in new.specs) or "none",
                tick=new.settings.keeper.tick,
                hosts=",".join(h.name for h in new.settings.hosts) or None,
            ),
        )
        self.current = new
        return new


def every_problem(exc: ImagepipeError) -> str:
    """All the problems an error lists, on one log line ("; " between them): a config error
    says one problem a line, the first ending "(and N more below)", which on a log line would
    point at nothing."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    lines[0] = re.sub(r" \(and \d+ more below\)$", "", lines[0])
    return "; ".join(lines)
