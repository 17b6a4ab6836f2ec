"""`imagepipe doctor`: is this host ready for `imagepipe keep` and `imagepipe build`?

Each check is a small function returning a Check (ok, warn or FAIL, what was found, and for
warn/FAIL what to do). The checks go through the same code the keeper and the build use
(settings and pool loading, Packer version detection, adapter construction, the store's own
read-only open, the registry) and change nothing on the host: no file, folder or database is
created, nothing is migrated, no HAProxy is started, libvirt is connected to read-only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from imagepipe.app.bootstrap import build_balancer, build_hypervisor, clone_state_dir
from imagepipe.balancers.haproxy import HAProxyBalancer
from imagepipe.balancers.ipvs import SYSCTLS, IPVSBalancer
from imagepipe.balancers.ipvs_parse import format_endpoint
from imagepipe.balancers.ipvs_runner import CommandResult, CommandRunner, LocalRunner
from imagepipe.config import Settings, load_pools, load_settings
from imagepipe.errors import ConfigError, EnvironmentMissingError, ImagepipeError
from imagepipe.hypervisors.libvirt import import_libvirt
from imagepipe.images.packer import Packer
from imagepipe.images.registry import Registry
from imagepipe.log import fields
from imagepipe.pool.model import PoolSpec
from imagepipe.pool.store import SCHEMA_VERSION, read_schema_version
from imagepipe.private import DIR_MODE, FILE_MODE

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
KVM_API_VERSION = 12  # the stable KVM API every kernel since 2.6.22 reports
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
_HAPROXY_VERSION = re.compile(r"version (\S+)", re.IGNORECASE)
INSTALL = "run ./install.sh"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report. `fix` says what to do; None when the check is ok."""

    check: str
    status: Status
    detail: str
    fix: str | None = None


def ok(check: str, detail: str) -> Check:
    return Check(check, Status.OK, detail)


def warn(check: str, detail: str, fix: str) -> Check:
    return Check(check, Status.WARN, detail, fix)


def fail(check: str, detail: str, fix: str) -> Check:
    return Check(check, Status.FAIL, detail, fix)


def run_checks(config: Path | None) -> list[Check]:
    """Every check, in a stable order. A broken settings file leaves only the checks that
    do not depend on it (settings, packer)."""
    settings_check, settings = check_settings(config)
    checks = [settings_check, check_packer()]
    if settings is not None:
        pools_check, specs = check_pools(settings)
        checks += [pools_check, check_hypervisor(settings)]
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
                "(see 'Pool files' in README.md); `imagepipe keep` has nothing to keep",
            ),
            [],
        )
    names = ", ".join(s.name for s in specs)
    return ok("pools", f"{len(specs)} pool(s) in {folder}: {names}"), specs


# --- programs and daemons ----------------------------------------------------------------


def check_packer(packer: Packer | None = None) -> Check:
    try:
        version = (packer or Packer()).version()
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
            hypervisor = build_hypervisor(settings)
        except ImagepipeError as exc:
            fix = "set hypervisor.driver: libvirt"
            if settings.hypervisor.driver == "virtualbox":
                fix = (
                    "install VirtualBox 6.1 or 7.x with its SDK, pip install "
                    "'imagepipe[virtualbox]', and run imagepipe as the user owning the VMs"
                )
            return fail("hypervisor", str(exc), fix)
        hypervisor.close()
        return ok("hypervisor", f"{settings.hypervisor.driver} answers")
    return check_libvirt(settings.hypervisor.uri)


