"""`imagepipe doctor` with several hosts, on the lab's real libvirt daemons (lab.py): one
line per host and check (connection, storage pool, free space, versions present), a host
that lacks a pool's version, and a cut-off host that FAILs saying what was tried."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.checks import Status
from imagepipe.cli.doctor import render
from imagepipe.doctor import run_checks
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.images.registry import NewVersion, Registry
from imagepipe.pool.model import BaseImage, HostSpec
from tests.multihost.conftest import remove_version
from tests.multihost.keeper_world import built_files
from tests.multihost.lab import HostLab

pytestmark = pytest.mark.real


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="iphvd-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def settings_file(lab: HostLab, workdir: Path) -> Path:
    hosts = "".join(
        f"  - {{name: {h.name}, uri: '{h.uri}', address: {h.address}}}\n" for h in lab.hosts
    )
    (workdir / "pools").mkdir()
    (workdir / "pools" / "dr.yml").write_text(
        "name: dr\nimage: tinydr\nsize: {initial: 1, free: 1, max: 2}\n"
        "display: {port_range: 5960-5961}\n"
    )
    path = workdir / "imagepipe.yml"
    path.write_text(
        "pools_dir: pools\nstate_db: state/state.db\nregistry: registry\n"
        "image_store: images\nrun_dir: run\nbalancer: {driver: none}\nhosts:\n" + hosts
    )
    return path


def upload_to(spec: HostSpec, base: BaseImage, registry: Registry, state: Path) -> None:
    def checksums(version: BaseImage) -> dict[str, str]:
        found = registry.resolve(version.image, version.version)
        return {a.name: a.sha256 for a in found.artifacts}

    hv = MultiHostHypervisor([spec], state_dir=state, checksums=checksums)
    try:
        hv.list_clones()
        deadline = time.monotonic() + 120
        while not hv.ensure_version(spec.name, base):
            assert time.monotonic() < deadline, f"the version did not reach {spec.name}"
            time.sleep(0.2)
    finally:
        hv.close()


def test_doctor_checks_each_host_and_names_a_missing_version_and_a_cut_host(
    lab: HostLab, lab_base: BaseImage, workdir: Path
) -> None:
    """host1 holds the pool's version, host2 does not (a warning naming the version and the
    pool), host3 is cut off: its line FAILs with the URI and the read-only connection that
    was tried, and the other hosts are still checked."""
    config = settings_file(lab, workdir)
    registry = Registry(workdir / "registry", workdir / "images")
    record = registry.register(
        NewVersion(
            image="tinydr",
            fingerprint="multihost-doctor-test",
            builder="test",
            packer_version="none",
            files=built_files(lab_base, workdir / "build"),
            disk=lab_base.disk,
            kernel=lab_base.kernel,
            initrd=lab_base.initrd,
            cmdline=lab_base.cmdline,
        )
    )
    base = record.base_image()
    host1, host2, host3 = (HostSpec(name=h.name, uri=h.uri, address=h.address) for h in lab.hosts)
    upload_to(host1, base, registry, workdir / "clones")
    remove_version(host2, base)
    lab.hosts[2].cut()
    try:
        started = time.monotonic()
        checks = {c.check: c for c in run_checks(config)}
        took = time.monotonic() - started
    finally:
        lab.hosts[2].mend()
        remove_version(host1, base)

    assert checks["host:host1"].status is Status.OK
    assert f"at {host1.uri} (read-only)" in checks["host:host1"].detail
    assert checks["host:host1:storage"].status is Status.OK
    assert checks["host:host1:space"].status is Status.OK
    assert " free of " in checks["host:host1:space"].detail
    assert checks["host:host1:versions"].status is Status.OK
    assert "tinydr v1" in checks["host:host1:versions"].detail

    lacking = checks["host:host2:versions"]
    assert checks["host:host2"].status is Status.OK
    assert lacking.status is Status.WARN
    assert "lacks tinydr v1 (pool dr)" in lacking.detail
    assert "uploads" in (lacking.fix or "")

    cut = checks["host:host3"]
    assert cut.status is Status.FAIL
    assert host3.uri in cut.detail and "read-only connection was tried" in cut.detail
    assert "start libvirtd on host3" in (cut.fix or "")
    assert not any(name.startswith("host:host3:") for name in checks)
    print(f"doctor with a cut host took {took:.2f} s")
    assert took < 10 + 5, took  # every host at once: one timeout at most

    report = render(list(checks.values())).splitlines()
    assert any(line.startswith("FAIL") and "host:host3 " in line for line in report)
    assert any(line.startswith("warn") and "host:host2:versions" in line for line in report)
