"""`imagepipe doctor`: is this host ready for `imagepipe keep` and `imagepipe build`?

Each check is a small function returning a Check (imagepipe/checks.py: ok, warn or FAIL, what
was found, and for warn/FAIL what to do). Each driver's checks live beside it
(hypervisors/libvirt/checks.py, hypervisors/virtualbox/checks.py, balancers/haproxy/checks.py,
balancers/ipvs/checks.py); this module checks settings, pools, Packer, files and the registry,
and composes the rest for the drivers the settings name. The checks go through the same code
the keeper and the build use (settings and pool loading, Packer version detection, adapter
construction, the store's own read-only open, the registry) and change nothing on the host:
no file, folder or database is created, nothing is migrated, no HAProxy is started, libvirt is
connected to read-only.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from imagepipe.app.bootstrap import Runtime, build_packer, clone_state_dir
from imagepipe.balancers.group import BalancerGroup
from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.balancers.haproxy.checks import check_haproxy
from imagepipe.balancers.ipvs import checks as ipvs_checks
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.ipvs.runner import CommandRunner
from imagepipe.checks import INSTALL, Check, Status, fail, ok, warn
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import ConfigError, EnvironmentMissingError, ImagepipeError
from imagepipe.hypervisors.libvirt import checks as libvirt_checks
from imagepipe.hypervisors.libvirt.checks import WantedVersion, check_kvm, check_libvirt
from imagepipe.hypervisors.virtualbox.checks import PoolBase, check_bases, check_virtualbox_host
from imagepipe.images.packer import Packer
from imagepipe.log import fields
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.ports import Balancer
from imagepipe.private import DIR_MODE, FILE_MODE
from imagepipe.stores.sqlite import SCHEMA_VERSION, read_schema_version

__all__ = ["Check", "Status", "fail", "failed", "ok", "run_checks", "warn"]

log = logging.getLogger(__name__)


def run_checks(config: Path | None) -> list[Check]:
    """Every check, in a stable order. A broken settings file leaves only the checks that
    do not depend on it (settings, packer)."""
    settings_check, settings = check_settings(config)
    checks = [settings_check, check_packer()]
    if settings is not None:
        pools_check, specs = check_pools(settings)
        checks.append(pools_check)
        if settings.host_specs() and settings.hypervisor.driver == "libvirt":
            checks += check_hosts(settings, specs)  # /dev/kvm of this machine runs no desktop
        else:
            checks.append(check_hypervisor(settings))
            if settings.hypervisor.driver == "libvirt":
                checks.append(check_kvm())
        if settings.hypervisor.driver == "virtualbox":
            checks += check_virtualbox_host() + check_virtualbox_bases(settings, specs)
        checks.append(check_balancer(settings))
        if settings.balancer.driver == "ipvs":
            checks += check_ipvs(settings)
        checks += [
            check_state_db(settings),
            check_writable_folder("run-dir", settings.run_dir, "run_dir"),
            check_registry(settings),
            *([check_registry_remote(settings)] if settings.registry_remote else []),
            check_writable_folder("image-store", settings.image_store, "image_store"),
            check_private_modes(settings),
        ]
        checks += check_pool_images(settings, specs)
    for check in checks:
        log.debug("doctor check", extra=fields(check=check.check, status=check.status.value))
    return checks


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


# --- settings and pool files -------------------------------------------------------------


def check_settings(config: Path | None) -> tuple[Check, Settings | None]:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return (
            fail(
                "settings",
                str(exc),
                "fix the settings file at the line shown (imagepipe.example.yml lists every key)",
            ),
            None,
        )
    if settings.source == "defaults":
        detail = (
            "no settings file (--config, $IMAGEPIPE_CONFIG, ./imagepipe.yml, "
            "/etc/imagepipe/imagepipe.yml): built-in defaults"
        )
        return ok("settings", detail), settings
    return ok("settings", f"{settings.source} is valid"), settings


def check_pools(settings: Settings) -> tuple[Check, list[PoolSpec]]:
    folder = settings.pools_dir
    if not folder.exists():
        return (
            fail(
                "pools",
                f"pools_dir {folder} does not exist",
                "create it with one *.yml file per pool, or set pools_dir in the settings file",
            ),
            [],
        )
    try:
        specs = load_pools([folder])
    except ConfigError as exc:
        return (
            fail(
                "pools",
                str(exc),
                "fix the pool file at the line shown; then `imagepipe pools "
                "check` says when it is right",
            ),
            [],
        )
    if not specs:
        return (
            warn(
                "pools",
                f"no pool files (*.yml) in {folder}",
                "add one file per pool there "
                "(see 'Pool files' in docs/configuration.md); `imagepipe keep` has nothing to keep",
            ),
            [],
        )
    names = ", ".join(s.name for s in specs)
    return ok("pools", f"{len(specs)} pool(s) in {folder}: {names}"), specs


# --- programs and daemons ----------------------------------------------------------------


def check_packer(packer: Packer | None = None) -> Check:
    try:
        version = (packer or build_packer()).version()
    except EnvironmentMissingError as exc:
        return fail("packer", str(exc), INSTALL)
    except ImagepipeError as exc:
        return fail("packer", f"packer does not report its version: {exc}", INSTALL)
    if version.needs_init:
        return ok("packer", f"packer {version}; `packer init` installs plugins before each build")
    return ok("packer", f"packer {version}; plugins are built in (no `packer init` before 1.7)")


def check_hypervisor(settings: Settings) -> Check:
    if settings.hypervisor.driver != "libvirt":
        try:
            with Runtime(settings) as runtime:
                _ = runtime.hypervisor  # connects; closed at the end of the `with`
        except ImagepipeError as exc:
            fix = "set hypervisor.driver: libvirt"
            if settings.hypervisor.driver == "virtualbox":
                fix = (
                    "install VirtualBox 6.1 or 7.x with its SDK, pip install "
                    "'imagepipe[virtualbox]', and run imagepipe as the user owning the VMs"
                )
            return fail("hypervisor", str(exc), fix)
        return ok("hypervisor", f"{settings.hypervisor.driver} answers")
    return check_libvirt(settings.hypervisor.uri)


def check_hosts(settings: Settings, specs: Sequence[PoolSpec]) -> list[Check]:
    """Each host of `hosts:`: libvirt answers, its storage pool, free space, and the versions
    of the pools that may run there (hypervisors/libvirt/checks.py)."""
    with Runtime(settings) as runtime:
        registry = runtime.registry
    hosts = settings.host_specs()
    wanted: dict[str, dict[tuple[str, int], WantedVersion]] = {h.name: {} for h in hosts}
    if settings.registry.exists():
        for spec in specs:
            ref: str | int | None = spec.version if spec.version is not None else spec.channel
            try:
                base = registry.resolve(spec.image, ref).base_image()
            except ImagepipeError:
                continue  # check_pool_images reports it
            size = sum(
                (base.directory / f).stat().st_size
                for f in (base.disk, base.kernel, base.initrd)
                if f is not None and (base.directory / f).is_file()
            )
            key = (base.image, base.version)
            for host in hosts:
                if not spec.may_use(host):
                    continue
                known = wanted[host.name].get(key)
                pools = (*known.pools, spec.name) if known else (spec.name,)
                wanted[host.name][key] = WantedVersion(base.image, base.version, size, pools)
    return libvirt_checks.check_hosts(hosts, {h: list(w.values()) for h, w in wanted.items()})


def check_balancer(settings: Settings) -> Check:
    with Runtime(settings) as runtime:
        try:
            balancer = runtime.balancer
        except ImagepipeError as exc:
            return fail("balancer", str(exc), "set balancer.driver: haproxy (or none)")
        return _check_balancer(settings, balancer)


def _check_balancer(settings: Settings, balancer: Balancer) -> Check:
    if isinstance(balancer, IPVSBalancer):
        return ipvs_checks.describe(balancer)
    if isinstance(balancer, BalancerGroup):
        return check_balancer_pair(balancer, settings.balancer.bind)
    if not isinstance(balancer, HAProxyBalancer):
        return ok("balancer", "no balancer (driver none): users connect to each desktop's port")
    return check_haproxy(balancer, settings.balancer.bind)


def check_balancer_pair(group: BalancerGroup, bind: str) -> Check:
    """balancer.instances: each HAProxy checked; a warning while some answer (the keeper
    serves through them), a failure when none does."""
    results = [
        (name, check_haproxy(instance, bind))
        for name, instance in group.instances()
        if isinstance(instance, HAProxyBalancer)
    ]
    detail = "; ".join(f"{name}: {check.detail}" for name, check in results)
    failed = [(name, check) for name, check in results if check.status is Status.FAIL]
    if not failed:
        return ok("balancer", detail)
    fix = f"{failed[0][1].fix} (for instance {failed[0][0]}: its entry under balancer.instances)"
    if len(failed) < len(results):
        return warn("balancer", detail, fix)
    return fail("balancer", detail, fix)


# --- files and folders -------------------------------------------------------------------


def check_state_db(settings: Settings) -> Check:
    if settings.state is not None:
        return check_shared_state(settings)
    path = settings.state_db
    problem = _not_writable(path.parent)
    if problem is not None:
        return fail(
            "state-db",
            f"{problem}: the keeper keeps its state and clone disks ({clone_state_dir(settings)})"
            " there",
            "run as root, or set state_db in the settings file to a writable place",
        )
    if not path.exists():
        return ok("state-db", f"{path} does not exist yet: `imagepipe keep` creates it")
    try:
        version = read_schema_version(path)
    except ImagepipeError as exc:
        return fail("state-db", str(exc), "point state_db at another file, or remove this one")
    if version == SCHEMA_VERSION:
        return ok("state-db", f"{path}: schema version {version} (current)")
    if version < SCHEMA_VERSION:
        return warn(
            "state-db",
            f"{path}: schema version {version}, older than this imagepipe's {SCHEMA_VERSION}",
            "nothing to do: `imagepipe keep` migrates it when it starts",
        )
    return fail(
        "state-db",
        f"{path}: schema version {version} was written by a newer imagepipe (this one knows up "
        f"to {SCHEMA_VERSION})",
        "upgrade imagepipe, or point state_db at another file",
    )


def check_shared_state(settings: Settings) -> Check:
    """The PostgreSQL state (settings key state): reachable with the password, and of a
    schema this imagepipe reads. Only reads."""
    from imagepipe.app.bootstrap import state_password
    from imagepipe.stores import postgres

    url = settings.state
    assert url is not None
    try:
        version = postgres.read_schema_version(url, password=state_password(settings))
    except ImagepipeError as exc:
        return fail(
            "state-db",
            str(exc),
            "check the state: URL, the password (state_password_file, PGPASSWORD or "
            "~/.pgpass) and that the database server answers",
        )
    current = postgres.SCHEMA_VERSION
    if version == current:
        return ok("state-db", f"{url}: schema version {version} (current)")
    if version == 0:
        return ok("state-db", f"{url}: reachable, no state yet: `imagepipe keep` creates it")
    if version < current:
        return warn(
            "state-db",
            f"{url}: schema version {version}, older than this imagepipe's {current}",
            "nothing to do: `imagepipe keep` migrates it when it starts",
        )
    return fail(
        "state-db",
        f"{url}: schema version {version} was written by a newer imagepipe (this one knows up "
        f"to {current})",
        "upgrade imagepipe, or point state at another database",
    )


def check_writable_folder(check: str, folder: Path, key: str) -> Check:
    problem = _not_writable(folder)
    if problem is not None:
        return fail(check, problem, f"run as root, or set {key} in the settings file")
    if folder.is_dir():
        return ok(check, f"{folder} is writable")
    return ok(check, f"{folder} does not exist yet; it will be created (its parent is writable)")


def _not_writable(folder: Path) -> str | None:
    """Why imagepipe could not write in `folder` (creating it and its parents first), or
    None when it could. Only looks."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_private_modes(settings: Settings) -> Check:
    """The state database (who used which desktop when), its folder, the run folder and the
    registry's working files are owner-only; warn about any that group or others can use."""
    db = settings.state_db
    registry_lock = settings.registry.parent / f".{settings.registry.name}.lock"
    files = [db, db.with_name(f"{db.name}-wal"), db.with_name(f"{db.name}-shm"), registry_lock]
    if settings.state_password_file is not None:
        files.append(settings.state_password_file)
    folders = [db.parent, settings.run_dir, settings.registry]
    loose = [(p, FILE_MODE) for p in files if _looser(p)]
    loose += [(p, DIR_MODE) for p in folders if _looser(p)]
    if not loose:
        return ok("private-modes", "state, run folder and registry are owner-only")
    detail = ", ".join(f"{p} is {stat.S_IMODE(p.stat().st_mode):04o}" for p, _ in loose)
    fix = "; ".join(f"chmod {mode:o} {p}" for p, mode in loose)
    return warn("private-modes", f"{detail}: group or others can read them", fix)


