"""Pure helpers of the VirtualBox adapter: API versions, result codes, clone metadata in extra
data, guest properties. No pyvbox import and no I/O, so every rule is unit-tested alone.

Version differences are kept in small `VersionApi` pieces (as Vagrant's version_6_1.rb /
version_7_0.rb do). pyvbox's generated API is VirtualBox 6.1's; where 7.x differs, the adapter
calls the underlying method with the arguments the piece gives:

- MachineState: 7.0 inserted AbortedSaved (5) after Aborted; every later value moved up one,
  so pyvbox's 6.1 enum names are wrong on 7.x. States are compared by value, through the
  host's own table.
- IVirtualBox.createMachine: 6.1 (settingsFile, name, groups, osTypeId, flags); 7.0 adds
  cipher, passwordId, password; 7.1 adds the platform architecture after name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from imagepipe.errors import (
    BusyError,
    CloneNotFoundError,
    EnvironmentMissingError,
    FatalHypervisorError,
    HypervisorError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import WarmKey, fingerprint
from imagepipe.pool.model import CloneMode, Endpoint, Power, StartMode

# result codes (VirtualBox.xidl <result> and the COM codes it documents)
E_ACCESSDENIED = 0x80070005
VBOX_E_OBJECT_NOT_FOUND = 0x80BB0001
VBOX_E_INVALID_VM_STATE = 0x80BB0002
VBOX_E_INVALID_OBJECT_STATE = 0x80BB0007
VBOX_E_INVALID_SESSION_STATE = 0x80BB000B
VBOX_E_OBJECT_IN_USE = 0x80BB000C

# VBoxEventType values the adapter listens to (unchanged 6.1 -> 7.1)
EVENT_MACHINE_STATE_CHANGED = 32
EVENT_GUEST_PROPERTY_CHANGED = 42

GROUP_ROOT = "/imagepipe"
CLEAN_SNAPSHOT = "imagepipe-clean"
BASE_SNAPSHOT = "imagepipe-base"  # on a base VM imported from a version's OVF
EXTRA_PREFIX = "imagepipe/"
PROP_USERS_LIST = "/VirtualBox/GuestInfo/OS/LoggedInUsersList"
PROP_USERS = "/VirtualBox/GuestInfo/OS/LoggedInUsers"
PROP_NO_USERS = "/VirtualBox/GuestInfo/OS/NoLoggedInUsers"
PROP_VRDP_PREFIX = "/VirtualBox/HostInfo/VRDP/"
PROP_VRDP_ACTIVE = "/VirtualBox/HostInfo/VRDP/ActiveClient"


def error_for(code: int, message: str, subject: str) -> HypervisorError:
    """The imagepipe error for a VirtualBox result code: what the executor may retry."""
    code &= 0xFFFFFFFF
    text = f"{subject}: {message}".rstrip(": ")
    if code == VBOX_E_OBJECT_NOT_FOUND:
        return CloneNotFoundError(f"{subject} does not exist in VirtualBox ({message})")
    if code in (VBOX_E_INVALID_OBJECT_STATE, E_ACCESSDENIED, VBOX_E_INVALID_SESSION_STATE):
        return BusyError(f"{text} (another session holds the machine; retry later)")
    if code == VBOX_E_INVALID_VM_STATE:
        return InvalidStateError(text)
    return FatalHypervisorError(f"{text} (VirtualBox result 0x{code:08X})")


# -- versions ------------------------------------------------------------------------------------

_STATES_61 = (
    "Null", "PoweredOff", "Saved", "Teleported", "Aborted", "Running", "Paused", "Stuck",
    "Teleporting", "LiveSnapshotting", "Starting", "Stopping", "Saving", "Restoring",
    "TeleportingPausedVM", "TeleportingIn", "DeletingSnapshotOnline", "DeletingSnapshotPaused",
    "OnlineSnapshotting", "RestoringSnapshot", "DeletingSnapshot", "SettingUp", "Snapshotting",
)  # fmt: skip
POWER = {  # machine state name -> the port's Power
    "PoweredOff": Power.SHUTOFF,
    "Teleported": Power.SHUTOFF,
    "Aborted": Power.CRASHED,
    "AbortedSaved": Power.CRASHED,
    "Saved": Power.SUSPENDED,
    "Paused": Power.SUSPENDED,
    "Running": Power.RUNNING,
    "Stuck": Power.CRASHED,
}
OFF_STATES = frozenset({"PoweredOff", "Teleported", "Aborted"})
SAVED_STATES = frozenset({"Saved", "AbortedSaved"})
RUNNING_STATES = frozenset({"Running", "Starting", "Restoring", "LiveSnapshotting"})


@dataclass(frozen=True)
class VersionApi:
    """The pieces of the API that differ between VirtualBox 6.1, 7.0 and 7.1."""

    version: str
    major: int
    minor: int
    states: tuple[str, ...]

    def state_name(self, value: int) -> str:
        return self.states[value] if 0 <= value < len(self.states) else f"Unknown{value}"

    def state_value(self, name: str) -> int:
        return self.states.index(name)

    def create_machine_args(self, settings_file: str, name: str, group: str) -> list[object]:
        """Arguments of IVirtualBox.createMachine for this version."""
        base: list[object] = [settings_file, name, [group], "Other_64", "forceOverwrite=1"]
        if self.major < 7:
            return base
        encryption = ["", "", ""]  # cipher, passwordId, password: no encryption
        if self.minor == 0:
            return [*base, *encryption]
        platform_x86 = 1  # PlatformArchitecture_x86
        return [settings_file, name, platform_x86, *base[2:], *encryption]


def version_api(version: str) -> VersionApi:
    """The API pieces for IVirtualBox.version ("6.1.50", "7.0.14_Debian r161095", ...)."""
    match = re.match(r"^(\d+)\.(\d+)", version.strip())
    if match is None:
        raise EnvironmentMissingError(
            f"VirtualBox reported a version imagepipe cannot read: {version!r}"
        )
    major, minor = int(match.group(1)), int(match.group(2))
    if (major, minor) < (6, 1):
        raise EnvironmentMissingError(
            f"VirtualBox {version} is too old: imagepipe needs VirtualBox 6.1 or 7.x"
        )
    states = _STATES_61 if major < 7 else (*_STATES_61[:5], "AbortedSaved", *_STATES_61[5:])
    return VersionApi(version=version, major=major, minor=minor, states=states)


# -- clone metadata in extra data ----------------------------------------------------------------


@dataclass(frozen=True)
class CloneMeta:
    pool: str
    image: str
    version: int
    slot: int
    mode: CloneMode
    display: Endpoint

    def extra_data(self) -> dict[str, str]:
        return {
            EXTRA_PREFIX + "pool": self.pool,
            EXTRA_PREFIX + "image": self.image,
            EXTRA_PREFIX + "version": str(self.version),
            EXTRA_PREFIX + "slot": str(self.slot),
            EXTRA_PREFIX + "mode": self.mode.value,
            EXTRA_PREFIX + "display": str(self.display),
        }


EXTRA_KEYS = tuple(CloneMeta("p", "i", 1, 0, CloneMode.LINKED, Endpoint("h", 1)).extra_data())


def parse_meta(extra: Mapping[str, str]) -> CloneMeta | None:
    """The clone's metadata, or None when the machine is not a complete imagepipe clone."""
    try:
        host, _, port = extra[EXTRA_PREFIX + "display"].rpartition(":")
        return CloneMeta(
            pool=extra[EXTRA_PREFIX + "pool"],
            image=extra[EXTRA_PREFIX + "image"],
            version=int(extra[EXTRA_PREFIX + "version"]),
            slot=int(extra[EXTRA_PREFIX + "slot"]),
            mode=CloneMode(extra[EXTRA_PREFIX + "mode"]),
            display=Endpoint(host.strip("[]"), int(port)),
        )
    except (KeyError, ValueError):
        return None


