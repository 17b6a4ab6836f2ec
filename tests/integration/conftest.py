"""The real balancers' fixtures, shared by test_haproxy.py, test_ipvs.py and the scenarios
both run (test_balancer_pairs.py). The director test machine boots once for the package."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.pool.model import Endpoint
from tests.conftest import require, require_program
from tests.host import free_port
from tests.integration.balancers import NAMES, HAProxyHarness, IPVSHarness
from tests.ipvs_director import Director, build_director


@pytest.fixture
def haproxy_harness() -> Iterator[HAProxyHarness]:
    """A fresh HAProxy for one test; stopped even when the test fails."""
    require_program("haproxy")
    # unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer
    workdir = Path(tempfile.mkdtemp(prefix="ipx-haproxy-"))
    harness = HAProxyHarness(workdir, Endpoint("127.0.0.1", free_port()))
    try:
        yield harness
    finally:
        harness.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="package")
def director(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Director]:
    require_program("qemu-system-x86_64")
    require(
        Path("/bin/busybox").exists(), "busybox-static is not installed (scripts/setup-host.sh)"
    )
    work = tmp_path_factory.mktemp("ipvs-director")
    files = build_director(work / "files")
    machine = Director.boot(files, work / "run")
    print(f"director booted in {machine.boot_seconds:.1f} s")
    try:
        yield machine
    finally:
        machine.stop()


@pytest.fixture
def ipvs_harness(director: Director) -> Iterator[IPVSHarness]:
    """The director's IPVS kernel, from an empty table, for one test."""
    director.run("ipvsadm", "-C")
    director.run("rm", "-f", NAMES)
    director.run("sysctl", "-w", "net.ipv4.vs.expire_nodest_conn=0")
    director.run("sysctl", "-w", "net.ipv4.vs.expire_quiescent_template=1")
    harness = IPVSHarness(director)
    try:
        yield harness
    finally:
        harness.cleanup()
