"""Clone disks with the real qemu-img: overlays, full copies, and base readiness."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagepipe.errors import CloneNotFoundError, EnvironmentMissingError, FatalHypervisorError
from imagepipe.hypervisors.libvirt.disks import disk_usable, make_clone_disk, remove_partial_disks
from imagepipe.pool.model import CloneMode
from tests.conftest import require_libvirt_python, require_program

pytestmark = pytest.mark.real


@pytest.fixture
def base(tmp_path: Path) -> Path:
    require_program("qemu-img")
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


def test_a_linked_clone_disk_is_an_overlay_on_the_base(base: Path, tmp_path: Path) -> None:
    target = tmp_path / "disks" / "lab-1.qcow2"
    make_clone_disk(base, target, CloneMode.LINKED)
    assert info(target)["backing-filename"] == str(base.resolve())
    assert not target.with_name("lab-1.qcow2.partial").exists()


def test_a_half_written_disk_left_by_a_kill_is_removed_when_the_next_disk_is_made(
    base: Path, tmp_path: Path
) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    # what kill -9 during `qemu-img create` of lab-3 leaves: its .partial, never renamed
    left = disks / "lab-3.qcow2.partial"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(left), "16M"], check=True)

    make_clone_disk(base, disks / "lab-0.qcow2", CloneMode.LINKED)  # another slot

    assert sorted(p.name for p in disks.iterdir()) == ["lab-0.qcow2"]


def test_the_sweep_removes_only_partial_disks(base: Path, tmp_path: Path) -> None:
    make_clone_disk(base, tmp_path / "lab-0.qcow2", CloneMode.LINKED)
    (tmp_path / "lab-1.qcow2.partial").write_bytes(b"QFI\xfb")
    (tmp_path / "notes.partial").write_text("not a clone disk")

    removed = remove_partial_disks(tmp_path)

    assert [p.name for p in removed] == ["lab-1.qcow2.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.qcow2",
        "lab-0.qcow2",
        "notes.partial",
    ]
    assert info(tmp_path / "lab-0.qcow2")["format"] == "qcow2"
    assert remove_partial_disks(tmp_path / "nowhere") == []


def test_a_failed_qemu_img_leaves_no_partial_disk(tmp_path: Path) -> None:
    require_program("qemu-img")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x03")  # a qcow2 header cut short
    target = tmp_path / "disks" / "lab-4.qcow2"
    with pytest.raises(FatalHypervisorError):
        make_clone_disk(broken, target, CloneMode.FULL)
    assert list(target.parent.iterdir()) == []


def test_a_full_clone_disk_stands_alone(base: Path, tmp_path: Path) -> None:
    target = tmp_path / "lab-2.qcow2"
    make_clone_disk(base, target, CloneMode.FULL)
    assert "backing-filename" not in info(target)


def test_a_clone_of_a_missing_base_names_the_missing_file(tmp_path: Path) -> None:
    require_program("qemu-img")
    with pytest.raises(CloneNotFoundError, match=r"gone\.qcow2"):
        make_clone_disk(tmp_path / "gone.qcow2", tmp_path / "x.qcow2", CloneMode.LINKED)


def test_a_base_that_a_running_qemu_writes_is_not_ready_until_it_lets_go(base: Path) -> None:
    require_program("qemu-io")
    assert disk_usable(base)
    writer = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        # qemu-io answers a command only once it has the image open (and its write lock):
        # no polling, so a busy machine cannot make this test flaky
        writer.stdin.write(b"length\n")
        writer.stdin.flush()
        answer = writer.stdout.readline()
        assert b"MiB" in answer, f"qemu-io did not open the image: {answer!r}"
        assert not disk_usable(base), "a base a running QEMU writes was reported ready"
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)
    assert disk_usable(base)


def test_a_truncated_or_missing_base_is_not_ready(tmp_path: Path) -> None:
    require_program("qemu-img")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x03")  # a qcow2 header cut short
    assert not disk_usable(broken)
    assert not disk_usable(tmp_path / "missing.qcow2")


def test_a_libvirt_that_does_not_answer_is_an_environment_error_naming_the_uri(
    tmp_path: Path,
) -> None:
    require_libvirt_python()
    from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor

    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(EnvironmentMissingError, match=r"nonexistent.*install\.sh"):
        LibvirtHypervisor(uri, state_dir=tmp_path)