def _looser(path: Path) -> bool:
    try:
        return stat.S_IMODE(path.lstat().st_mode) & 0o077 != 0 and not path.is_symlink()
    except OSError:
        return False  # missing: created owner-only when needed


def check_registry(settings: Settings) -> Check:
    path = settings.registry
    if not path.exists():
        return warn(
            "registry",
            f"{path} does not exist yet",
            "nothing to do: it is created on the first `imagepipe build`",
        )
    with Runtime(settings) as runtime:
        registry = runtime.registry
    try:
        registry.check_readable()
        images = registry.images()
    except ImagepipeError as exc:
        return fail(
            "registry",
            str(exc),
            "point registry in the settings file at the registry, or at an empty or new folder",
        )
    listed = ", ".join(images) if images else "no images yet"
    return ok("registry", f"{path} is a git repository: {listed}")


def check_registry_remote(settings: Settings) -> Check:
    """The shared registry's remote answers (git ls-remote; nothing fetched or changed)."""
    with Runtime(settings) as runtime:
        registry = runtime.registry
    try:
        tip = registry.check_remote()
    except ImagepipeError as exc:
        return fail(
            "registry-remote",
            str(exc),
            "check the URL in registry_remote, the network, and git's access (ssh keys in the "
            "user's ssh configuration, or a git credential helper for https); keepers read "
            "the last fetched state meanwhile, builds and channel moves fail",
        )
    return ok("registry-remote", f"{settings.registry_remote}: {tip}")


