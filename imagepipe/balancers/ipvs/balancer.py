"""IPVS (the Linux kernel's load balancer) as imagepipe's balancer, driven with `ipvsadm`.

One virtual service (balancer.vip:port). Each ready desktop is a real server with weight 1
and upper threshold 1 (`-x 1`: one desktop never gets two users); drain is weight 0 (open
sessions stay, no new user). Everything — which desktops are in, their weights, their
connection counts — is read back from the kernel on every call, so nothing is kept only in
this process. The kernel has no place for a name, so the names imagepipe gives its real
servers are kept in a small file on the director (`name address:port [base]` lines), written
through the same runner; a real server nobody named is listed as `ipvs-<address>-<port>`.

Each backend's session counter is its real server's Conns (`ipvsadm -L --stats`, a second
call per list: `--stats` replaces the Weight and ActiveConn columns). A real server removed
and added again while its old connections linger (TIME_WAIT, up to 2 minutes) comes back
from the kernel's trash with its old counters; enable() therefore adds a real server at
weight 0, reads its Conns, keeps them as the name's `base` and only then makes it ready, so
a backend imagepipe adds counts from 0 as the Balancer port says.

Every command goes through one CommandRunner (imagepipe.balancers.ipvs.runner): LocalRunner
on a real director; in the tests, an agent inside a QEMU machine running Debian's kernel.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass

from imagepipe.balancers.addresses import resolve_ip
from imagepipe.balancers.ipvs.parse import (
    NAME,
    Forward,
    Named,
    RealServer,
    VirtualService,
    format_endpoint,
    parse_list,
    parse_named,
    parse_stats,
    render_names,
    same_endpoint,
    stray_name,
)
from imagepipe.balancers.ipvs.runner import CommandResult, CommandRunner, LocalRunner
from imagepipe.errors import (
    BackendInUseError,
    BackendNotFoundError,
    BadInputError,
    BalancerError,
    EnvironmentMissingError,
)
from imagepipe.log import fields
from imagepipe.pool.model import Backend, BackendState, Endpoint

log = logging.getLogger(__name__)

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
UPPER_THRESHOLD = 1  # -x 1: a desktop with a connection takes no other

# What the kernel must be told for imagepipe's drain rule (see docs/ipvs.md):
# - expire_nodest_conn=1: once a desktop is removed, its leftover connection entries
#   (InActConn lingering in FIN_WAIT/TIME_WAIT for up to 2 minutes) are expired at once
#   instead of black-holing a reconnecting client or keeping the desktop "busy" when it
#   comes back after a reset;
# - expire_quiescent_template=0: with persistence, a drained (weight 0) desktop still takes
#   its own returning user through the persistence template, like HAProxy's drain; new
#   users never reach it (the scheduler skips weight 0).
SYSCTLS = {
    "net.ipv4.vs.expire_nodest_conn": "1",
    "net.ipv4.vs.expire_quiescent_template": "0",
}


@dataclass(frozen=True)
class _Entry:
    name: str
    server: RealServer
    base: int = 0  # the real server's Conns when imagepipe added it


class IPVSBalancer:
    """Implements imagepipe.pool.ports.Balancer on one IPVS virtual service."""

    def __init__(
        self,
        *,
        vip: str,
        port: int = 3389,
        scheduler: str = "wlc",
        forward: Forward = Forward.MASQ,
        persistence: int = 0,
        names_file: str | None = None,
        set_sysctls: bool = True,
        runner: CommandRunner | None = None,
    ) -> None:
        try:
            ip = ipaddress.ip_address(vip.strip("[]"))
        except ValueError:
            raise BalancerError(f"IPVS vip {vip!r} is not an IP address") from None
        if scheduler not in SCHEDULERS:
            raise BalancerError(
                f"unknown IPVS scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        self.vip = Endpoint(str(ip), port)
        self.scheduler = scheduler
        self.forward = forward
        self.persistence = persistence
        self.names_file = names_file or default_names_file(self.vip)
        self.set_sysctls = set_sysctls
        self.runner: CommandRunner = runner or LocalRunner()
        self._service = ["-t", format_endpoint(self.vip)]
        self._closed = False
        self._lock = threading.Lock()  # one read-modify-write of the names file at a time

    # -- Balancer port ---------------------------------------------------------------------

    def ensure_frontend(self) -> None:
        """Create the virtual service, or bring its scheduler and persistence back to the
        settings; set the sysctls the drain rule needs. Cheap when all is right already."""
        self._check_open()
        service = self._read_service()
        if service is None:
            self._ipvsadm("-A", *self._service, *self._service_options())
            log.info(
                "ipvs virtual service created",
                extra=fields(vip=str(self.vip), scheduler=self.scheduler),
            )
        elif (service.scheduler, service.persistence) != (self.scheduler, self.persistence):
            self._ipvsadm("-E", *self._service, *self._service_options())
            log.info(
                "ipvs virtual service changed",
                extra=fields(
                    vip=str(self.vip),
                    scheduler=f"{service.scheduler}->{self.scheduler}",
                    persistence=f"{service.persistence}->{self.persistence}",
                ),
            )
        if self.set_sysctls:
            self._ensure_sysctls()

    def list_backends(self) -> list[Backend]:
        """Every real server of the virtual service; connections = ActiveConn (established).
        InActConn (closing, TIME_WAIT) is left out: it must not keep a desktop from being
        removed for the two minutes IPVS keeps those entries."""
        self._check_open()
        entries = self._entries()
        conns = self._conns() if entries else {}
        return [
            Backend(
                e.name,
                e.server.address,
                BackendState.DRAIN if e.server.weight == 0 else BackendState.READY,
                e.server.active,
                sessions_total=_since_added(conns.get(format_endpoint(e.server.address)), e.base),
            )
            for e in entries
        ]

    def enable(self, name: str, address: Endpoint) -> None:
        self._check_open()
        with self._lock:  # the executor runs actions on different clones at once
            self._enable(name, address)

    def _enable(self, name: str, address: Endpoint) -> None:
        _check_name(name)
        target = self._real_address(address)
        names = self._read_names()
        entries = self._entries(names)
        moved = [
            e for e in entries if e.name == name and not same_endpoint(e.server.address, target)
        ]
        here = next((e for e in entries if same_endpoint(e.server.address, target)), None)
        # The name first: a real server is never in the kernel without it (it would show up
        # as a stray for one pass).
        base = 0
        if here is not None:  # its counter so far, unless it already was this backend's
            base = here.base if here.name == name else self._conns().get(format_endpoint(target), 0)
        names = self._write_names(
            names, entries, add=(name, target, base), drop={e.name for e in moved}
        )
        for old in moved:
            self._delete(old.server.address)
            log.info("backend moved", extra=fields(clone=name, old=str(old.server.address)))
        if here is None and self._add_quiet(target):
            # back from the kernel's trash with old counters? they are not this backend's
            base = self._conns().get(format_endpoint(target), 0)
            if base:
                entries = self._entries(names)
                self._write_names(names, entries, add=(name, target, base))
            log.info("backend added", extra=fields(clone=name, address=str(target)))
        self._ipvsadm(
            "-e", *self._service, "-r", format_endpoint(target), self.forward.flag,
            "-w", "1", "-x", str(UPPER_THRESHOLD),
        )  # fmt: skip
        if here is not None and here.server.weight == 0:
            log.info("backend ready", extra=fields(clone=name, was="drain"))

    def _add_quiet(self, target: Endpoint) -> bool:
        """Add the real server at weight 0 (no user yet); False when it was there already."""
        args = ["-a", *self._service, "-r", format_endpoint(target), self.forward.flag]
        args += ["-w", "0", "-x", str(UPPER_THRESHOLD)]
        added = self._run(*args)
        if "Service not defined" in added.stderr:
            self.ensure_frontend()
            added = self._run(*args)
        if added.ok:
            return True
        if "already exists" not in added.stderr:
            raise _failed(added)
        return False

    def drain(self, name: str) -> None:
        self._check_open()
        with self._lock:  # the executor runs actions on different clones at once
            self._drain(name)

    def _drain(self, name: str) -> None:
        _check_name(name)
        entry = self._find(name)
        if entry is None:
            raise BackendNotFoundError(f"no backend {name} in IPVS service {self.vip}")
        if entry.server.weight != 0:
            self._set_weight(entry.server, 0)
            log.info("backend draining", extra=fields(clone=name))

    def remove(self, name: str) -> None:
        self._check_open()
        with self._lock:  # the executor runs actions on different clones at once
            self._remove(name)

    def _remove(self, name: str) -> None:
        _check_name(name)
        names = self._read_names()
        entry = next((e for e in self._entries(names) if e.name == name), None)
        if entry is None:
            if name in names:
                self._write_names(names, self._entries(names), drop={name})
            return
        if entry.server.active:
            raise BackendInUseError(
                f"backend {name} still has {entry.server.active} connection(s): drain it and "
                "remove it once they have ended"
            )
        if entry.server.weight != 0:  # no new connection between the check and the delete
            self._set_weight(entry.server, 0)
            again = self._find(name)
            if again is not None and again.server.active:
                self._set_weight(entry.server, entry.server.weight)
                raise BackendInUseError(
                    f"backend {name} got a connection while being removed: it stays ready; "
                    "remove it once the connection has ended"
                )
        self._delete(entry.server.address)
        self._write_names(names, self._entries(names), drop={name})
        log.info("backend removed", extra=fields(clone=name, lingering=entry.server.inactive))

    def close(self) -> None:
        """Nothing stays open between calls; the kernel keeps the table."""
        self._closed = True

    # -- internals -------------------------------------------------------------------------

    def _service_options(self) -> list[str]:
        options = ["-s", self.scheduler]
        if self.persistence:
            options += ["-p", str(self.persistence)]
        return options

    def _read_service(self) -> VirtualService | None:
        result = self._run("-L", "-n", "--exact", *self._service)
        if not result.ok:
            if "No such service" in result.stderr:
                return None
            raise _failed(result)
        services = parse_list(result.stdout)
        return services[0] if services else None

    def _entries(self, names: dict[str, Named] | None = None) -> list[_Entry]:
        service = self._read_service()
        if service is None:
            return []
        names = self._read_names() if names is None else names
        by_address = {format_endpoint(n.address): (name, n.base) for name, n in names.items()}
        entries = []
        for server in service.real_servers:
            name, base = by_address.get(format_endpoint(server.address), (None, 0))
            entries.append(_Entry(name or stray_name(server.address), server, base))
        return sorted(entries, key=lambda e: e.name)

    def _conns(self) -> dict[str, int]:
        """Each real server's Conns (connections scheduled to it), by address."""
        result = self._run("-L", "-n", "--exact", "--stats", *self._service)
        if not result.ok:
            if "No such service" in result.stderr:
                return {}
            raise _failed(result)
        return {
            format_endpoint(address): conns
            for service in parse_stats(result.stdout)
            for address, conns in service.real_servers
        }

    def _find(self, name: str) -> _Entry | None:
        return next((e for e in self._entries() if e.name == name), None)

    def _set_weight(self, server: RealServer, weight: int) -> None:
        self._ipvsadm(
            "-e", *self._service, "-r", format_endpoint(server.address), server.forward.flag,
            "-w", str(weight), "-x", str(UPPER_THRESHOLD),
        )  # fmt: skip

    def _delete(self, address: Endpoint) -> None:
        result = self._run("-d", *self._service, "-r", format_endpoint(address))
        if not result.ok and "No such destination" not in result.stderr:
            raise _failed(result)

    def _real_address(self, address: Endpoint) -> Endpoint:
        target = resolve_ip(address)
        if self.forward is not Forward.MASQ and target.port != self.vip.port:
            raise BalancerError(
                f"desktop {address} listens on port {target.port}, but with IPVS forwarding "
                f"{self.forward.value} a real server takes the VIP's port {self.vip.port}: use "
                "forward: masq, or make the desktops listen on the VIP's port"
            )
        return target

    def _read_names(self) -> dict[str, Named]:
        result = self.runner.run(["cat", self.names_file])
        if not result.ok:
            if "No such file" in result.stderr:
                return {}
            raise _failed(result)
        return parse_named(result.stdout)

    def _write_names(
        self,
        names: dict[str, Named],
        entries: list[_Entry],
        *,
        add: tuple[str, Endpoint, int] | None = None,
        drop: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, Named]:
        """Keep only names of real servers the kernel has (plus `add`: name, address,
        counter base), minus `drop`. Returns what the file now holds."""
        present = {format_endpoint(e.server.address) for e in entries}
        kept = {
            n: a
            for n, a in names.items()
            if format_endpoint(a.address) in present and n not in drop
        }
        if add is not None:
            name, address, base = add
            kept = {n: a for n, a in kept.items() if not same_endpoint(a.address, address)}
            kept[name] = Named(address, base)
        if kept == names:
            return kept
        script = 'mkdir -p -- "${1%/*}" && cat >"$1.tmp" && mv -f -- "$1.tmp" "$1"'
        result = self.runner.run(
            ["sh", "-c", script, "sh", self.names_file], stdin=render_names(kept)
        )
        if not result.ok:
            raise BalancerError(
                f"cannot write the IPVS backend names file {self.names_file}: {result.describe()}"
            )
        return kept

    def _ensure_sysctls(self) -> None:
        keys = list(SYSCTLS)
        result = self.runner.run(["sysctl", "-n", *keys])
        values = result.stdout.split()
        if result.ok and values == [SYSCTLS[k] for k in keys]:
            return
        wrote = self.runner.run(["sysctl", "-w", *(f"{k}={v}" for k, v in SYSCTLS.items())])
        if not wrote.ok:
            raise EnvironmentMissingError(
                f"cannot set the IPVS sysctls ({wrote.describe()}): run as root on the "
                "director, or set them yourself ("
                + ", ".join(f"{k}={v}" for k, v in SYSCTLS.items())
                + ") and balancer.ipvs_sysctls: false"
            )
        log.info(
            "ipvs sysctls set", extra=fields(**{k.rsplit(".", 1)[1]: v for k, v in SYSCTLS.items()})
        )

    def _ipvsadm(self, *args: str) -> CommandResult:
        result = self._run(*args)
        if not result.ok:
            raise _failed(result)
        return result

    def _run(self, *args: str) -> CommandResult:
        result = self.runner.run(["ipvsadm", *args])
        if result.returncode == 127:
            raise EnvironmentMissingError(
                "ipvsadm is not installed on the director: run `apt-get install ipvsadm`"
            )
        if "Protocol not available" in result.stderr or "Can't initialize ipvs" in result.stderr:
            raise EnvironmentMissingError(
                "this kernel has no IPVS: run `modprobe ip_vs` (a kernel with CONFIG_IP_VS), "
                "or choose balancer.driver: haproxy"
            )
        if "Permission denied" in result.stderr or "Operation not permitted" in result.stderr:
            raise EnvironmentMissingError(
                "ipvsadm needs root (CAP_NET_ADMIN): run the keeper as root on the director"
            )
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise BalancerError("the IPVS balancer was closed; build a new one")


def default_names_file(vip: Endpoint) -> str:
    host = vip.host.replace(":", "_")
    return f"/var/lib/imagepipe/ipvs-{host}-{vip.port}.names"


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise BadInputError(
            f"backend name {name!r}: use letters, digits, '.', '_' and '-' (at most 63)"
        )


def _since_added(conns: int | None, base: int) -> int | None:
    """A real server's sessions since imagepipe added it. Conns below the base: the kernel
    made it afresh (the director restarted, somebody re-added it): Conns is the count."""
    if conns is None:
        return None
    return conns - base if conns >= base else conns


def _failed(result: CommandResult) -> BalancerError:
    return BalancerError(f"IPVS: {result.describe()}")
