"""Host checks of the libvirt driver (for `imagepipe doctor`): libvirt answers, and whether KVM
could accelerate guests. They only look: libvirt is connected to read-only, the KVM probe VM
exists only as long as its file descriptor."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imagepipe.checks import INSTALL, Check, fail, ok, warn
from imagepipe.errors import EnvironmentMissingError
from imagepipe.hypervisors.libvirt.hypervisor import import_libvirt

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
