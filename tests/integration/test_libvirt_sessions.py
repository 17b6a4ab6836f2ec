"""Sessions, readiness and clean resets on a real libvirt clone of the tiny guest.

One clone is booted for the module (TCG boot is a few seconds) and reused by every test;
the last test powers it off from inside the guest.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.errors import HypervisorError
from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import EventKind, HypervisorEvent
from tests.conftest import require
from tests.contract.hypervisor_suite import free_port
from tests.guest import SerialConsole, VncClient, tiny_base_image

pytestmark = pytest.mark.real

BOOT_TIMEOUT = 90.0
SESSIONS = 40  # VNC sessions in the memory test: 120 events


class EventLog:
    """Collects events from the adapter's event thread."""

    def __init__(self) -> None:
        self._events: list[HypervisorEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: HypervisorEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_for(
        self, match: Callable[[HypervisorEvent], bool], timeout: float = 20.0
    ) -> HypervisorEvent:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((e for e in self._events if match(e)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event; got {self._events}")
                self._cond.wait(left)


def wait_until(check: Callable[[], bool], timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.2)


@dataclass
class Desktop:
    hv: LibvirtHypervisor
    name: str
    display: Endpoint
    events: EventLog
    uri: str
    state_dir: Path
    base: BaseImage

    def running_and_ready(self) -> bool:
        info = next(c for c in self.hv.list_clones() if c.name == self.name)
        return info.power is Power.RUNNING and info.ready

    def console(self) -> SerialConsole:
        return SerialConsole(self.hv.console_path(self.name), timeout=BOOT_TIMEOUT)


@pytest.fixture(scope="module")
def desktop(require_libvirt_module: str) -> Iterator[Desktop]:
    work = Path(tempfile.mkdtemp(prefix="ips-", dir="/tmp"))
    hv = LibvirtHypervisor(require_libvirt_module, state_dir=work / "state")
    pool = "se" + secrets.token_hex(3)
    events = EventLog()
    subscription = hv.subscribe(events)
    try:
        base = tiny_base_image(work / "tiny-v1")
        spec = CloneSpec(
            name=f"{pool}-1",
            pool=pool,
            slot=1,
            base=base,
            mode=CloneMode.LINKED,
            cpus=1,
            memory=256 * 1024**2,
            display=Endpoint("127.0.0.1", free_port()),
        )
        hv.create_clone(spec)
        hv.start(spec.name)
        d = Desktop(
            hv, spec.name, spec.display, events, require_libvirt_module, work / "state", base
        )
        wait_until(d.running_and_ready)
        yield d
    finally:
        subscription.close()
        for clone in hv.list_clones():
            if clone.pool == pool:
                hv.delete(clone.name)
        hv.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def require_libvirt_module() -> str:
    # the conftest fixture is function-scoped; the module's clone needs the same check once
    import os

    from tests.conftest import libvirt_available, require, require_libvirt_python

    uri = os.environ.get("IMAGEPIPE_TEST_LIBVIRT_URI", "qemu:///system")
    require(libvirt_available(uri), f"libvirtd does not answer on {uri} (run ./install.sh)")
    require_libvirt_python()
    return uri


def test_the_base_stays_ready_for_new_clones_while_linked_clones_run(desktop: Desktop) -> None:
    assert desktop.hv.base_ready(desktop.base) is True


def test_a_vnc_client_makes_a_session_with_its_address_until_it_disconnects(
    desktop: Desktop,
) -> None:
    client = VncClient(desktop.display.host, desktop.display.port)
    try:
        assert client.handshake().startswith("QEMU")
        connected = desktop.events.wait_for(
            lambda e: e.kind is EventKind.SESSION_CONNECTED and e.client == client.address
        )
        session = desktop.hv.sessions(desktop.name)
        assert connected.clone == desktop.name
        assert session.client == client.address and session.connected_since is not None
    finally:
        client.close()
    desktop.events.wait_for(
        lambda e: e.kind is EventKind.SESSION_DISCONNECTED and e.client == client.address
    )
    assert desktop.hv.sessions(desktop.name).client is None


def test_vnc_sessions_do_not_grow_what_the_event_thread_holds(desktop: Desktop) -> None:
    """A keeper serves sessions for months: what libvirt's event thread allocated for a VNC
    client's connect, initialize and disconnect events must be freed once they are handled
    (libvirt-python's graphics callback kept ~1 KiB per event: issue 14's soak)."""

    def one_session() -> None:
        client = VncClient(desktop.display.host, desktop.display.port)
        try:
            client.handshake()
        finally:
            client.close()
        desktop.events.wait_for(
            lambda e: e.kind is EventKind.SESSION_DISCONNECTED and e.client == client.address
        )

    def held_by_event_thread() -> int:
        desktop.events.clear()  # the test's own log holds every event it was sent
        snapshot = tracemalloc.take_snapshot()
        return sum(
            t.size
            for t in snapshot.traces
            if any(f.filename.endswith("libvirt/events.py") for f in t.traceback)
        )

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(25)
    try:
        for _ in range(3):
            one_session()
        before = held_by_event_thread()
        for _ in range(SESSIONS):
            one_session()
        grown = held_by_event_thread() - before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert grown < SESSIONS * 3 * 100, f"{grown} bytes more after {SESSIONS} VNC sessions"


def test_a_lost_libvirt_connection_is_reopened_without_keeping_the_old_one(
    desktop: Desktop,
) -> None:
    """libvirtd restarts (an upgrade) must not leave the keeper one socket and eventfd more
    each time: the lost connection is released when a new one is opened. The server drops
    this process's client (virt-admin), as a libvirtd restart would, without restarting it."""
    require(shutil.which("virt-admin") is not None, "virt-admin is not installed")
    desktop.hv.list_clones()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        disconnect_this_process_from_libvirtd()
        wait_until(lambda: not desktop.hv._conn.isAlive(), timeout=20)
        assert any(c.name == desktop.name for c in desktop.hv.list_clones())
    assert len(os.listdir("/proc/self/fd")) == before
    events = desktop.events
    client = VncClient(desktop.display.host, desktop.display.port)
    try:
        client.handshake()
        events.wait_for(lambda e: e.kind is EventKind.SESSION_CONNECTED)  # re-subscribed
    finally:
        client.close()


def disconnect_this_process_from_libvirtd() -> None:
    def admin(*args: str) -> str:
        return subprocess.run(
            ["virt-admin", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    listed = (line.split() for line in admin("srv-clients-list", "libvirtd").splitlines())
    ids = [words[0] for words in listed if words and words[0].isdigit()]
    mine = f"unix_process_id: {os.getpid()}"
    ours = [i for i in ids if mine in " ".join(admin("client-info", "libvirtd", i).split())]
    assert ours, "libvirtd lists no client of this process"
    for client_id in ours:
        admin("client-disconnect", "libvirtd", client_id)


def test_logging_in_on_the_console_makes_the_user_a_session_until_logout(
    desktop: Desktop,
) -> None:
    with desktop.console() as console:
        console.login("alice")
        logged_in = desktop.hv.sessions(desktop.name)
        console.logout()
        logged_out = desktop.hv.sessions(desktop.name)
    assert logged_in.users == ("alice",) and logged_in.active
    assert logged_out.users == () and not logged_out.active


def test_a_restarted_keeper_learns_current_sessions_and_readiness_without_events(
    desktop: Desktop,
) -> None:
    client = VncClient(desktop.display.host, desktop.display.port)
    fresh = LibvirtHypervisor(desktop.uri, state_dir=desktop.state_dir)
    try:
        client.handshake()
        with desktop.console() as console:
            console.login("bob")
            session = fresh.sessions(desktop.name)
            info = next(c for c in fresh.list_clones() if c.name == desktop.name)
            console.logout()
    finally:
        client.close()
        fresh.close()
    assert session.client == client.address
    assert session.users == ("bob",)
    assert info.ready is True


def qemu_pid(uri: str, name: str) -> int:
    """The guest's QEMU process (libvirt's pid file for a qemu:///system domain)."""
    pid_file = Path("/run/libvirt/qemu") / f"{name}.pid"
    require(uri == "qemu:///system" and pid_file.is_file(), f"no QEMU pid file {pid_file}")
    return int(pid_file.read_text().strip())


def test_a_guest_agent_that_answers_late_reads_as_readiness_unknown_not_as_not_ready(
    desktop: Desktop,
) -> None:
    """A fresh adapter (a `status` process, a restarted keeper) has seen no agent events and
    pings the agent. With QEMU frozen (a loaded host at its worst) the reply comes after
    libvirt stopped waiting: the running, ready desktop is unknown, never "not ready"; once
    the guest runs again it is ready."""
    fresh = LibvirtHypervisor(desktop.uri, state_dir=desktop.state_dir)
    pid = qemu_pid(desktop.uri, desktop.name)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = next(c for c in fresh.list_clones() if c.name == desktop.name)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert frozen.power is Power.RUNNING
        assert frozen.ready is None
        wait_until(lambda: next(c for c in fresh.list_clones() if c.name == desktop.name).ready)
    finally:
        fresh.close()


def test_a_stopped_qemu_fails_the_session_read_within_the_timeout_instead_of_holding_the_pass(
    desktop: Desktop,
) -> None:
    """libvirt waits for QEMU's monitor reply without a limit: a stopped QEMU held the
    keeper's pass for as long as it stayed stopped. Now the read fails after the monitor
    timeout (the pool is not planned meanwhile), a second read waits for the same question
    instead of asking again, and once QEMU runs again the session reads as before."""
    fresh = LibvirtHypervisor(desktop.uri, state_dir=desktop.state_dir)
    fresh.monitor_timeout = 1.0
    pid = qemu_pid(desktop.uri, desktop.name)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(HypervisorError, match="did not answer query-vnc within 1 s"):
                fresh.sessions(desktop.name)
            first = time.monotonic() - began
            with pytest.raises(HypervisorError, match="query-vnc"):
                fresh.sessions(desktop.name)
            second = time.monotonic() - began - first
            asking = [t for t in threading.enumerate() if t.name == f"query-vnc-{desktop.name}"]
            assert len(asking) == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        assert first < 5.0 and second < 5.0, (first, second)
        wait_until(lambda: fresh.sessions(desktop.name).client is None)
    finally:
        fresh.close()


def test_reset_gives_the_next_user_a_clean_disk(desktop: Desktop) -> None:
    with desktop.console() as console:
        console.login("carol")
        console.run("echo secret > /home/carol/note && sync")
        before = console.run("cat /home/carol/note")
        console.logout()
    desktop.hv.reset(desktop.name)
    wait_until(desktop.running_and_ready)
    with desktop.console() as console:
        console.login("dave")
        after = console.run("ls /home; cat /home/carol/note 2>&1")
        console.logout()
    assert before == "secret"
    assert "carol" not in after.split() and "No such file" in after


def test_poweroff_inside_the_guest_is_a_state_change_to_shutoff(desktop: Desktop) -> None:
    with desktop.console() as console:
        console.login("erin")
        desktop.events.clear()
        console.send_line("poweroff")
        desktop.events.wait_for(
            lambda e: e.kind is EventKind.STATE_CHANGED and e.detail.startswith("stopped"),
            timeout=30.0,
        )
    info = next(c for c in desktop.hv.list_clones() if c.name == desktop.name)
    assert info.power is Power.SHUTOFF and not info.ready


def test_stop_shuts_a_ready_guest_down_gracefully_through_its_agent(desktop: Desktop) -> None:
    desktop.hv.start(desktop.name)
    wait_until(desktop.running_and_ready)
    desktop.events.clear()
    started = time.monotonic()
    desktop.hv.stop(desktop.name, timeout=30.0)
    took = time.monotonic() - started
    stopped = desktop.events.wait_for(
        lambda e: e.kind is EventKind.STATE_CHANGED and e.detail.startswith("stopped")
    )
    assert stopped.detail == "stopped/0"  # VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, not destroyed
    assert took < 30.0
