"""`imagepipe doctor` with driver virtualbox: each missing piece with its fix."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from imagepipe import doctor
from imagepipe.doctor import Status, ok
from imagepipe.hypervisors.virtualbox import checks as virtualbox_checks
from tests import vboxsim


def fake_vboxmanage(folder: Path, extpacks: str) -> None:
    script = folder / "VBoxManage"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo 7.0.14r161095; exit 0; fi\n'
        f"cat <<'EOF'\n{extpacks}\nEOF\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_without_virtualbox_the_check_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (check,) = virtualbox_checks.check_virtualbox_host()
    assert check.status is Status.FAIL and "VBoxManage is not installed" in check.detail
    assert check.fix is not None and "VirtualBox 6.1 or 7.x" in check.fix


def test_version_driver_extension_pack_and_pyvbox_are_each_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vboxmanage(tmp_path, "Extension Packs: 0")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    modules = tmp_path / "modules"
    modules.write_text("ext4 1 0 - Live\n")
    checks = {c.check: c for c in virtualbox_checks.check_virtualbox_host(modules)}
    assert checks["virtualbox"].status is Status.OK
    assert "7.0.14" in checks["virtualbox"].detail
    assert checks["vboxdrv"].status is Status.FAIL
    assert checks["vboxdrv"].fix == "run /sbin/vboxconfig"
    assert checks["vrde"].status is Status.FAIL
    assert "extpack install" in (checks["vrde"].fix or "")
    assert "pyvbox" in checks


def test_pyvbox_with_virtualboxs_vboxapi_importable_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vboxmanage(tmp_path, "Extension Packs: 0")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(vboxsim.SIM_DIR)  # a vboxapi with VirtualBoxManager

    checks = {c.check: c for c in virtualbox_checks.check_virtualbox_host(tmp_path / "none")}

    assert checks["pyvbox"] == ok("pyvbox", "pyvbox and VirtualBox's vboxapi import")


def test_pyvbox_without_virtualboxs_vboxapi_fails_and_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vboxmanage(tmp_path, "Extension Packs: 0")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "vboxapi", None)  # not importable, wherever pyvbox looks

    checks = {c.check: c for c in virtualbox_checks.check_virtualbox_host(tmp_path / "none")}

    pyvbox = checks["pyvbox"]
    assert pyvbox.status is Status.FAIL
    assert "VirtualBox's Python API is not usable" in pyvbox.detail
    assert "vboxapi" in pyvbox.detail
    assert pyvbox.fix == "pip install 'imagepipe[virtualbox]'"


def test_a_usable_extension_pack_and_a_loaded_driver_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vboxmanage(
        tmp_path,
        "Extension Packs: 1\nPack no. 0:   Oracle VM VirtualBox Extension Pack\n"
        "Usable:       true\nVRDE Module:  VBoxVRDP",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    modules = tmp_path / "modules"
    modules.write_text("vboxdrv 696320 2 vboxnetadp,vboxnetflt, Live 0x0 (O)\n")
    checks = {c.check: c for c in virtualbox_checks.check_virtualbox_host(modules)}
    assert checks["vboxdrv"].status is Status.OK
    assert checks["vrde"].status is Status.OK


def test_each_pools_base_vm_is_checked_powered_off_unlocked_and_snapshotted(
    tmp_path: Path,
) -> None:
    from imagepipe.config import HypervisorSettings, Settings
    from imagepipe.images.registry import NewVersion, Registry
    from imagepipe.pool.model import PoolSpec
    from tests import vboxsim
    from tests.vboxsim.api import Session
    from tests.vboxsim.fixtures import base_vm, blank_disk

    host = vboxsim.start(tmp_path / "vbox")
    try:
        base = base_vm(host, blank_disk(tmp_path / "disk.qcow2"))
        registry = Registry(tmp_path / "registry", tmp_path / "images")
        registry.register(
            NewVersion(image="win10", fingerprint="f", builder="virtualbox-vm",
                       packer_version="", files=(), vm=base.vm, snapshot="clean")
        )  # fmt: skip
        settings = Settings(
            registry=tmp_path / "registry",
            image_store=tmp_path / "images",
            hypervisor=HypervisorSettings(driver="virtualbox"),
        )
        pools = [PoolSpec(name="lab", image="win10")]
        (ready,) = doctor.check_virtualbox_bases(settings, pools)
        host.vbox.findMachine(base.vm or "").launchVMProcess(
            Session(), "headless", []
        ).waitForCompletion(-1)
        (running,) = doctor.check_virtualbox_bases(settings, pools)
    finally:
        vboxsim.stop(host)
    assert ready.status is Status.OK and "imagepipe-tiny-v1" in ready.detail
    assert running.status is Status.WARN and "power off imagepipe-tiny-v1" in (running.fix or "")
