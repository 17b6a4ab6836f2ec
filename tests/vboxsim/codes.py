"""VirtualBox constants the simulator answers with, as VirtualBox.xidl defines them.

Result codes are the xidl's <result> values (and the COM codes it uses); enum values are those
of the API version the simulated host runs: VirtualBox 7.0 inserted MachineState AbortedSaved
(5) after Aborted, so every later state moved up by one.
"""

from __future__ import annotations

E_ACCESSDENIED = 0x80070005
E_INVALIDARG = 0x80070057
E_FAIL = 0x80004005
VBOX_E_OBJECT_NOT_FOUND = 0x80BB0001
VBOX_E_INVALID_VM_STATE = 0x80BB0002
VBOX_E_VM_ERROR = 0x80BB0003
VBOX_E_FILE_ERROR = 0x80BB0004
VBOX_E_IPRT_ERROR = 0x80BB0005
VBOX_E_INVALID_OBJECT_STATE = 0x80BB0007
VBOX_E_INVALID_SESSION_STATE = 0x80BB000B
VBOX_E_OBJECT_IN_USE = 0x80BB000C


class SimCOMError(Exception):
    """What the XPCOM bindings raise: an exception with `errno` (signed, as xpcom gives it)
    and `msg`. pyvbox masks errno with 0xFFFFFFFF and maps it to its VBoxError classes."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = code - (1 << 32) if code >= (1 << 31) else code
        self.msg = msg


_STATES_61 = [
    "Null", "PoweredOff", "Saved", "Teleported", "Aborted", "Running", "Paused", "Stuck",
    "Teleporting", "LiveSnapshotting", "Starting", "Stopping", "Saving", "Restoring",
    "TeleportingPausedVM", "TeleportingIn", "DeletingSnapshotOnline", "DeletingSnapshotPaused",
    "OnlineSnapshotting", "RestoringSnapshot", "DeletingSnapshot", "SettingUp", "Snapshotting",
]  # fmt: skip
_STATES_70 = [*_STATES_61[:5], "AbortedSaved", *_STATES_61[5:]]


def machine_states(version: str) -> dict[str, int]:
    names = _STATES_61 if int(version.split(".")[0]) < 7 else _STATES_70
    return {name: value for value, name in enumerate(names)}


# SessionState, LockType, SessionType, CleanupMode, CloneOptions (unchanged 6.1 -> 7.1)
SESSION_UNLOCKED, SESSION_LOCKED, SESSION_SPAWNING, SESSION_UNLOCKING = 1, 2, 3, 4
LOCK_SHARED, LOCK_WRITE, LOCK_VM = 1, 2, 3
SESSION_TYPE_NULL, SESSION_TYPE_WRITE, SESSION_TYPE_REMOTE, SESSION_TYPE_SHARED = 0, 1, 2, 3
CLEANUP_UNREGISTER_ONLY, CLEANUP_DETACH_NONE, CLEANUP_DETACH_HARD_DISKS, CLEANUP_FULL = 1, 2, 3, 4
CLONE_OPTION_LINK = 1
FIRMWARE_BIOS, FIRMWARE_EFI = 1, 2  # FirmwareType (IMachine in 6.1/7.0, IFirmwareSettings in 7.1)
MEDIUM_CREATED = 1
DEVICE_HARD_DISK = 3

# VBoxEventType
EVENT_ANY = 1
EVENT_MACHINE_EVENT = 3
EVENT_MACHINE_STATE_CHANGED = 32
EVENT_EXTRA_DATA_CHANGED = 34
EVENT_MACHINE_REGISTERED = 37
EVENT_SESSION_STATE_CHANGED = 38
EVENT_GUEST_PROPERTY_CHANGED = 42
EVENT_VRDE_SERVER_INFO_CHANGED = 61
MACHINE_EVENTS = frozenset(
    {
        EVENT_MACHINE_STATE_CHANGED,
        EVENT_EXTRA_DATA_CHANGED,
        EVENT_MACHINE_REGISTERED,
        EVENT_SESSION_STATE_CHANGED,
        EVENT_GUEST_PROPERTY_CHANGED,
    }
)
