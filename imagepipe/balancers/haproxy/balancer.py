"""HAProxy as imagepipe's load balancer: one TCP frontend, desktops added at run time.

Every state (ready, drain, maint) and connection count is read back from HAProxy through
its admin socket, so nothing is lost when the keeper restarts. With manage=True imagepipe
writes haproxy.cfg and starts (or restarts, or reloads) its own HAProxy; with manage=False
it only talks to an HAProxy someone else runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
from pathlib import Path

from imagepipe.balancers.addresses import resolve_ip
from imagepipe.balancers.haproxy import runtime as rt
from imagepipe.balancers.haproxy.admin_socket import AdminSocket, HAProxyDownError
from imagepipe.balancers.haproxy.config import (
    HAProxyConfig,
    Peer,
    check_balance,
    check_peers,
    check_persist,
    parse_bind,
    render_config,
)
from imagepipe.balancers.haproxy.process import HAProxyProcess
from imagepipe.errors import BackendInUseError, BalancerError, EnvironmentMissingError
from imagepipe.log import fields
from imagepipe.pool.model import Backend, BackendState, Endpoint

log = logging.getLogger(__name__)


class HAProxyBalancer:
    """Implements imagepipe.pool.ports.Balancer with HAProxy 2.6's runtime API."""

    def __init__(
        self,
        *,
        bind: str,
        admin_socket: Path,
        config_path: Path,
        pid_file: Path,
        manage: bool,
        balance: str = "leastconn",
        persist: str = "none",
        persist_expire: float = 8 * 3600.0,
        web_socket: Path | None = None,
        peers: tuple[Peer, ...] = (),
        local_peer: str | None = None,
        program: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.config = HAProxyConfig(
            bind=parse_bind(bind),
            admin_socket=admin_socket.absolute(),
            balance=check_balance(balance),
            persist=check_persist(persist),
            persist_expire=f"{max(1, round(persist_expire))}s",
            web_socket=None if web_socket is None else web_socket.absolute(),
            peers=peers,
            local_peer=local_peer,
        )
        check_peers(peers, local_peer)
        self.config_path = config_path.absolute()
        self.manage = manage
        self.admin = AdminSocket(self.config.admin_socket, timeout=timeout)
        self._program = program
        self._pid_file = pid_file.absolute()
        self._closed = False

    # -- Balancer port ---------------------------------------------------------------------

    def ensure_frontend(self) -> None:
        """Managed: write haproxy.cfg, start HAProxy if it is not answering, reload it if the
        configuration changed. Unmanaged: check that HAProxy answers and has the backend."""
        self._check_open()
        if self.manage:
            self._ensure_managed()
        else:
            self._check_unmanaged()

    def list_backends(self) -> list[Backend]:
        self._check_open()
        states = rt.parse_servers_state(self._send(rt.SHOW_SERVERS_STATE))
        stats = rt.parse_stat(self._send(rt.SHOW_STAT))
        return rt.merge(states, stats)

    def enable(self, name: str, address: Endpoint) -> None:
        self._check_open()
        rt.check_name(name)
        target = resolve_ip(address)
        current = self._find_state(name)
        if current is None:
            command = rt.add_server(name, target)
            if rt.add_outcome(command, self._send(command)) is rt.AddOutcome.EXISTS:
                current = self._find_state(name)
            else:
                log.info("backend added", extra=fields(clone=name, address=str(target)))
        if current is not None and not _same(current.address, target):
            command = rt.set_address(name, target)
            rt.check_set_address(command, self._send(command))
            log.info("backend address changed", extra=fields(clone=name, address=str(target)))
        self._set_state(name, BackendState.READY)
        if current is not None and current.state is not BackendState.READY:
            log.info("backend ready", extra=fields(clone=name, was=current.state.value))

    def drain(self, name: str) -> None:
        self._check_open()
        self._set_state(name, BackendState.DRAIN)
        log.info("backend draining", extra=fields(clone=name))

    def remove(self, name: str) -> None:
        self._check_open()
        rt.check_name(name)
        backend = next((b for b in self.list_backends() if b.name == name), None)
        if backend is None:
            return
        if backend.connections:
            raise BackendInUseError(
                f"backend {name} still has {backend.connections} connection(s): drain it and "
                "remove it once they have ended"
            )
        if backend.state is not BackendState.MAINT:
            self._set_state(name, BackendState.MAINT)
        command = rt.del_server(name)
        outcome = rt.del_outcome(command, self._send(command))
        if outcome is rt.DelOutcome.BUSY:
            if backend.state is not BackendState.MAINT:
                self._set_state(name, backend.state)
            raise BackendInUseError(
                f"backend {name} got a connection while being removed: it stays "
                f"{backend.state.value}; remove it once the connection has ended"
            )
        if outcome is rt.DelOutcome.DELETED:
            log.info("backend removed", extra=fields(clone=name))

    def close(self) -> None:
        """Nothing stays open between calls; HAProxy itself keeps running."""
        self._closed = True

    # -- for tests and `imagepipe` maintenance ---------------------------------------------

    def process(self) -> HAProxyProcess:
        """The managed HAProxy process (manage=True only)."""
        if not self.manage:
            raise BalancerError("this HAProxy is not managed by imagepipe (manage: false)")
        program = self._program or shutil.which("haproxy")
        if program is None:
            raise EnvironmentMissingError(
                "haproxy is not installed: run `apt-get install haproxy` (or ./install.sh), "
                "or choose another balancer driver"
            )
        return HAProxyProcess(
            program=program,
            config_path=self.config_path,
            pid_file=self._pid_file,
            admin=self.admin,
        )

    def shutdown(self) -> None:
        """Stop the managed HAProxy. Every session through it ends."""
        self.process().stop()

    # -- internals -------------------------------------------------------------------------

    def _ensure_managed(self) -> None:
        process = self.process()
        changed = self._write_config(render_config(self.config))
        if self.admin.answers():
            if changed:
                self._reload(process)
            return
        process.check_config()
        if process.pid() is not None:  # alive but deaf: replace it
            process.stop()
        pid = process.start()
        log.info("haproxy running", extra=fields(pid=pid, bind=str(self.config.bind)))

    def _reload(self, process: HAProxyProcess) -> None:
        """A new configuration: hand over to a new process and put the backends back."""
        process.check_config()
        backends = self.list_backends()
        old_pid = process.pid() or rt.parse_info_pid(self._send(rt.SHOW_INFO))
        process.reload(old_pid)
        for backend in backends:
            command = rt.add_server(backend.name, backend.address)
            rt.add_outcome(command, self._send(command))
            self._set_state(backend.name, backend.state)
        log.warning(
            "haproxy reloaded with a new configuration; sessions already open finish on the "
            "old process",
            extra=fields(old_pid=old_pid, backends=len(backends)),
        )

    def _check_unmanaged(self) -> None:
        try:
            rt.parse_stat(self._send(rt.SHOW_STAT))
        except HAProxyDownError:
            raise EnvironmentMissingError(
                f"no HAProxy answers on {self.admin.path}: start HAProxy with "
                f"'stats socket {self.admin.path} mode 600 level admin' in its global section, "
                "or set balancer.manage: true in imagepipe.yml"
            ) from None

    def _write_config(self, text: str) -> bool:
        """Write haproxy.cfg atomically; True when its content changed."""
        with contextlib.suppress(FileNotFoundError):
            if self.config_path.read_text() == text:
                return False
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)
        log.info("haproxy config written", extra=fields(path=str(self.config_path)))
        return True

    def _find_state(self, name: str) -> rt.ServerState | None:
        states = rt.parse_servers_state(self._send(rt.SHOW_SERVERS_STATE))
        return next((s for s in states if s.name == name), None)

    def _set_state(self, name: str, state: BackendState) -> None:
        command = rt.set_state(name, state)
        rt.check_empty(command, self._send(command))

    def _send(self, command: str) -> str:
        return self.admin.command(command)

    def _check_open(self) -> None:
        if self._closed:
            raise BalancerError("the HAProxy balancer was closed; build a new one")


def _same(a: Endpoint, b: Endpoint) -> bool:
    try:
        return ipaddress.ip_address(a.host) == ipaddress.ip_address(b.host) and a.port == b.port
    except ValueError:
        return a == b
