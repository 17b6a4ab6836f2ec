"""`imagepipe images import IMAGE --from-domain DOMAIN` on real libvirt: a powered-off golden
domain's disk becomes a read-only version, the domain goes on on an overlay backed by it, and
while the domain runs the version is not ready for clones."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.cli.app import main
from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
from imagepipe.images.registry import Registry
from tests.conftest import libvirt_available, require
from tests.guest import tiny_base_image
from tests.host import destroy_domains

pytestmark = pytest.mark.real
URI = "qemu:///system"

GOLDEN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <description>a golden VM an administrator patches by hand (imagepipe import test)</description>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet imagepipe.mode=desktop</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def golden() -> Iterator[tuple[str, Path]]:
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    import libvirt

    work = Path(tempfile.mkdtemp(prefix="ipi-", dir="/tmp"))
    base = tiny_base_image(work / "files")
    disk = work / "golden" / "golden.qcow2"
    disk.parent.mkdir()
    shutil.copy(base.directory / "disk.qcow2", disk)
    name = f"ipimport-{secrets.token_hex(3)}"
    conn = libvirt.open(URI)
    conn.defineXML(
        GOLDEN_XML.format(
            name=name,
            kernel=base.directory / "vmlinuz",
            initrd=base.directory / "initrd.img",
            disk=disk,
        )
    )
    conn.close()
    (work / "imagepipe.yml").write_text(
        f"state_db: {work / 'state.db'}\nregistry: {work / 'registry'}\n"
        f"image_store: {work / 'images'}\nrun_dir: {work / 'run'}\n"
        f"hypervisor: {{driver: libvirt, uri: '{URI}'}}\nbalancer: {{driver: none}}\n"
    )
    try:
        yield name, work
    finally:
        destroy_domains(name)
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_a_golden_domain_becomes_a_version_and_goes_on_on_an_overlay(
    golden: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    name, work = golden
    config = str(work / "imagepipe.yml")

    code = main(["--config", config, "images", "import", "tiny", "--from-domain", name, "--json"])

    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (doc["version"], doc["vm"], doc["builder"]) == (1, name, "libvirt-domain")
    frozen = Path(doc["directory"]) / "disk.qcow2"
    assert not frozen.stat().st_mode & 0o222, "the version's disk is writable"
    overlay = Path(doc["overlay"])
    assert str(overlay) in virsh("domblklist", name)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)], capture_output=True, check=True
        ).stdout
    )
    assert info["backing-filename"] == str(frozen)
    assert not (work / "golden" / "golden.qcow2").exists()  # its content is the version now

    registry = Registry(work / "registry", work / "images")
    base = registry.resolve("tiny", 1).base_image()
    hv = LibvirtHypervisor(URI, state_dir=work / "clones")
    try:
        assert hv.base_ready(base)
        virsh("start", name)  # the administrator patches the golden VM again
        assert not hv.base_ready(base), "clones could be made while the golden VM runs"
        code = main(["--config", config, "images", "import", "tiny", "--from-domain", name])
        assert code == 4
        assert "is running: shut it down first" in capsys.readouterr().err
        virsh("destroy", name)
        assert hv.base_ready(base)
    finally:
        hv.close()
