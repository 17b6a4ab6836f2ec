"""The session's namespaced libvirt hosts (tests/multihost/lab.py) and a tiny base image.

Three hosts: host1 and host2 over qemu+tcp://, host3 over qemu+tls:// with the lab's CA.
Made once per session (about 10 s), torn down at its end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.hypervisors.libvirt.hypervisor import import_libvirt
from imagepipe.hypervisors.libvirt.volumes import delete_version, storage_pool
from imagepipe.images.checksum import sha256_file
from imagepipe.pool.model import BaseImage, HostSpec
from tests.conftest import require, require_program
from tests.guest import tiny_base_image
from tests.multihost.lab import HostLab


@pytest.fixture(scope="session")
def lab() -> Iterator[HostLab]:
    require(os.geteuid() == 0, "the multi-host lab makes network namespaces: run as root")
    for program in ("ip", "unshare", "libvirtd", "tini", "virsh", "qemu-system-x86_64"):
        require_program(program)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        require(False, "python cryptography is missing (pip install -e '.[dev]')")
    root = Path(tempfile.mkdtemp(prefix="iphv-", dir="/tmp"))
    try:
        with HostLab(root, count=3, tls=frozenset({3})) as made:
            yield made
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def lab_base() -> Iterator[BaseImage]:
    """The tiny guest as a registered version (kernel, initrd, disk)."""
    folder = Path(tempfile.mkdtemp(prefix="iphv-base-", dir="/tmp"))
    try:
        yield tiny_base_image(folder / "tiny-v1", image="tinymh", version=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def registry_checksums(base: BaseImage) -> dict[str, str]:
    """What the registry records at registration: each file's sha256."""
    return {
        f: sha256_file(base.directory / f)
        for f in (base.disk, base.kernel, base.initrd)
        if f is not None and (base.directory / f).is_file()
    }


def remove_version(spec: HostSpec, base: BaseImage) -> None:
    """The version's volumes gone from the host (a test's own version, at its end)."""
    libvirt, _ = import_libvirt()
    conn = libvirt.open(spec.uri)
    try:
        delete_version(libvirt, storage_pool(libvirt, conn, spec.name), base, spec.name)
    finally:
        conn.close()
