"""libvirt's errors as imagepipe's typed errors: what the executor may retry, and which ones
mean the connection to libvirtd itself is gone (HypervisorUnavailableError). Pure: no libvirt
import; shared by every module that talks to libvirt."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from imagepipe.errors import (
    BusyError,
    CloneNotFoundError,
    FatalHypervisorError,
    HypervisorError,
    HypervisorUnavailableError,
    InvalidStateError,
)

# libvirt error codes (virErrorNumber, stable ABI)
ERR_INTERNAL = 1
ERR_NO_CONNECT = 5
ERR_INVALID_CONN = 6
ERR_SYSTEM = 38
ERR_RPC = 39
ERR_NO_DOMAIN = 42
ERR_OPERATION_INVALID = 55
ERR_OPERATION_TIMEOUT = 68
ERR_AGENT_UNRESPONSIVE = 86
ERR_RESOURCE_BUSY = 87
# where an error comes from (virErrorDomain): the client's RPC layer and remote driver, that
# is the connection to libvirtd itself, not anything libvirtd did
FROM_RPC, FROM_REMOTE = 7, 13
_CONNECTION_ERRORS = (ERR_INTERNAL, ERR_NO_CONNECT, ERR_INVALID_CONN, ERR_SYSTEM, ERR_RPC)


def error_for(code: int, message: str, subject: str, domain: int = 0) -> HypervisorError:
    """The imagepipe error for a libvirt error code (and the part of libvirt that raised it,
    `domain`): what the executor may retry."""
    text = f"{subject}: {message}"
    if domain in (FROM_RPC, FROM_REMOTE) and code in _CONNECTION_ERRORS:
        return HypervisorUnavailableError(
            f"{subject}: the connection to libvirtd was lost ({message}); retried once "
            "libvirtd answers again"
        )
    if code == ERR_NO_DOMAIN:
        return CloneNotFoundError(f"{subject} does not exist on this host")
    if code in (ERR_OPERATION_TIMEOUT, ERR_RESOURCE_BUSY) or "state change lock" in message:
        return BusyError(f"{text} (libvirt is busy with this domain; retry later)")
    if code == ERR_OPERATION_INVALID:
        return InvalidStateError(text)
    return FatalHypervisorError(text)


@contextlib.contextmanager
def translated(libvirt: Any, subject: str) -> Iterator[None]:
    """Raise libvirt's errors inside the block as imagepipe's (error_for)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise error_of(exc, subject) from exc


def error_of(exc: Any, subject: str) -> HypervisorError:
    """error_for() of a libvirtError."""
    return error_for(
        exc.get_error_code() or 0,
        exc.get_error_message() or str(exc),
        subject,
        exc.get_error_domain() or 0,
    )


def connection_lost(exc: Any) -> bool:
    """Whether a libvirtError says the connection to libvirtd is gone (not the domain's
    or the guest's fault): such an error must never read as "no agent" or "no users"."""
    return isinstance(error_of(exc, ""), HypervisorUnavailableError)


# what libvirt says when the guest agent is not there at all (its channel is not connected,
# or it failed): the same code as a reply that did not come in time ("Guest agent not
# available for now"), another message
_AGENT_ABSENT = ("is not connected", "not available due to an error")


def agent_late(code: int, message: str) -> bool:
    """Whether a failed guest agent command means its reply did not come in time (or the
    domain's job was busy): the answer is unknown. False for an agent that is not there and
    for a definite error reply, which both mean "no"."""
    if code == ERR_AGENT_UNRESPONSIVE:
        return not any(text in message for text in _AGENT_ABSENT)
    return code == ERR_OPERATION_TIMEOUT or "state change lock" in message