def check_libvirt(uri: str) -> Check:
    """Connect read-only (nothing can change) and report libvirt's and QEMU's versions."""
    try:
        libvirt, _qemu = import_libvirt()
    except EnvironmentMissingError as exc:
        return fail("hypervisor", str(exc), INSTALL)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        return fail(
            "hypervisor",
            f"libvirt does not answer at {uri}: {exc.get_error_message()}",
            "start libvirtd (./install.sh or scripts/setup-host.sh), or set hypervisor.uri",
        )
    try:
        library = _libvirt_version(conn.getLibVersion())
        driver = conn.getType()
        hypervisor = _libvirt_version(conn.getVersion())
    except libvirt.libvirtError as exc:
        return fail(
            "hypervisor",
            f"libvirt at {uri} answers but fails: {exc.get_error_message()}",
            "check libvirtd's log (journalctl -u libvirtd) and restart it",
        )
    finally:
        conn.close()
    return ok("hypervisor", f"libvirt {library}, {driver} {hypervisor} at {uri} (read-only)")


def _libvirt_version(number: int) -> str:
    """libvirt encodes versions as major * 1_000_000 + minor * 1_000 + release."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def check_kvm(device: Path = KVM_DEVICE) -> Check:
    """Whether KVM could accelerate guests. Desktops run either way (domain type qemu)."""
    reason = kvm_unusable(device)
    if reason is None:
        return ok(
            "kvm",
            f"{device} is usable; this version runs desktops as domain type qemu (TCG)",
        )
    return warn(
        "kvm",
        f"KVM is not usable ({reason}): desktops run under TCG, software emulation, several "
        "times slower",
        "enable virtualization (VT-x/AMD-V, or nested virtualization for a VM) and load "
        "kvm_intel or kvm_amd",
    )


def kvm_unusable(device: Path = KVM_DEVICE) -> str | None:
    """Why KVM cannot run a guest here, or None when it can (its API answers, a VM can be
    made). The probe VM exists only as long as its file descriptor."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        api = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if api != KVM_API_VERSION:
            return f"{device} speaks KVM API {api}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return f"{device} refuses to make a virtual machine: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def check_balancer(settings: Settings) -> Check:
    try:
        balancer = build_balancer(settings)
    except ImagepipeError as exc:
        return fail("balancer", str(exc), "set balancer.driver: haproxy (or none)")
    if isinstance(balancer, IPVSBalancer):
        return ok(
            "balancer",
            f"ipvs: virtual service {format_endpoint(balancer.vip)}, scheduler "
            f"{balancer.scheduler}, forward {balancer.forward.value}, persistence "
            f"{balancer.persistence or 'off'}",
        )
    if not isinstance(balancer, HAProxyBalancer):
        return ok("balancer", "no balancer (driver none): users connect to each desktop's port")
    socket = balancer.admin.path
    if not balancer.manage:
        if not balancer.admin.answers():
            return fail(
                "balancer",
                f"no HAProxy answers on the admin socket {socket} (manage: false)",
                "start your HAProxy with 'stats socket <path> level admin' and set "
                "balancer.admin_socket to that path, or set balancer.manage: true",
            )
        reply = balancer.admin.command("show version").strip()
        return ok("balancer", f"HAProxy {reply} answers on {socket} (manage: false)")
    try:
        program = balancer.process().program
    except EnvironmentMissingError as exc:
        return fail("balancer", str(exc), INSTALL)
    version = haproxy_version(program)
    if version is None:
        return fail(
            "balancer",
            f"{program} -v does not report a version",
            "reinstall haproxy (apt-get install --reinstall haproxy)",
        )
    running = (
        f"running, answers on {socket}"
        if balancer.admin.answers()
        else "not running: `imagepipe keep` starts it"
    )
    return ok(
        "balancer",
        f"haproxy {version} at {program}, managed, bind {settings.balancer.bind}; {running}",
    )


