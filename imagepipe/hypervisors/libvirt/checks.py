"""Host checks of the libvirt driver (for `imagepipe doctor`): libvirt answers, and whether KVM
could accelerate guests; with several hosts (settings `hosts:`), each host's connection,
storage pool, free space and versions present. They only look: libvirt is connected to
read-only, the KVM probe VM exists only as long as its file descriptor."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe.checks import INSTALL, Check, fail, ok, warn
from imagepipe.errors import EnvironmentMissingError
from imagepipe.hypervisors.libvirt.hypervisor import import_libvirt
from imagepipe.hypervisors.libvirt.volumes import POOL_DIR, POOL_NAME, versions_on
from imagepipe.pool.model import HostSpec
from imagepipe.units import format_size

KVM_DEVICE = Path("/dev/kvm")
KVM_API_VERSION = 12  # the stable KVM API every kernel since 2.6.22 reports
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)


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


@dataclass(frozen=True)
class WantedVersion:
    """A version some pool runs on a host: the host should hold it."""

    image: str
    version: int
    size: int  # bytes of its files: what its upload takes on the host
    pools: tuple[str, ...]


HOST_TIMEOUT = 10.0  # seconds a host may take to answer every check before it FAILs
LOW_SPACE = 0.1  # warn when less than this share of the storage pool is free


def check_hosts(
    hosts: Sequence[HostSpec],
    wanted: Mapping[str, Sequence[WantedVersion]],
    timeout: float = HOST_TIMEOUT,
) -> list[Check]:
    """Each host of `hosts:` (in parallel: a dead host costs `timeout` once, not per host):
    `host:NAME` (libvirt answers), `host:NAME:storage`, `host:NAME:space`,
    `host:NAME:versions` (it holds the versions its pools run), one line each."""
    results: dict[str, list[Check]] = {}

    def run(host: HostSpec) -> None:
        results[host.name] = _check_host(host, wanted.get(host.name, ()))

    threads = [
        threading.Thread(target=run, args=(h,), name=f"doctor-{h.name}", daemon=True) for h in hosts
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    checks: list[Check] = []
    for host in hosts:
        found = results.get(host.name)
        if found is None:  # the thread is left blocked in libvirt; doctor exits soon anyway
            found = [
                fail(
                    f"host:{host.name}",
                    f"no answer from libvirt at {host.uri} within {timeout:g} s (a read-only "
                    "connection was tried): the host or its libvirtd hangs, or the network "
                    "drops the packets",
                    _unreachable_fix(host),
                )
            ]
        checks += found
    return checks


def _unreachable_fix(host: HostSpec) -> str:
    return (
        f"start libvirtd on {host.name}, and check that this machine reaches it at the URI's "
        "address and port (qemu+tcp 16509, qemu+tls 16514, qemu+ssh 22) and the uri under "
        "hosts: in the settings (docs/hosts.md)"
    )


def _check_host(host: HostSpec, wanted: Sequence[WantedVersion]) -> list[Check]:
    name = f"host:{host.name}"
    try:
        libvirt, _qemu = import_libvirt()
    except EnvironmentMissingError as exc:
        return [fail(name, str(exc), INSTALL)]
    try:
        conn = libvirt.openReadOnly(host.uri)
    except libvirt.libvirtError as exc:
        return [
            fail(
                name,
                f"libvirt does not answer at {host.uri} (a read-only connection was tried): "
                f"{exc.get_error_message()}",
                _unreachable_fix(host),
            )
        ]
    try:
        library = _libvirt_version(conn.getLibVersion())
        driver = conn.getType()
        hypervisor = _libvirt_version(conn.getVersion())
        checks = [ok(name, f"libvirt {library}, {driver} {hypervisor} at {host.uri} (read-only)")]
        return checks + _check_storage(libvirt, conn, host.name, wanted)
    except libvirt.libvirtError as exc:
        return [
            fail(
                name,
                f"libvirt at {host.uri} answers but fails: {exc.get_error_message()}",
                f"check libvirtd's log on {host.name} (journalctl -u libvirtd) and restart it",
            )
        ]
    finally:
        conn.close()


def _check_storage(
    libvirt: Any, conn: Any, host: str, wanted: Sequence[WantedVersion]
) -> list[Check]:
    """The host's `imagepipe` storage pool, its free space and the versions in it."""
    storage = f"host:{host}:storage"
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        return [
            ok(
                storage,
                f"no storage pool {POOL_NAME} yet: the keeper defines it (a directory pool at "
                f"{POOL_DIR}) before its first upload",
            ),
            _versions_check(host, (), wanted),
        ]
    if not pool.isActive():
        return [
            warn(
                storage,
                f"storage pool {POOL_NAME} is defined but not active: its volumes cannot be listed",
                f"virsh -c URI pool-start {POOL_NAME} (the keeper starts it on its next upload)",
            )
        ]
    _state, capacity, _allocation, available = pool.info()
    present = versions_on(list(pool.listVolumes()))
    checks = [ok(storage, f"storage pool {POOL_NAME} is active at {_pool_path(pool)}")]
    lacking = [w for w in wanted if (w.image, w.version) not in present]
    needed = sum(w.size for w in lacking)
    space = f"host:{host}:space"
    detail = f"{format_size(available)} free of {format_size(capacity)}"
    if needed > available:
        checks.append(
            fail(
                space,
                f"{detail}; the versions it lacks need {format_size(needed)}",
                f"free space in {_pool_path(pool)} on {host} (or give the pool's folder a "
                "bigger disk); old versions go with `imagepipe images prune`",
            )
        )
    elif capacity and available < capacity * LOW_SPACE:
        checks.append(
            warn(
                space,
                f"{detail}: less than {LOW_SPACE:.0%} left for clone disks and new versions",
                f"free space in {_pool_path(pool)} on {host}",
            )
        )
    else:
        needs = f"; the versions it lacks need {format_size(needed)}" if needed else ""
        checks.append(ok(space, detail + needs))
    return [*checks, _versions_check(host, present, wanted)]


def _pool_path(pool: Any) -> str:
    from xml.etree import ElementTree

    path = ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path")
    return path or POOL_DIR


def _versions_check(
    host: str, present: tuple[tuple[str, int], ...], wanted: Sequence[WantedVersion]
) -> Check:
    name = f"host:{host}:versions"
    held = ", ".join(f"{i} v{v}" for i, v in present) or "no version"
    lacking = [w for w in wanted if (w.image, w.version) not in present]
    if not lacking:
        return ok(name, f"holds {held}")
    missing = "; ".join(f"{w.image} v{w.version} (pool {', '.join(w.pools)})" for w in lacking)
    return warn(
        name,
        f"holds {held}; lacks {missing}",
        "nothing to do while a keeper runs: it uploads a version to a host before it puts "
        "desktops of it there (check the free space above)",
    )


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
