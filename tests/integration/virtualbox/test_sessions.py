"""Sessions on the VirtualBox adapter with real guests: the simulated VirtualBox runs each
machine as a QEMU guest of the tiny image, VNC on the VRDE port, users from its agent."""

from __future__ import annotations

import threading

import pytest

from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Power
from imagepipe.pool.ports import EventKind, HypervisorEvent
from tests.guest import SerialConsole, VncClient
from tests.vboxsim.api import Host
from tests.vboxsim.fixtures import vnc_display
from tests.vboxsim.process import QemuProcess

pytestmark = [pytest.mark.real, pytest.mark.slow]


def vrde_spec(base: BaseImage, slot: int) -> CloneSpec:
    """Desktop vbt-<slot> on a free port QEMU's VNC can serve (5900 and up)."""
    return CloneSpec(f"vbt-{slot}", "vbt", slot, base, CloneMode.LINKED, 1, 128 * 1024**2,
                     vnc_display())  # fmt: skip


def test_a_login_a_vnc_client_and_a_reset_to_a_clean_disk_on_a_real_guest(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    spec = vrde_spec(base, 0)
    port = spec.display.port
    hv.create_clone(spec)
    seen: dict[EventKind, threading.Event] = {k: threading.Event() for k in EventKind}
    got: list[HypervisorEvent] = []

    def record(event: HypervisorEvent) -> None:
        got.append(event)
        seen[event.kind].set()

    hv.subscribe(record)
    hv.start("vbt-0")
    process = sim.by_name("vbt-0").process
    assert isinstance(process, QemuProcess)
    with SerialConsole(process.console_path, timeout=120) as console:
        console.login("alice")
        console.run("echo secret > /home/alice/note")
        seen[EventKind.AGENT_CHANGED].clear()
        assert _until(lambda: hv.sessions("vbt-0").users == ("alice",), seen, got)
        client = VncClient("127.0.0.1", port)
        client.handshake()
        assert seen[EventKind.SESSION_CONNECTED].wait(30), got
        assert hv.sessions("vbt-0").client == "127.0.0.1"
        client.close()
        assert seen[EventKind.SESSION_DISCONNECTED].wait(30), got
    assert hv.list_clones()[0].ready is True
    hv.reset("vbt-0")
    process = sim.by_name("vbt-0").process
    assert isinstance(process, QemuProcess)
    with SerialConsole(process.console_path, timeout=120) as console:
        console.login("bob")
        assert "No such file" in console.run("cat /home/alice/note 2>&1")
    assert hv.list_clones()[0].power is Power.RUNNING


def _until(check, seen, got) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(30):
        if check():
            return True
        seen[EventKind.AGENT_CHANGED].wait(2)
        seen[EventKind.AGENT_CHANGED].clear()
    return False


def test_the_machines_screen_and_prompt_show_its_own_name(
    sim: Host, base: BaseImage, hv: VirtualBoxHypervisor
) -> None:
    spec = vrde_spec(base, 3)
    hv.create_clone(spec)
    hv.start(spec.name)
    process = sim.by_name(spec.name).process
    assert isinstance(process, QemuProcess)
    with SerialConsole(process.console_path, timeout=120) as console:
        assert console.prompt().endswith("vbt-3 login: ")
        console.login("alice")
        screen = console.screen()
        assert "imagepipe desktop vbt-3" in screen, screen
        assert "image tiny v1" in screen, screen