def haproxy_version(program: str) -> str | None:
    """`haproxy -v`: 'HAProxy version 2.6.12-1+deb12u1 2023/12/16 ...' -> '2.6.12-1+deb12u1'."""
    try:
        done = subprocess.run(
            [program, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _HAPROXY_VERSION.search(done.stdout)
    return match[1] if done.returncode == 0 and match else None


# --- files and folders -------------------------------------------------------------------


def check_state_db(settings: Settings) -> Check:
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
    registry = Registry(path, settings.image_store)
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


def check_pool_images(settings: Settings, specs: Sequence[PoolSpec]) -> list[Check]:
    """Per pool: does its image (pinned version, or channel) resolve in the registry?"""
    registry = Registry(settings.registry, settings.image_store)
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
    """The IPVS director: kernel module, ipvsadm, the VIP on an interface, the sysctls.
    Read-only: nothing is loaded (no ipvsadm call, which would load ip_vs) or set."""
    run = _Probe(runner or LocalRunner(timeout=10))
    cfg = settings.balancer
    return [
        check_ipvs_module(run),
        check_ipvsadm(run),
        check_ipvs_vip(run, cfg.vip or ""),
        check_ipvs_sysctls(run, managed=cfg.ipvs_sysctls),
        check_ipvs_forwarding(run, cfg.forward),
    ]


def check_ipvs_module(run: CommandRunner) -> Check:
    if run.run(["cat", "/proc/net/ip_vs"]).ok:
        return ok("ipvs-module", "ip_vs is loaded")
    if run.run(["modprobe", "-n", "-q", "ip_vs"]).ok:
        return ok("ipvs-module", "ip_vs is not loaded but loadable: ipvsadm loads it at start")
    return fail(
        "ipvs-module",
        "this kernel has no ip_vs module",
        "boot a kernel with CONFIG_IP_VS (Debian's linux-image-amd64 or -cloud-amd64 has it), "
        "or set balancer.driver: haproxy",
    )


def check_ipvsadm(run: CommandRunner) -> Check:
    found = run.run(["sh", "-c", "command -v ipvsadm"])
    if found.ok and found.stdout.strip():
        return ok("ipvsadm", f"ipvsadm at {found.stdout.strip()}")
    return fail("ipvsadm", "ipvsadm is not installed", "apt-get install ipvsadm")


def check_ipvs_vip(run: CommandRunner, vip: str) -> Check:
    listed = run.run(["ip", "-o", "addr", "show"])
    configured = {
        words[3].split("/")[0]: words[1]
        for words in (line.split() for line in listed.stdout.splitlines())
        if len(words) > 3 and words[2] in ("inet", "inet6")
    }
    if vip in configured:
        return ok("ipvs-vip", f"{vip} is on {configured[vip]}")
    return fail(
        "ipvs-vip",
        f"the VIP {vip} is on no interface of the director",
        f"ip addr add {vip}/32 dev eth0 (and in /etc/network/interfaces so it survives a "
        "reboot), or point balancer.vip at an address the director has",
    )


def check_ipvs_sysctls(run: CommandRunner, *, managed: bool) -> Check:
    keys = list(SYSCTLS)
    read = run.run(["sysctl", "-n", *keys])
    values = read.stdout.split()
    wrong = [f"{k}={v}" for k, v in zip(keys, values, strict=False) if v != SYSCTLS[k]]
    if read.ok and len(values) == len(keys) and not wrong:
        return ok("ipvs-sysctls", ", ".join(f"{k}={v}" for k, v in SYSCTLS.items()))
    wanted = " ".join(f"{k}={v}" for k, v in SYSCTLS.items())
    found = ", ".join(wrong) if read.ok else "not readable (ip_vs not loaded yet)"
    if managed:
        return ok("ipvs-sysctls", f"{found}: the keeper sets {wanted} at start")
    return fail(
        "ipvs-sysctls",
        f"{found}; drained desktops and removed ones need {wanted}",
        f"sysctl -w {wanted} (and in /etc/sysctl.d/), or set balancer.ipvs_sysctls: true",
    )


def check_ipvs_forwarding(run: CommandRunner, forward: str) -> Check:
    if forward != "masq":
        return ok(
            "ipvs-forwarding",
            "droute: each desktop needs the VIP on its loopback with arp_ignore=1 and "
            "arp_announce=2 (not checkable from the director)",
        )
    value = run.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    if value == "1":
        return ok("ipvs-forwarding", "masq: net.ipv4.ip_forward=1")
    return fail(
        "ipvs-forwarding",
        f"masq needs the director to forward packets, but net.ipv4.ip_forward={value or '?'}",
        "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d/); the desktops' default "
        "route must point at the director",
    )


class _Probe:
    """A runner for looking only: a program that is missing is an answer (exit 127)."""

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        try:
            return self.runner.run(argv, stdin=stdin)
        except ImagepipeError as exc:
            return CommandResult(tuple(argv), 127, "", str(exc))


# --- VirtualBox (hypervisor.driver: virtualbox) ------------------------------------------

VBOX_DRIVER = Path("/dev/vboxdrv")


def _vboxmanage(*args: str) -> subprocess.CompletedProcess[str] | None:
    program = shutil.which("VBoxManage")
    if program is None:
        return None
    try:
        return subprocess.run(
            [program, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "LANG": "C"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_virtualbox_host(modules: Path = Path("/proc/modules")) -> list[Check]:
    """VirtualBox and its version, the vboxdrv kernel driver, the VRDE extension pack, and
    pyvbox + vboxapi importable; each with its fix."""
    install = "install VirtualBox 6.1 or 7.x from https://www.virtualbox.org/wiki/Linux_Downloads"
    done = _vboxmanage("--version")
    if done is None or done.returncode != 0:
        return [fail("virtualbox", "VBoxManage is not installed", install)]
    checks = [ok("virtualbox", f"VirtualBox {done.stdout.strip()}")]
    loaded = VBOX_DRIVER.exists() or (
        modules.exists() and "vboxdrv " in modules.read_text(errors="replace")
    )
    checks.append(
        ok("vboxdrv", "the VirtualBox kernel driver is loaded")
        if loaded
        else fail("vboxdrv", "the vboxdrv kernel module is not loaded", "run /sbin/vboxconfig")
    )
    packs = _vboxmanage("list", "extpacks")
    text = packs.stdout if packs is not None else ""
    checks.append(
        ok("vrde", "the extension pack provides VRDE (remote desktop)")
        if "Extension Pack" in text and "Usable:" in text and "true" in text
        else fail(
            "vrde",
            "no usable VirtualBox Extension Pack: clones would have no remote display",
            "VBoxManage extpack install Oracle_VM_VirtualBox_Extension_Pack-<version>"
            ".vbox-extpack (the version of VirtualBox)",
        )
    )
    try:
        from imagepipe.hypervisors.virtualbox import import_pyvbox

        import_pyvbox()
        checks.append(ok("pyvbox", "pyvbox and VirtualBox's vboxapi import"))
    except ImagepipeError as exc:
        checks.append(fail("pyvbox", str(exc), "pip install 'imagepipe[virtualbox]'"))
    return checks


def check_virtualbox_bases(settings: Settings, specs: Sequence[PoolSpec]) -> list[Check]:
    """Per pool: is its image version's base VM there, powered off, unlocked, snapshotted?"""
    if not specs:
        return []
    try:
        hypervisor = build_hypervisor(settings)
    except ImagepipeError:
        return []  # check_hypervisor already said why
    registry = Registry(settings.registry, settings.image_store)
    checks = []
    try:
        for spec in specs:
            ref: str | int | None = spec.version if spec.version is not None else spec.channel
            try:
                base = registry.resolve(spec.image, ref).base_image()
            except ImagepipeError:
                continue  # check_pool_images reports it
            name = f"base:{spec.name}"
            if hypervisor.base_ready(base):
                checks.append(ok(name, f"base VM {base.vm} is powered off with {base.snapshot}"))
            else:
                checks.append(
                    warn(
                        name,
                        f"base VM {base.vm} of {spec.image} v{base.version} cannot be cloned "
                        "now (missing, running, locked by a session, or without its snapshot)",
                        f"power off {base.vm} and close its sessions, or re-import it with "
                        f"imagepipe images import {spec.image} --from-vm VM",
                    )
                )
    finally:
        hypervisor.close()
    return checks
