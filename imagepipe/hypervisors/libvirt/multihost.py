"""One pool over several libvirt hosts: the Hypervisor port plus pool.ports.Hosts.

    hv = MultiHostHypervisor(hosts, state_dir=..., checksums=lambda base: {...})
    hv.list_clones()     # every reachable host, observed in parallel; CloneInfo.host set
    hv.hosts()           # which hosts answered (and since when), versions held, uploads
                         # (this process's, or another's as the host's volumes show it)
    hv.ensure_version("host2", base)   # True once host2 holds it; starts the upload

After tidy_with(retired) (the keeper's: is this version pruned from the registry?), each host
is tidied at most every TIDY_EVERY seconds, in the background: a pruned version it holds is
removed, with the warm parents made from it, once no disk or domain there uses them
(volumes.retire_version).

A host that does not answer within `observe_timeout` (or whose connection is lost) is
reported lost by hosts(), and its clones are left out of list_clones(): they are not gone,
the host is not seen. When no host answers at all, list_clones() raises
HypervisorUnavailableError, as the single-host adapter does. create_clone goes to
`spec.host` ("" = the first host); every other call goes to the host the clone was last seen
on, or the one that has a domain of that name.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from imagepipe.errors import (
    BadInputError,
    CloneNotFoundError,
    FatalHypervisorError,
    HypervisorError,
    HypervisorUnavailableError,
    InvalidStateError,
)
from imagepipe.hypervisors.common import check_name
from imagepipe.hypervisors.libvirt.disks import disk_usable
from imagepipe.hypervisors.libvirt.remote import RemoteLibvirtHost
from imagepipe.log import fields
from imagepipe.pool.model import (
    BaseImage,
    CloneInfo,
    CloneSpec,
    Endpoint,
    GuestSession,
    HostSpec,
    HostState,
    HostUpload,
)
from imagepipe.pool.ports import HypervisorEvent, Subscription

log = logging.getLogger(__name__)

OBSERVE_TIMEOUT = 5.0  # seconds a host may take to list its clones before it counts as lost
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the hosts' connections to close
TIDY_EVERY = 600.0  # seconds between two tidies of one host's pruned versions
Checksums = Callable[[BaseImage], Mapping[str, str]]  # file name -> the registry's sha256
Retired = Callable[[str, int], bool]  # (image, version) -> pruned from the registry
T = TypeVar("T")
Holdings = tuple[list[CloneInfo], tuple[tuple[str, int], ...], tuple[HostUpload, ...]]


class _Subscriptions:
    """One subscriber's subscription on every host; a host added later joins it."""

    def __init__(
        self, callback: Callable[[HypervisorEvent], None], parts: dict[str, Subscription]
    ) -> None:
        self.callback = callback
        self.parts = parts
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for part in list(self.parts.values()):
            part.close()


