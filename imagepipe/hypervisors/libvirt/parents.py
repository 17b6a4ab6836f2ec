"""Warm parents of the libvirt adapter: made once per image version and machine shape, kept
under state_dir/warm/<key>/, and the per-clone saved state a restore starts from.

    parents = WarmParents(libvirt, libvirt_qemu, connection, state_dir)
    parent = parents.ensure(key, clone_xml, base_disk)   # boots + saves once; None: boot
    parents.write_clone_state(parent, identity, target)

A parent directory holds `memory.save` (libvirt's saved state: memory and devices),
`disk.qcow2` (the disk the saved guest had, frozen read-only: every clone's overlay backs on
it) and `parent.json` (written last: the parent is complete). A failure is logged once per
parent and the caller boots; the parent is tried again after RETRY_AFTER seconds (the
bookkeeping is hypervisors/common.py's WarmBook, the same as VirtualBox's).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imagepipe.errors import HypervisorUnavailableError, ImagepipeError
from imagepipe.hypervisors.common import WarmBook, WarmKey
from imagepipe.hypervisors.libvirt.disks import make_clone_disk
from imagepipe.hypervisors.libvirt.errors import connection_lost, error_of
from imagepipe.hypervisors.libvirt.warm import (
    HEADER_SIZE,
    PARENT_PREFIX,
    RestoreIdentity,
    SaveHeader,
    SaveImageError,
    data_length,
    is_warm_parent,
    parent_domain_xml,
    parse_save_header,
    render_save_header,
    restore_xml,
)
from imagepipe.log import fields
from imagepipe.pool.model import CloneMode, Endpoint

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # seconds a parent may take to boot until its agent answers
AGENT_TIMEOUT = 2
P = TypeVar("P")


@dataclass(frozen=True)
class WarmParent:
    key: WarmKey
    directory: Path
    header: SaveHeader  # the saved state's header: the parent's live XML
    libvirt_version: int  # the libvirt and QEMU that saved it: another one may not restore it
    qemu_version: int

    @property
    def memory(self) -> Path:
        return self.directory / "memory.save"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"


class WarmParents:
    """Makes and finds warm parents on one host. Thread-safe: one build per key at a time
    in this process, and a file lock against other imagepipe processes on the host."""

    def __init__(
        self,
        libvirt: Any,
        libvirt_qemu: Any,
        connection: Callable[[], Any],
        state_dir: Path,
    ) -> None:
        self._libvirt = libvirt
        self._libvirt_qemu = libvirt_qemu
        self._connection = connection
        self.root = state_dir / "warm"
        self.sockets = state_dir / "sockets"
        self._book = WarmBook()

    # -- finding and making parents ---------------------------------------------------------

    def directory(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str) -> WarmParent | None:
        """The complete parent of that name, or None."""
        directory = self.directory(name)
        try:
            manifest = json.loads((directory / "parent.json").read_text())
            key = WarmKey(
                manifest["image"],
                int(manifest["version"]),
                int(manifest["cpus"]),
                int(manifest["memory_kib"]),
                manifest["fingerprint"],
                PARENT_PREFIX,
            )
            header = read_header(directory / "memory.save")
            versions = int(manifest["libvirt"]), int(manifest["qemu"])
        except (OSError, ValueError, KeyError, TypeError, SaveImageError):
            return None
        if not (directory / "disk.qcow2").is_file():
            return None
        return WarmParent(key, directory, header, *versions)

    def ensure(self, key: WarmKey, clone_xml: str, base_disk: Path) -> WarmParent | None:
        """The warm parent for `key`, made now when there is none (boot until the guest agent
        answers, save). None when it cannot be made: said once in the log; the caller boots."""
        self.prune()
        return ensure_parent(
            self._book,
            self._libvirt,
            key,
            self.load,
            lambda: self._make(key, clone_xml, base_disk),
            self._file_lock,  # other processes on this host (a `status`, a second keeper)
        )

    def _make(self, key: WarmKey, clone_xml: str, base_disk: Path) -> WarmParent:
        final = self.directory(key.name)
        work = final.with_name(final.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        work.mkdir(parents=True)
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._remove_stale_domain(key.name)
        make_clone_disk(base_disk, work / "disk.qcow2", CloneMode.LINKED)
        xml = parent_domain_xml(
            clone_xml,
            key,
            uuid=str(uuid.uuid4()),
            disk=work / "disk.qcow2",
            console_socket=self._socket(key.name, "console"),
            agent_socket=self._socket(key.name, "agent"),
            display=Endpoint("127.0.0.1", _free_port()),
        )
        conn = self._connection()
        dom = conn.createXML(xml, 0)  # transient: gone once saved or destroyed
        try:
            self._wait_for_agent(dom, key)
            dom.saveFlags(str(work / "memory.save"), None, self._libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except BaseException:
            with contextlib.suppress(self._libvirt.libvirtError):
                dom.destroy()
            raise
        (work / "disk.qcow2").chmod(0o444)  # frozen: the clones' overlays back on it
        manifest = {
            "image": key.image,
            "version": key.version,
            "cpus": key.cpus,
            "memory_kib": key.memory_kib,
            "fingerprint": key.fingerprint,
            "base": str(base_disk),
            "libvirt": int(conn.getLibVersion()),
            "qemu": int(conn.getVersion()),
            "made_at": time.time(),
        }
        (work / "parent.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # the parent's disk is referenced by path from every clone overlay: rename, then use
        os.replace(work, final)
        for path in (self._socket(key.name, "console"), self._socket(key.name, "agent")):
            path.unlink(missing_ok=True)
        parent = self.load(key.name)
        if parent is None:
            raise SaveImageError(f"the warm parent in {final} is incomplete after saving")
        return parent

    def prune(self) -> list[str]:
        """Remove the parents whose version's base disk is gone (the version was pruned or
        rebuilt): no desktop can start from them any more. At most once a minute; returns
        the names removed."""
        if not self._book.tidy_due():
            return []
        removed = []
        for manifest in sorted(self.root.glob("ipw-*/parent.json")):
            try:
                base = Path(json.loads(manifest.read_text())["base"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an older layout or being written: leave it
            if base.exists():
                continue
            name = manifest.parent.name
            with self._book.lock(name), self._file_lock(name):
                shutil.rmtree(manifest.parent, ignore_errors=True)
            (self.root / f"{name}.lock").unlink(missing_ok=True)
            removed.append(name)
            log.info("warm parent removed", extra=fields(parent=name, base=str(base)))
        return removed

    def _socket(self, name: str, kind: str) -> Path:
        return self.sockets / f"{name}.{kind}"

    def _remove_stale_domain(self, name: str) -> None:
        remove_stale_parent(self._libvirt, self._connection(), name)

    def _wait_for_agent(self, dom: Any, key: WarmKey) -> None:
        wait_for_agent(self._libvirt, self._libvirt_qemu, dom, key)

    @contextlib.contextmanager
    def _file_lock(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def say_once(self, what: str, message: str) -> None:
        """Log a fallback to boot once per reason, not once per desktop."""
        self._book.say_once(what, message)

    # -- per-clone saved state ------------------------------------------------------------

    def write_clone_state(self, parent: WarmParent, who: RestoreIdentity, target: Path) -> None:
        """The clone's own copy of the parent's saved state, its XML in the header; written
        beside the target and renamed, so a crash never leaves half a state in place."""
        xml = restore_xml(parent.header.xml, who)
        head = render_save_header(parent.header, xml)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open(parent.memory, "rb") as src, open(partial, "wb") as dst:
            dst.write(head)
            dst.flush()
            _copy_from(src, dst, parent.header.stream_offset)
        os.replace(partial, target)


def ensure_parent(
    book: WarmBook,
    lv: Any,
    key: WarmKey,
    load: Callable[[str], P | None],
    make: Callable[[], P],
    also_lock: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
) -> P | None:
    """The parent of `key` as `load` finds it, else made once: a build that failed recently
    is not tried again before RETRY_AFTER (None: the caller boots); one build per key at a
    time in this process (and under `also_lock`'s lock too, when given); after the wait for
    the lock, a parent another build made meanwhile is used."""
    parent = load(key.name)
    if parent is not None:
        return parent
    if book.waiting(key.name):
        return None
    extra = also_lock(key.name) if also_lock is not None else contextlib.nullcontext()
    with book.lock(key.name), extra:
        parent = load(key.name)
        if parent is not None:
            return parent
        return made_once(book, lv, key, make)


def made_once(book: WarmBook, lv: Any, key: WarmKey, make: Callable[[], P]) -> P | None:
    """make() the parent of `key`; None when that fails for the parent's sake (said once in
    the log, tried again after RETRY_AFTER: the caller boots). A lost libvirt connection is
    raised: not the parent's fault, the create is retried (and the retry powers off the
    half-made parent)."""
    started = book.now()
    try:
        parent = make()
    except (ImagepipeError, OSError, lv.libvirtError) as exc:
        if isinstance(exc, lv.libvirtError) and connection_lost(exc):
            raise error_of(exc, f"warm parent of {key}") from exc
        if isinstance(exc, HypervisorUnavailableError):
            raise
        book.failed(key.name)
        book.say_once(
            f"make:{key.name}", f"no warm parent for {key}; desktops boot instead: {reason(exc)}"
        )
        return None
    book.made(key, started)
    return parent


def remove_stale_parent(lv: Any, conn: Any, name: str) -> None:
    """A parent domain left running by a crash mid-build is ours: power it off."""
    try:
        dom = conn.lookupByName(name)
    except lv.libvirtError:
        return
    if not is_warm_parent(dom.XMLDesc(0)):
        raise SaveImageError(f"a domain named {name} exists and is not an imagepipe parent")
    with contextlib.suppress(lv.libvirtError):
        dom.destroy()
    with contextlib.suppress(lv.libvirtError):
        dom.undefine()


def wait_for_agent(lv: Any, libvirt_qemu: Any, dom: Any, key: WarmKey) -> None:
    """Wait until the booting parent's guest agent answers (SaveImageError when it powers
    off first or takes longer than BOOT_TIMEOUT)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    dom.agentSetResponseTimeout(AGENT_TIMEOUT)
    while True:
        try:
            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', AGENT_TIMEOUT, 0)
            return
        except lv.libvirtError as exc:
            if connection_lost(exc):
                raise
            if not _active(dom, lv):
                raise SaveImageError(
                    f"the guest of {key} powered off before its agent answered"
                ) from None
            if time.monotonic() > deadline:
                raise SaveImageError(
                    f"the guest of {key} did not answer its agent within {BOOT_TIMEOUT:.0f} s"
                ) from None
            time.sleep(0.2)


def read_header(path: Path) -> SaveHeader:
    with open(path, "rb") as handle:
        head = handle.read(HEADER_SIZE)
        head += handle.read(data_length(head))
    return parse_save_header(head)


def _active(dom: Any, lv: Any) -> bool:
    """The transient parent still runs (once it powers off, libvirt forgets it)."""
    try:
        return bool(dom.isActive())
    except lv.libvirtError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _copy_from(src: Any, dst: Any, offset: int) -> None:
    """Copy src from `offset` to its end onto dst's end, in the kernel where it can."""
    size = os.fstat(src.fileno()).st_size
    position = offset
    try:
        while position < size:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), size - position, position)
            if copied == 0:
                break
            position += copied
    except OSError:
        src.seek(position)
        shutil.copyfileobj(src, dst, 1 << 22)
        return
    if position < size:
        src.seek(position)
        shutil.copyfileobj(src, dst, 1 << 22)


def reason(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else str(exc)
    return str(text).splitlines()[0] if text else type(exc).__name__
