"""HAProxy 2.6 runtime API: the commands imagepipe sends and the parsing of their replies.

Pure functions, parsed once into typed records. Reply texts are the ones HAProxy 2.6 prints
(see management.txt, "add server", "del server", "show servers state", "show stat").
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from imagepipe.balancers.haproxy.config import BACKEND, format_address
from imagepipe.errors import (
    BackendNotFoundError,
    BadInputError,
    BalancerError,
    EnvironmentMissingError,
)
from imagepipe.pool.model import Backend, BackendState, Endpoint

# srv_admin_state bits (management.txt, "show servers state")
ADMF_FMAINT = 0x01  # forced into maintenance (set server state maint, or a fresh dynamic server)
ADMF_IMAINT = 0x02  # maintenance inherited from a tracked server
ADMF_CMAINT = 0x04  # maintenance from the configuration ("disabled")
ADMF_FDRAIN = 0x08  # forced into drain (set server state drain)
ADMF_IDRAIN = 0x10  # drain inherited from a tracked server
ADMF_RMAINT = 0x20  # maintenance after an address resolution failure
MAINT_BITS = ADMF_FMAINT | ADMF_IMAINT | ADMF_CMAINT | ADMF_RMAINT
DRAIN_BITS = ADMF_FDRAIN | ADMF_IDRAIN

STAT_TYPE_SERVER = "2"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")

NO_SUCH_SERVER = "No such server."
PERMISSION_DENIED = "Permission denied"


@dataclass(frozen=True)
class ServerState:
    """One row of `show servers state <backend>`."""

    name: str
    address: Endpoint
    admin_state: int
    user_weight: int

    @property
    def state(self) -> BackendState:
        if self.admin_state & MAINT_BITS:
            return BackendState.MAINT
        if self.admin_state & DRAIN_BITS or self.user_weight == 0:
            return BackendState.DRAIN
        return BackendState.READY


@dataclass(frozen=True)
class ServerStat:
    """Connection counters of one server from `show stat` (CSV)."""

    name: str
    current: int  # scur: sessions open right now
    queued: int  # qcur: clients waiting for this server
    total: int = 0  # stot: sessions since the server was added (a runtime add starts at 0)


class AddOutcome(StrEnum):
    ADDED = "added"
    EXISTS = "exists"


class DelOutcome(StrEnum):
    DELETED = "deleted"
    MISSING = "missing"
    BUSY = "busy"  # connections still attached, or not in maintenance


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """A backend name HAProxy accepts and that cannot smuggle a second command."""
    if not _NAME.fullmatch(name):
        raise BadInputError(
            f"backend name {name!r} cannot be used with HAProxy: use letters, digits, '-', '_',"
            " '.' or ':' (at most 100)"
        )
    return name


def add_server(name: str, address: Endpoint) -> str:
    """Dynamic servers start in maintenance; follow with set_state(name, "ready")."""
    return f"add server {BACKEND}/{check_name(name)} {format_address(address)} maxconn 1"


def set_state(name: str, state: BackendState) -> str:
    return f"set server {BACKEND}/{check_name(name)} state {state.value}"


def set_address(name: str, address: Endpoint) -> str:
    host = address.host.strip("[]")
    return f"set server {BACKEND}/{check_name(name)} addr {host} port {address.port}"


def del_server(name: str) -> str:
    return f"del server {BACKEND}/{check_name(name)}"


SHOW_SERVERS_STATE = f"show servers state {BACKEND}"
SHOW_STAT = f"show stat {BACKEND} 4 -1"  # 4 = servers only, -1 = every server


# --------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------


def _text(reply: str) -> str:
    return reply.strip()


def check_common(command: str, reply: str) -> None:
    """Errors any command can get: a socket without admin level, an unknown backend."""
    text = _text(reply)
    if text.startswith(PERMISSION_DENIED):
        raise EnvironmentMissingError(
            f"HAProxy refused {' '.join(command.split()[:2])!r}: the admin socket needs "
            "'level admin' (stats socket <path> mode 600 level admin)"
        )
    if text in ("No such backend.", "No such proxy."):
        raise EnvironmentMissingError(
            f"HAProxy has no backend {BACKEND!r}: add 'backend {BACKEND}' with "
            "'balance leastconn' to its configuration, or let imagepipe manage HAProxy"
        )
    if text.startswith("Unknown command"):
        raise EnvironmentMissingError(
            f"HAProxy does not know {command!r}: imagepipe needs HAProxy 2.6 or newer"
        )


def check_empty(command: str, reply: str) -> None:
    """`set server ... state` prints nothing when it worked."""
    check_common(command, reply)
    text = _text(reply)
    if not text:
        return
    if text == NO_SUCH_SERVER:
        raise BackendNotFoundError(f"HAProxy has no backend server for {command!r}")
    raise BalancerError(f"HAProxy refused {command!r}: {text}")


def check_set_address(command: str, reply: str) -> None:
    """`set server ... addr` reports what it changed in words; errors are other words."""
    check_common(command, reply)
    text = _text(reply)
    if text == NO_SUCH_SERVER:
        raise BackendNotFoundError(f"HAProxy has no backend server for {command!r}")
    if text and "changed" not in text and "no need to change" not in text:
        raise BalancerError(f"HAProxy refused {command!r}: {text}")


def add_outcome(command: str, reply: str) -> AddOutcome:
    check_common(command, reply)
    text = _text(reply)
    if text == "New server registered.":
        return AddOutcome.ADDED
    if text.startswith("Already exists a server with the same name"):
        return AddOutcome.EXISTS
    raise BalancerError(f"HAProxy refused {command!r}: {text or 'no reply'}")


def del_outcome(command: str, reply: str) -> DelOutcome:
    check_common(command, reply)
    text = _text(reply)
    if text == "Server deleted.":
        return DelOutcome.DELETED
    if text == NO_SUCH_SERVER:
        return DelOutcome.MISSING
    if "still has connections" in text or "maintenance mode" in text:
        return DelOutcome.BUSY
    raise BalancerError(f"HAProxy refused {command!r}: {text or 'no reply'}")


def parse_servers_state(reply: str) -> list[ServerState]:
    """`show servers state` format 1: a version line, a '# ' header, rows split by spaces."""
    check_common(SHOW_SERVERS_STATE, reply)
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines or lines[0].strip() != "1":
        first = lines[0] if lines else "nothing"
        raise BalancerError(f"unexpected reply to {SHOW_SERVERS_STATE!r}: {first!r}")
    header: list[str] = []
    rows: list[ServerState] = []
    for line in lines[1:]:
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        values = dict(zip(header, line.split(), strict=False))
        try:
            rows.append(
                ServerState(
                    name=values["srv_name"],
                    address=Endpoint(values["srv_addr"], int(values["srv_port"])),
                    admin_state=int(values["srv_admin_state"]),
                    user_weight=int(values["srv_uweight"]),
                )
            )
        except (KeyError, ValueError) as exc:
            raise BalancerError(f"cannot read {SHOW_SERVERS_STATE!r} row {line!r}: {exc}") from None
    return rows


def parse_stat(reply: str) -> list[ServerStat]:
    """`show stat` CSV: a '# pxname,svname,...' header, then one row per proxy/server."""
    check_common(SHOW_STAT, reply)
    text = reply.strip()
    if not text.startswith("# "):
        raise BalancerError(f"unexpected reply to {SHOW_STAT!r}: {text[:80]!r}")
    reader = csv.DictReader(io.StringIO(text[2:]))
    stats: list[ServerStat] = []
    for row in reader:
        if row.get("pxname") != BACKEND or row.get("type") != STAT_TYPE_SERVER:
            continue
        stats.append(
            ServerStat(
                name=row["svname"],
                current=int(row.get("scur") or 0),
                queued=int(row.get("qcur") or 0),
                total=int(row.get("stot") or 0),
            )
        )
    return stats


def merge(states: Sequence[ServerState], stats: Sequence[ServerStat]) -> list[Backend]:
    """One Backend per server HAProxy has, with its connections (open + queued) and its
    session counter (stot; None for a server `show stat` did not list yet: added between
    the two commands)."""
    by_name = {s.name: s for s in stats}
    backends = []
    for s in states:
        stat = by_name.get(s.name)
        backends.append(
            Backend(
                name=s.name,
                address=s.address,
                state=s.state,
                connections=0 if stat is None else stat.current + stat.queued,
                sessions_total=None if stat is None else stat.total,
            )
        )
    return backends


SHOW_INFO = "show info"


def parse_info_pid(reply: str) -> int:
    """The `Pid:` line of `show info`."""
    check_common(SHOW_INFO, reply)
    for line in reply.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Pid" and value.strip().isdigit():
            return int(value.strip())
    raise BalancerError(f"{SHOW_INFO!r} did not report HAProxy's pid")