class MultiHostHypervisor:
    """imagepipe.pool.ports.Hypervisor and Hosts over one RemoteLibvirtHost per host."""

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        *,
        state_dir: Path,
        checksums: Checksums,
        clock: Callable[[], float] = time.time,
        observe_timeout: float = OBSERVE_TIMEOUT,
    ) -> None:
        if not hosts:
            raise BadInputError("a multi-host hypervisor needs at least one host under hosts:")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise BadInputError(f"hosts: names must be unique, got {', '.join(names)}")
        self._clock = clock
        self._checksums = checksums
        self.observe_timeout = observe_timeout
        self._hosts = {
            h.name: RemoteLibvirtHost(h, state_dir=state_dir / h.name, clock=clock) for h in hosts
        }
        self._lock = threading.Lock()
        self._where: dict[str, str] = {}  # clone -> host it was last seen on
        self._connected: dict[str, bool] = dict.fromkeys(names, False)
        self._since: dict[str, float | None] = dict.fromkeys(names)
        self._versions: dict[str, tuple[tuple[str, int], ...]] = dict.fromkeys(names, ())
        self._uploads: dict[str, HostUpload] = {}  # host -> this process's upload under way
        self._seen_uploads: dict[str, tuple[HostUpload, ...]] = {}  # as the host shows them
        self._upload_done: dict[tuple[str, str, int], threading.Event] = {}
        self._upload_error: dict[tuple[str, str, int], Exception] = {}
        self._observing: dict[str, concurrent.futures.Future[Holdings]] = {}
        self._state_dir = state_dir
        self._subscriptions: list[_Subscriptions] = []
        self._retired: Retired | None = None  # tidy_with: the keeper's, never status's
        self._tidied: dict[str, float] = {}  # host -> when its last tidy began
        self._kept: dict[tuple[str, str, int], str] = {}  # why a pruned version stays: said once

    def _submit(self, kind: str, host: str, work: Callable[[], T]) -> concurrent.futures.Future[T]:
        """`work` in a daemon thread of its own: a call that hangs in libvirt (a host whose
        libvirtd stopped answering) holds up neither close() nor the process's exit, as a
        ThreadPoolExecutor's worker would (Python joins those at exit)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

        threading.Thread(target=run, name=f"{kind}-{host}", daemon=True).start()
        return future

    @property
    def names(self) -> list[str]:
        return list(self._hosts)

    def host(self, name: str) -> RemoteLibvirtHost:
        try:
            return self._hosts[name]
        except KeyError:
            raise FatalHypervisorError(
                f"no host named {name!r}; the hosts are {', '.join(self._hosts)}"
            ) from None

    # -- observation -------------------------------------------------------------------------

    def _observe(self, name: str) -> Holdings:
        host = self._hosts[name]
        return host.list_clones(), *host.holdings()

    def list_clones(self) -> list[CloneInfo]:
        with self._lock:
            for name in self._hosts:
                running = self._observing.get(name)
                if running is None or running.done():  # a hung host gets no second thread
                    self._observing[name] = self._submit(
                        "observe", name, functools.partial(self._observe, name)
                    )
            pending = dict(self._observing)
        done, _ = concurrent.futures.wait(pending.values(), timeout=self.observe_timeout)
        clones: list[CloneInfo] = []
        seen: set[str] = set()
        for name, future in pending.items():
            if future not in done:
                self._mark(name, False, f"no answer within {self.observe_timeout:g} s")
                continue
            try:
                found, versions, uploads = future.result()
            except HypervisorError as exc:
                self._mark(name, False, str(exc))
                continue
            self._mark(name, True, None)
            seen.add(name)
            with self._lock:
                self._versions[name] = versions
                self._seen_uploads[name] = uploads
            clones.extend(found)
            self._tidy_when_due(name)
        if not seen:
            raise HypervisorUnavailableError(
                f"no host answers ({', '.join(self._hosts)}); desktops keep running and the "
                "keeper tries every pass"
            )
        with self._lock:
            for clone, host in list(self._where.items()):
                if host in seen:
                    del self._where[clone]
            for info in clones:
                self._where[info.name] = info.host
        return sorted(clones, key=lambda c: (c.pool, c.slot))

    # -- pruned versions leave the hosts ------------------------------------------------------

    def tidy_with(self, retired: Retired) -> None:
        """Tidy the hosts from now on (the keeper): `retired` says which versions may go."""
        self._retired = retired

    def _tidy_when_due(self, name: str) -> None:
        if self._retired is None:
            return
        now = self._clock()
        with self._lock:
            if now - self._tidied.get(name, -TIDY_EVERY) < TIDY_EVERY:
                return
            self._tidied[name] = now
        self._submit("tidy", name, functools.partial(self.tidy, name))

    def tidy(self, name: str) -> list[str]:
        """Remove from host `name` every version the registry has pruned (and the warm
        parents made from it), unless something there still uses it; a version left half
        removed is finished. Returns the volumes removed; what stays, and why, is said once."""
        assert self._retired is not None
        removed: list[str] = []
        try:
            stored = self._hosts[name].stored_versions()
        except (HypervisorError, KeyError) as exc:
            log.warning(
                "host not tidied; tried again later", extra=fields(host=name, error=str(exc))
            )
            return removed
        for image, version in stored:
            try:
                if not self._retired(image, version):
                    continue
                gone, kept = self._hosts[name].retire(image, version)
            except (HypervisorError, BadInputError, KeyError) as exc:
                log.warning(
                    "pruned version not removed from host; tried again later",
                    extra=fields(host=name, image=image, version=version, error=str(exc)),
                )
                continue
            removed += gone
            if gone:
                log.info(
                    "pruned version removed from host",
                    extra=fields(host=name, image=image, version=version, volumes=len(gone)),
                )
            elif kept and self._kept.get((name, image, version)) != kept:
                log.info(
                    "pruned version kept on host while in use",
                    extra=fields(host=name, image=image, version=version, reason=kept),
                )
            self._kept[(name, image, version)] = kept
        if removed:
            held = self._hosts[name].versions()
            with self._lock:
                if name in self._versions:
                    self._versions[name] = held
        return removed

    def _mark(self, name: str, connected: bool, why: str | None) -> None:
        with self._lock:
            if name not in self._connected:  # removed by set_hosts meanwhile
                return
            if self._connected[name] == connected and self._since[name] is not None:
                return
            self._connected[name] = connected
            self._since[name] = self._clock()
        if connected:
            log.info("host connected", extra=fields(host=name))
        else:
            log.warning(
                "host lost; its desktops are kept as they were, not deleted",
                extra=fields(host=name, reason=why),
            )

    def hosts(self) -> list[HostState]:
        with self._lock:
            return [
                HostState(
                    name=name,
                    connected=self._connected[name],
                    since=self._since[name],
                    versions=self._versions[name],
                    upload=self._uploads.get(name)
                    or next(iter(self._seen_uploads.get(name, ())), None),
                )
                for name in self._hosts
            ]

    # -- versions on hosts -------------------------------------------------------------------

    def ensure_version(self, host: str, base: BaseImage) -> bool:
        self.host(host)
        with self._lock:
            if (base.image, base.version) in self._versions[host]:
                return True
        self._start_upload(host, base)
        return False

    def _start_upload(self, host: str, base: BaseImage) -> threading.Event:
        key = (host, base.image, base.version)
        with self._lock:
            event = self._upload_done.get(key)
            if event is not None:
                return event
            event = self._upload_done[key] = threading.Event()
            self._uploads[host] = HostUpload(base.image, base.version, 0, 0, self._clock())
        self._submit("upload", host, functools.partial(self._upload, host, base, event))
        return event

    def _upload(self, host: str, base: BaseImage, event: threading.Event) -> None:
        key = (host, base.image, base.version)

        def progress(sent: int, total: int) -> None:
            with self._lock:
                since = self._uploads[host].since if host in self._uploads else self._clock()
                self._uploads[host] = HostUpload(base.image, base.version, sent, total, since)

        try:
            self._hosts[host].upload(base, self._checksums(base), progress)
            versions = self._hosts[host].versions()
            with self._lock:
                self._versions[host] = versions
        except Exception as exc:  # reported to the waiter; retried by the next ensure_version
            log.warning(
                "image upload failed",
                extra=fields(host=host, image=base.image, version=base.version, error=str(exc)),
            )
            self._upload_error[key] = exc
        finally:
            with self._lock:
                self._uploads.pop(host, None)
                self._upload_done.pop(key, None)
                self._seen_uploads[host] = tuple(
                    u
                    for u in self._seen_uploads.get(host, ())
                    if (u.image, u.version) != (base.image, base.version)
                )
            event.set()

    def _upload_now(self, host: str, base: BaseImage) -> None:
        """Upload the version to `host` and wait for it (create_clone on a host without it)."""
        key = (host, base.image, base.version)
        self._upload_error.pop(key, None)
        self._start_upload(host, base).wait()
        error = self._upload_error.pop(key, None)
        if error is not None:
            raise error

    # -- the port ----------------------------------------------------------------------------

    def base_ready(self, base: BaseImage) -> bool:
        if base.disk is None or base.vm is not None:
            return False
        for extra in (base.kernel, base.initrd):
            if extra is not None and not (base.directory / extra).is_file():
                return False
        return disk_usable(base.directory / base.disk)

    def create_clone(self, spec: CloneSpec) -> CloneInfo:
        name = check_name(spec.name)
        host_name = spec.host or next(iter(self._hosts))
        host = self.host(host_name)
        if spec.base.disk is not None:
            local = spec.base.directory / spec.base.disk
            if local.is_file() and not disk_usable(local):
                raise InvalidStateError(
                    f"base image {spec.base.image} v{spec.base.version} is running or "
                    f"incomplete ({local} is locked by a VM or not a disk image); clones are "
                    "made only from a powered-off base: wait for the build or stop the base VM"
                )
            if (
                not host.has_domain(name)
                and (spec.base.image, spec.base.version) not in host.versions()
            ):
                self._upload_now(host_name, spec.base)
        info = host.create_clone(spec)
        with self._lock:
            self._where[name] = host_name
        return info

    def _find(self, name: str) -> RemoteLibvirtHost | None:
        """The host of clone `name` (None: no host has it); HypervisorUnavailableError when
        it is on no reachable host and some host cannot be asked."""
        check_name(name)
        with self._lock:
            known = self._where.get(name)
        if known is not None:
            return self._hosts[known]
        unreachable = []
        for host_name, host in self._hosts.items():
            try:
                if host.has_domain(name):
                    with self._lock:
                        self._where[name] = host_name
                    return host
            except HypervisorUnavailableError:
                unreachable.append(host_name)
        if unreachable:
            raise HypervisorUnavailableError(
                f"clone {name} is on no reachable host, and {', '.join(unreachable)} cannot "
                "be asked; retried once they answer"
            )
        return None

    def _on(self, name: str) -> RemoteLibvirtHost:
        host = self._find(name)
        if host is None:
            raise CloneNotFoundError(f"clone {name} does not exist on any host")
        return host

    def start(self, name: str) -> None:
        self._on(name).start(name)

    def stop(self, name: str, timeout: float) -> None:
        self._on(name).stop(name, timeout)

    def reset(self, name: str) -> None:
        self._on(name).reset(name)

    def suspend(self, name: str) -> None:
        self._on(name).suspend(name)

    def resume(self, name: str) -> None:
        self._on(name).resume(name)

    def delete(self, name: str) -> None:
        host = self._find(name)
        if host is None:
            return
        host.delete(name)
        with self._lock:
            self._where.pop(name, None)

    def display(self, name: str) -> Endpoint | None:
        return self._on(name).display(name)

    def sessions(self, name: str) -> GuestSession:
        return self._on(name).sessions(name)

    def notify_users(self, name: str, text: str) -> None:
        self._on(name).notify_users(name, text)

    def subscribe(self, callback: Callable[[HypervisorEvent], None]) -> Subscription:
        with self._lock:
            hosts = dict(self._hosts)
        subscription = _Subscriptions(
            callback, {name: host.subscribe(callback) for name, host in hosts.items()}
        )
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    # -- a reload of `hosts:` ------------------------------------------------------------

    def set_hosts(self, hosts: Sequence[HostSpec]) -> None:
        """imagepipe.pool.ports.HostList: the running keeper's new host list."""
        names = [h.name for h in hosts]
        if not hosts or len(set(names)) != len(names):
            raise BadInputError(f"hosts: need at least one host, each named once; got {names}")
        closing: list[RemoteLibvirtHost] = []
        with self._lock:
            old = self._hosts
            new: dict[str, RemoteLibvirtHost] = {}
            added = []
            for spec in hosts:
                kept = old.get(spec.name)
                if kept is not None and kept.uri == spec.uri:
                    kept.host = spec  # address, capacity, labels: read from the spec
                    new[spec.name] = kept
                    continue
                if kept is not None:
                    closing.append(kept)  # a new uri: connected to again
                new[spec.name] = RemoteLibvirtHost(
                    spec, state_dir=self._state_dir / spec.name, clock=self._clock
                )
                added.append(spec.name)
            removed = [name for name in old if name not in new]
            closing += [old[name] for name in removed]
            for name in (*removed, *added):
                for table in (self._connected, self._since, self._versions):
                    table.pop(name, None)
                self._seen_uploads.pop(name, None)
                self._observing.pop(name, None)
            for name in added:
                self._connected[name] = False
                self._since[name] = None
                self._versions[name] = ()
            for clone, host in list(self._where.items()):
                if host not in new or host in added:
                    del self._where[clone]
            self._hosts = new
            subscriptions = [s for s in self._subscriptions if not s.closed]
        for subscription in subscriptions:
            for name in (*removed, *added):
                part = subscription.parts.pop(name, None)
                if part is not None:
                    part.close()
            for name in added:
                subscription.parts[name] = new[name].subscribe(subscription.callback)
        for gone in closing:
            gone.close()
        log.info(
            "hosts changed",
            extra=fields(hosts=",".join(new), added=",".join(added), removed=",".join(removed)),
        )

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close every host's connection, all at once, waiting `timeout` at most: a host
        that hangs (its libvirtd stopped answering) is left to its daemon threads, which
        drop its connection when libvirt returns; nothing of it keeps the process alive."""
        with self._lock:
            hosts = list(self._hosts.values())
            for future in self._observing.values():
                future.cancel()
        closers = [
            threading.Thread(target=h.close, name=f"close-{h.host_name}", daemon=True)
            for h in hosts
        ]
        for closer in closers:
            closer.start()
        deadline = time.monotonic() + timeout
        for closer in closers:
            closer.join(max(0.0, deadline - time.monotonic()))
        stuck = [h.host_name for h, c in zip(hosts, closers, strict=True) if c.is_alive()]
        if stuck:
            log.warning(
                "hosts did not close in time; their connections are dropped when libvirt returns",
                extra=fields(hosts=",".join(stuck), seconds=timeout),
            )
