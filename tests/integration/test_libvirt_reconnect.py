"""The libvirt adapter losing its connection to libvirtd, on a real libvirtd and a real clone
of the tiny guest, without restarting the shared libvirtd: libvirtd itself cuts this process's
connection (`virt-admin client-disconnect`, the same end of file a restart gives), and a
libvirtd that stays down is a URI nothing answers on. (The restart itself, under a real
keeper, is tests/e2e/test_libvirtd_restart.py.)
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.errors import HypervisorUnavailableError
from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
from imagepipe.pool.model import CloneMode, CloneSpec, Endpoint
from imagepipe.pool.ports import EventKind, HypervisorEvent
from imagepipe.record import replace
from tests.conftest import libvirt_available, require
from tests.contract.hypervisor_suite import free_port
from tests.guest import SerialConsole, VncClient, tiny_base_image
from tests.integration.test_libvirt_sessions import EventLog, wait_until

pytestmark = pytest.mark.real

LOGGER = "imagepipe.hypervisors.libvirt.hypervisor"


class Events(EventLog):
    def snapshot(self) -> list[HypervisorEvent]:
        with self._cond:
            return list(self._events)


@dataclass
class Desktop:
    hv: LibvirtHypervisor
    name: str
    display: Endpoint
    events: Events
    console: SerialConsole
    spec: CloneSpec


def our_clients() -> list[str]:
    """libvirtd's ids of the connections this test process holds."""
    listing = subprocess.run(
        ["virt-admin", "srv-clients-list", "libvirtd"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    ours = []
    for client in re.findall(r"^\s*(\d+)\s+unix", listing, re.MULTILINE):
        info = subprocess.run(
            ["virt-admin", "client-info", "libvirtd", client],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
        if re.search(rf"unix_process_id\s*:\s*{os.getpid()}$", info, re.MULTILINE):
            ours.append(client)
    return ours


def cut_connection() -> None:
    """libvirtd drops this process's connections, as a restart would (end of file)."""
    deadline = time.monotonic() + 10
    while not (clients := our_clients()):  # a call in another thread is reconnecting
        assert time.monotonic() < deadline, "this process holds no connection to libvirtd"
        time.sleep(0.05)
    for client in clients:
        subprocess.run(
            ["virt-admin", "client-disconnect", "libvirtd", client],
            capture_output=True,
            check=True,
            timeout=30,
        )


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


@pytest.fixture(scope="module")
def desktop() -> Iterator[Desktop]:
    uri = os.environ.get("IMAGEPIPE_TEST_LIBVIRT_URI", "qemu:///system")
    require(libvirt_available(uri), f"libvirtd does not answer on {uri} (run ./install.sh)")
    require(shutil.which("virt-admin") is not None, "virt-admin is not installed (libvirt-clients)")
    work = Path(tempfile.mkdtemp(prefix="ipr-", dir="/tmp"))
    hv = LibvirtHypervisor(uri, state_dir=work / "state")
    pool = "rc" + secrets.token_hex(3)
    events = Events()
    subscription = hv.subscribe(events)
    console = None
    try:
        spec = CloneSpec(
            name=f"{pool}-1",
            pool=pool,
            slot=1,
            base=tiny_base_image(work / "tiny-v1"),
            mode=CloneMode.LINKED,
            cpus=1,
            memory=192 * 1024**2,
            display=Endpoint("127.0.0.1", free_port()),
        )
        hv.create_clone(spec)
        hv.start(spec.name)
        wait_until(lambda: next(c for c in hv.list_clones() if c.name == spec.name).ready)
        console = SerialConsole(hv.console_path(spec.name), timeout=60)
        console.login("alice")
        assert spec.display is not None
        yield Desktop(hv, spec.name, spec.display, events, console, spec)
    finally:
        if console is not None:
            console.close()
        subscription.close()
        for clone in hv.list_clones():
            if clone.pool == pool:
                hv.delete(clone.name)
        hv.close()
        shutil.rmtree(work, ignore_errors=True)


def test_a_cut_connection_is_said_once_and_the_next_call_reconnects_with_the_session_kept(
    desktop: Desktop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hv, name = desktop.hv, desktop.name
    viewer = VncClient(desktop.display.host, desktop.display.port, timeout=30)
    try:
        viewer.handshake()
        wait_until(lambda: hv.sessions(name).client == viewer.address, timeout=20)
        before = hv.sessions(name)
        desktop.events.clear()

        cut_connection()
        # libvirt's close callback says it at once, before any call finds out
        wait_until(lambda: bool(said(caplog, "libvirt connection lost")), timeout=10)
        after = hv.sessions(name)  # reconnects

        assert after.client == viewer.address
        assert after.connected_since == before.connected_since
        assert "alice" in after.users
        assert len(said(caplog, "libvirt connection lost")) == 1
        assert len(said(caplog, "libvirt connection back")) == 1
        # no blanket "possibly used" event: the balancer's counters tell who came meanwhile
        assert not [
            e
            for e in desktop.events.snapshot()
            if e.clone == name and e.kind is EventKind.SESSION_CONNECTED and e.client is None
        ]
        assert next(c for c in hv.list_clones() if c.name == name).ready
    finally:
        viewer.close()


def test_after_several_reconnects_each_event_arrives_exactly_once(
    desktop: Desktop, caplog: pytest.LogCaptureFixture
) -> None:
    hv, name = desktop.hv, desktop.name
    caplog.set_level(logging.INFO, logger=LOGGER)
    for cut in range(1, 4):
        cut_connection()
        wait_until(lambda n=cut: len(said(caplog, "libvirt connection lost")) >= n, timeout=10)
        wait_until(lambda: hv.list_clones() != [], timeout=10)  # the call that reconnects
        assert len(said(caplog, "libvirt connection back")) == cut
    viewer = VncClient(desktop.display.host, desktop.display.port, timeout=30)
    viewer.handshake()
    desktop.events.wait_for(
        lambda e: e.kind is EventKind.SESSION_CONNECTED and e.client == viewer.address
    )
    viewer.close()
    desktop.events.wait_for(
        lambda e: e.kind is EventKind.SESSION_DISCONNECTED and e.client == viewer.address
    )
    time.sleep(1.0)  # a duplicate callback would deliver within this
    seen = desktop.events.snapshot()
    mine = [e for e in seen if e.clone == name and e.client == viewer.address]
    assert [e.kind for e in mine].count(EventKind.SESSION_DISCONNECTED) == 1
    assert [e.detail for e in mine if e.kind is EventKind.SESSION_CONNECTED] == [
        "connect",
        "initialize",
    ]


def test_a_libvirtd_that_stays_down_fails_every_call_with_one_typed_error_and_one_warning(
    desktop: Desktop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    hv, name = desktop.hv, desktop.name
    uri = hv.uri
    hv.uri = "qemu+unix:///system?socket=/nonexistent/imagepipe-test/libvirt-sock"
    try:
        cut_connection()
        for _ in range(3):
            with pytest.raises(HypervisorUnavailableError, match="does not answer"):
                hv.list_clones()
            # never "nobody is logged in": the session cannot be read at all
            with pytest.raises(HypervisorUnavailableError):
                hv.sessions(name)
        assert len(said(caplog, "libvirt connection lost")) == 1
        assert said(caplog, "libvirt connection back") == []
    finally:
        hv.uri = uri
    assert "alice" in hv.sessions(name).users
    assert len(said(caplog, "libvirt connection back")) == 1


def test_a_session_query_cut_mid_call_fails_typed_and_never_says_nobody_is_logged_in(
    desktop: Desktop,
) -> None:
    hv, name = desktop.hv, desktop.name
    outcomes: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                users = hv.sessions(name).users
                outcomes.append("alice" if "alice" in users else f"users {users}")
            except HypervisorUnavailableError:
                outcomes.append("unavailable")
            except Exception as exc:  # anything else is a finding
                outcomes.append(repr(exc))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(20):  # cut until a cut lands inside a call
            cut_connection()
            time.sleep(0.2)
            if "unavailable" in outcomes:
                break
    finally:
        stop.set()
        poller.join(30)
    assert "unavailable" in outcomes, "no cut landed inside a call"
    assert set(outcomes) == {"alice", "unavailable"}


def test_a_create_or_delete_cut_mid_call_fails_typed_and_doing_it_again_completes_it(
    desktop: Desktop,
) -> None:
    """What the executor does with HypervisorUnavailableError (a BusyError): call again. The
    second clone is never started (no boot); it is made and removed until a cut lands."""
    hv = desktop.hv
    spec = replace(
        desktop.spec,
        name=f"{desktop.spec.pool}-2",
        slot=2,
        display=Endpoint("127.0.0.1", free_port()),
    )
    cut_inside: list[str] = []
    findings: list[str] = []
    stop = threading.Event()

    def again(what: str, call: Callable[[], object]) -> object:
        for _ in range(50):  # the cuts come every few tenths of a second here
            try:
                return call()
            except HypervisorUnavailableError:
                cut_inside.append(what)
            except Exception as exc:  # anything else is a finding
                findings.append(f"{what}: {exc!r}")
                return None
        findings.append(f"{what}: still cut after 50 attempts")
        return None

    def names() -> list[str]:
        return [c.name for c in hv.list_clones()]

    def churn() -> None:
        while not stop.is_set():
            again("create", lambda: hv.create_clone(spec))
            if spec.name not in (again("list", names) or []):
                findings.append("create said done but the clone is not there")
            again("delete", lambda: hv.delete(spec.name))

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(30):
            cut_connection()
            time.sleep(0.1)
            if {"create", "delete"} & set(cut_inside):
                break
    finally:
        stop.set()
        worker.join(60)
    hv.delete(spec.name)
    print(f"calls cut by libvirtd and done again: {cut_inside}")
    assert cut_inside, "no cut landed inside a create or a delete"
    assert findings == []
    assert spec.name not in [c.name for c in hv.list_clones()]
    assert not hv.disk_path(spec.name).exists()


def parent_domains() -> set[str]:
    """Warm parents running on this host now (any test's)."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {n for n in out.split() if n.startswith("ipw-")}


def test_a_warm_parent_cut_while_it_boots_is_made_on_the_retry_and_none_is_left_running(
    desktop: Desktop,
) -> None:
    """Not "no warm parent; desktops boot instead" for RETRY_AFTER (10 min), with the
    half-made parent's QEMU left running: the create fails typed, the retry makes it."""
    hv = desktop.hv
    spec = replace(
        desktop.spec,
        name=f"{desktop.spec.pool}-3",
        slot=3,
        memory=160 * 1024**2,  # another machine shape: a parent of its own is made
        display=Endpoint("127.0.0.1", free_port()),
    )
    others = parent_domains()
    outcome: list[BaseException | None] = []

    def create() -> None:
        try:
            hv.create_clone(spec)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=create)
    worker.start()
    try:
        wait_until(lambda: bool(parent_domains() - others) or not worker.is_alive(), timeout=60)
        assert worker.is_alive(), f"the parent was made before the cut: {outcome}"
        ours = parent_domains() - others
        time.sleep(0.5)  # booting: the adapter pings its agent
        cut_connection()
    finally:
        worker.join(120)
    try:
        assert len(outcome) == 1 and isinstance(outcome[0], HypervisorUnavailableError), outcome

        hv.create_clone(spec)  # what the executor's retry does

        assert hv.saved_state_path(spec.name).is_file(), "the retry fell back to booting"
        assert not (parent_domains() & ours), "the half-made parent still runs"
    finally:
        hv.delete(spec.name)