def check_pool_images(settings: Settings, specs: Sequence[PoolSpec]) -> list[Check]:
    """Per pool: does its image (pinned version, or channel) resolve in the registry?"""
    with Runtime(settings) as runtime:
        registry = runtime.registry
    checks = []
    for spec in specs:
        ref: str | int | None = spec.version if spec.version is not None else spec.channel
        shown = f"v{spec.version}" if spec.version is not None else spec.channel
        name = f"image:{spec.name}"
        try:
            record = registry.resolve(spec.image, ref)
        except ImagepipeError as exc:
            checks.append(
                warn(
                    name,
                    f"{spec.image}@{shown} does not resolve: {exc}",
                    f"run imagepipe build {spec.image}",
                )
            )
            continue
        checks.append(ok(name, f"{spec.image}@{shown} is v{record.version}"))
    return checks


# --- ipvs ----------------------------------------------------------------------------------


def check_ipvs(settings: Settings, runner: CommandRunner | None = None) -> list[Check]:
    """The IPVS director the settings describe (balancers/ipvs/checks.py)."""
    cfg = settings.balancer
    return ipvs_checks.check_director(
        cfg.vip or "", forward=cfg.forward, managed_sysctls=cfg.ipvs_sysctls, runner=runner
    )


# --- VirtualBox (hypervisor.driver: virtualbox) ------------------------------------------


def check_virtualbox_bases(settings: Settings, specs: Sequence[PoolSpec]) -> list[Check]:
    """Per pool: is its image version's base VM there, powered off, unlocked, snapshotted?"""
    with Runtime(settings) as runtime:
        registry = runtime.registry
    bases = []
    for spec in specs:
        ref: str | int | None = spec.version if spec.version is not None else spec.channel
        try:
            base = registry.resolve(spec.image, ref).base_image()
        except ImagepipeError:
            continue  # check_pool_images reports it
        bases.append(PoolBase(spec.name, spec.image, base))
    if not bases:
        return []
    with Runtime(settings) as runtime:
        try:
            hypervisor = runtime.hypervisor
        except ImagepipeError:
            return []  # check_hypervisor already said why
        return check_bases(hypervisor, bases)
