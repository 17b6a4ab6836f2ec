"""Instant desktops on real libvirt + QEMU (TCG) with the tiny guest: clones restore a warm
parent's saved state, learn their name and the time, reset to clean by restoring again, and
boot whenever restoring cannot be done."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
from imagepipe.pool.model import BaseImage, CloneInfo, CloneMode, CloneSpec, Endpoint, StartMode
from imagepipe.record import replace
from tests.guest import SerialConsole, tiny_base_image
from tests.host import free_port

pytestmark = pytest.mark.real

READY_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ipi-", dir="/tmp"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_base(workdir: Path) -> BaseImage:
    return tiny_base_image(workdir / "tiny-v1")


@pytest.fixture
def pool() -> str:
    return "in" + secrets.token_hex(3)


@pytest.fixture
def hypervisor(require_libvirt: str, workdir: Path, pool: str) -> Iterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor(require_libvirt, state_dir=workdir / "state")
    try:
        yield hv
    finally:
        for clone in hv.list_clones():
            if clone.pool == pool:
                hv.delete(clone.name)
        hv.close()


@pytest.fixture
def make_spec(tiny_base: BaseImage, pool: str) -> Callable[..., CloneSpec]:
    def make(slot: int = 1, start: StartMode = StartMode.RESTORE) -> CloneSpec:
        return CloneSpec(
            name=f"{pool}-{slot}",
            pool=pool,
            slot=slot,
            base=tiny_base,
            mode=CloneMode.LINKED,
            cpus=1,
            memory=128 * 1024**2,
            display=Endpoint("127.0.0.1", free_port()),
            start=start,
        )

    return make


def wait_ready(hv: LibvirtHypervisor, name: str) -> CloneInfo:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        (info,) = [c for c in hv.list_clones() if c.name == name]
        if info.ready:
            return info
        assert time.monotonic() < deadline, f"{name} not ready after {READY_TIMEOUT} s"
        time.sleep(0.2)


def test_a_restored_desktop_is_ready_with_its_own_name_and_the_current_time(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec()
    hypervisor.create_clone(spec)
    hypervisor.start(spec.name)
    info = wait_ready(hypervisor, spec.name)
    assert info.started_by is StartMode.RESTORE
    with SerialConsole(hypervisor.console_path(spec.name)) as console:
        console.login("alice")
        assert console.run("hostname") == spec.name
        guest_time = int(console.run("date +%s"))
        assert abs(guest_time - time.time()) < 10


def test_desktops_restored_from_one_parent_share_no_writable_state(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    first, second = make_spec(1), make_spec(2)
    for spec in (first, second):
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
    for spec in (first, second):
        assert wait_ready(hypervisor, spec.name).started_by is StartMode.RESTORE
    assert hypervisor.disk_path(first.name) != hypervisor.disk_path(second.name)
    with SerialConsole(hypervisor.console_path(first.name)) as console:
        console.login("alice")
        console.run("echo secret > /home/alice/note; sync")
    with SerialConsole(hypervisor.console_path(second.name)) as console:
        console.login("bob")
        assert "No such file" in console.run("cat /home/alice/note 2>&1")


def test_a_reset_restores_again_and_the_next_user_never_sees_the_previous_users_files(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec()
    hypervisor.create_clone(spec)
    hypervisor.start(spec.name)
    wait_ready(hypervisor, spec.name)
    with SerialConsole(hypervisor.console_path(spec.name)) as console:
        console.login("alice")
        console.run("echo secret > /home/alice/note; sync")
        console.logout()
    hypervisor.reset(spec.name)
    assert wait_ready(hypervisor, spec.name).started_by is StartMode.RESTORE
    with SerialConsole(hypervisor.console_path(spec.name)) as console:
        console.login("bob")
        assert console.run("ls /home") == "bob         lost+found"
        assert console.run("hostname") == spec.name


def test_a_pool_that_chooses_boot_boots_its_desktops(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec(start=StartMode.BOOT)
    hypervisor.create_clone(spec)
    hypervisor.start(spec.name)
    assert wait_ready(hypervisor, spec.name).started_by is StartMode.BOOT
    assert not hypervisor.saved_state_path(spec.name).exists()


def test_a_restore_that_fails_boots_the_desktop_and_says_so_once(
    hypervisor: LibvirtHypervisor,
    make_spec: Callable[..., CloneSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = make_spec(1), make_spec(2)
    for spec in (first, second):
        hypervisor.create_clone(spec)
        # a saved state libvirt cannot read: the header is fine, QEMU's stream is cut short
        state = hypervisor.saved_state_path(spec.name)
        with open(state, "r+b") as handle:
            handle.truncate(128 * 1024)
    caplog.set_level(logging.WARNING, logger="imagepipe")
    for spec in (first, second):
        hypervisor.start(spec.name)
    for spec in (first, second):
        assert wait_ready(hypervisor, spec.name).started_by is StartMode.BOOT
    said = [r.getMessage() for r in caplog.records if "boot instead" in r.getMessage()]
    assert len(said) == 1, said
    assert "restoring" in said[0] and "tiny v1" in said[0]


def test_a_desktop_stopped_and_started_again_boots_on_its_own_disk(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    spec = make_spec()
    hypervisor.create_clone(spec)
    hypervisor.start(spec.name)
    wait_ready(hypervisor, spec.name)
    with SerialConsole(hypervisor.console_path(spec.name)) as console:
        console.login("alice")
        console.run("echo kept > /home/alice/note; sync")
        console.logout()
    hypervisor.stop(spec.name, timeout=30.0)
    hypervisor.start(spec.name)
    assert wait_ready(hypervisor, spec.name).started_by is StartMode.BOOT
    with SerialConsole(hypervisor.console_path(spec.name)) as console:
        console.login("alice")
        assert console.run("cat /home/alice/note") == "kept"


def test_when_no_warm_parent_can_be_made_desktops_boot_and_it_is_said_once(
    hypervisor: LibvirtHypervisor,
    make_spec: Callable[..., CloneSpec],
    caplog: pytest.LogCaptureFixture,
    workdir: Path,
) -> None:
    # a version whose guest powers off instead of answering: no parent can be saved from it
    broken = tiny_base_image(workdir / "tiny-v7", version=7)
    broken = replace(broken, cmdline="console=ttyS0 quiet imagepipe.mode=build")
    caplog.set_level(logging.WARNING, logger="imagepipe")
    first, second = (replace(make_spec(slot), base=broken) for slot in (1, 2))
    for spec in (first, second):
        hypervisor.create_clone(spec)
        assert not hypervisor.saved_state_path(spec.name).exists()
    said = [r.getMessage() for r in caplog.records if "boot instead" in r.getMessage()]
    assert len(said) == 1, said
    assert "no warm parent for tiny v7" in said[0] and "powered off" in said[0]


def test_a_desktop_whose_parent_is_gone_boots_and_restores_again_once_it_is_remade(
    hypervisor: LibvirtHypervisor,
    make_spec: Callable[..., CloneSpec],
    caplog: pytest.LogCaptureFixture,
    workdir: Path,
) -> None:
    first = make_spec(1)
    hypervisor.create_clone(first)
    for parent in (workdir / "state" / "warm").glob("ipw-*"):
        if parent.is_dir():
            shutil.rmtree(parent)
    caplog.set_level(logging.WARNING, logger="imagepipe")

    hypervisor.reset(first.name)
    assert wait_ready(hypervisor, first.name).started_by is StartMode.BOOT
    assert any("boot instead" in r.getMessage() for r in caplog.records)

    hypervisor.create_clone(make_spec(2))  # the version's next desktop makes the parent again
    hypervisor.reset(first.name)  # its saved state came from the old parent: written again
    assert wait_ready(hypervisor, first.name).started_by is StartMode.RESTORE
    with SerialConsole(hypervisor.console_path(first.name)) as console:
        console.login("alice")
        assert console.run("echo ok > /home/alice/note; sync; cat /home/alice/note") == "ok"


def shown_on_screen(console: SerialConsole, text: str, timeout: float = 20.0) -> list[str]:
    """The desktop's screen once it shows `text` (a restored guest redraws it just after it
    learns its name); the screen as it is when the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        screen = console.screen()
        if any(text in line for line in screen) or time.monotonic() > deadline:
            return screen
        time.sleep(0.5)


def test_each_desktop_shows_its_own_name_on_its_screen_and_prompt_booted_or_restored(
    hypervisor: LibvirtHypervisor, make_spec: Callable[..., CloneSpec]
) -> None:
    booted, restored = make_spec(1, start=StartMode.BOOT), make_spec(2)
    for spec in (booted, restored):
        hypervisor.create_clone(spec)
        hypervisor.start(spec.name)
    assert wait_ready(hypervisor, booted.name).started_by is StartMode.BOOT
    assert wait_ready(hypervisor, restored.name).started_by is StartMode.RESTORE
    for spec, other in ((booted, restored), (restored, booted)):
        with SerialConsole(hypervisor.console_path(spec.name)) as console:
            assert console.prompt().endswith(f"{spec.name} login: ")
            console.login("alice")
            screen = shown_on_screen(console, spec.name)
            assert f"imagepipe desktop {spec.name}" in screen, screen
            assert "image tiny v1" in screen, screen
            shown = "\n".join(screen)
            assert "ipw-" not in shown, f"{spec.name} shows its warm parent's name: {screen}"
            assert other.name not in shown, screen