def pool_group(pool: str) -> str:
    return f"{GROUP_ROOT}/{pool}"


def base_vm_name(image: str, version: int) -> str:
    return f"imagepipe-{image}-v{version}"


def dmi_extra_data(name: str, image: str, version: int, *, efi: bool) -> dict[str, str]:
    """Extra data that makes the machine's firmware tell its guest the machine's name in the
    SMBIOS system table, as libvirt's <sysinfo> does: vendor `imagepipe`, product = the name,
    version = image and version (the tiny guest shows them; /sys/class/dmi/id on Linux). An EFI
    machine's firmware reads them under efi/0, a BIOS one under pcbios/0; `string:` keeps a
    value of digits a string (VirtualBox refuses to start with VERR_CFGM_NOT_STRING)."""
    device = "efi" if efi else "pcbios"
    prefix = f"VBoxInternal/Devices/{device}/0/Config/"
    return {
        prefix + "DmiSystemVendor": "string:imagepipe",
        prefix + "DmiSystemProduct": f"string:{name}",
        prefix + "DmiSystemVersion": f"string:{image} v{version}",
    }


def memory_mb(memory: int) -> int:
    """A clone's memory in MiB from the pool's bytes (VirtualBox wants at least 4)."""
    return max(memory // 1024**2, 4)


# -- guest properties ------------------------------------------------------------------------------


def parse_users(users_list: str, count: str = "") -> tuple[str, ...]:
    """Users from /VirtualBox/GuestInfo/OS/LoggedInUsersList ("alice,bob"), the value the
    Guest Additions' VBoxService writes; an empty list with a count of 0 is nobody."""
    if count.strip() == "0":
        return ()
    return tuple(sorted({u.strip() for u in users_list.split(",") if u.strip()}))


def is_session_property(name: str) -> bool:
    return name.startswith(PROP_VRDP_PREFIX) or name in (PROP_USERS_LIST, PROP_USERS, PROP_NO_USERS)


# -- instant desktops: warm parents ---------------------------------------------------------------

PARENT_PREFIX = "imagepipe-warm-"  # a parent machine's name: this and its fingerprint's start
PARENT_GROUP = "/imagepipe-warm"  # outside GROUP_ROOT/: a parent is never listed as a clone
PARENT_SNAPSHOT = "imagepipe-warm"  # the parent's online snapshot (memory saved) clones link to
PARENT_KEY = EXTRA_PREFIX + "warm-parent"  # extra data on a parent: its key's fingerprint
PARENT_IMAGE = EXTRA_PREFIX + "warm-image"  # and its image and version (to retire it)
PARENT_VERSION = EXTRA_PREFIX + "warm-version"
PROP_STARTED_BY = "/imagepipe/started-by"  # restore | boot: how the running guest started
PROP_IDENTITY = "/imagepipe/identity/hostname"  # ClonePrep: the name a restored guest takes


def warm_key(
    *,
    image: str,
    version: int,
    cpus: int,
    memory_mb: int,
    base_vm_id: str,
    base_snapshot_id: str,
    virtualbox: str,
) -> WarmKey:
    """The key of the warm parent a clone can start from: the image version's base VM and
    snapshot (by id: a rebuilt version is a new snapshot), the machine shape, and the
    VirtualBox version that saves and restores the state."""
    parts = [image, str(version), str(cpus), str(memory_mb), base_vm_id, base_snapshot_id]
    digest = fingerprint([*parts, virtualbox])
    return WarmKey(image, version, cpus, memory_mb * 1024, digest, PARENT_PREFIX)


def started_by(value: str) -> StartMode | None:
    """The clone's /imagepipe/started-by guest property, read back."""
    try:
        return StartMode(value)
    except ValueError:
        return None
