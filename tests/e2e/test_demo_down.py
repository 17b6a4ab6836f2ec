"""`imagepipe demo --down` while `imagepipe demo` still keeps the pool, on real components
(Packer + QEMU for the tiny image, libvirt desktops, HAProxy, the web entrance): `--down`
stops the demo's keeper first, so nothing brings HAProxy back, and leaves nothing listening
or running."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.pidlock import stop_holder
from imagepipe.cli import demo as demo_cli
from tests.conftest import libvirt_available, require, require_program
from tests.host import destroy_domains, domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = f"{demo_cli.POOL}-"
WAIT = 300.0  # build + one TCG desktop on a loaded 2-core host


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.fixture
def demo_dir() -> Iterator[tuple[Path, int, int]]:
    """A demo directory whose settings (kept by `imagepipe demo` as they are) put HAProxy and
    the web entrance on free ports and the pool on one desktop, so the test does not clash
    with a real demo."""
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    require(not domains(PREFIX), f"domains {PREFIX}* exist already (a demo runs on this host)")
    root = Path(tempfile.mkdtemp(prefix="ipe-demo-", dir="/tmp"))  # short: unix socket paths
    port, web_port = free_port(), free_port()
    (root / "pools").mkdir()
    (root / "imagepipe.yml").write_text(
        f"pools_dir: pools\npacker_dir: {ROOT / 'packer'}\nstate_db: state.db\n"
        "registry: registry\nimage_store: images\nrun_dir: run\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{port}'}}\n"
        "keeper: {tick: 1s}\n"
        f"web: {{bind: '127.0.0.1:{web_port}'}}\n"
    )
    (root / "pools" / f"{demo_cli.POOL}.yml").write_text(
        f"name: {demo_cli.POOL}\nimage: tiny\nchannel: latest\nstart: boot\n"
        "size: {initial: 1, free: 1, max: 1}\nmachine: {cpus: 1, memory: 192M}\n"
        "display: {port_range: 5970-5970, address: 127.0.0.1}\n"
    )
    try:
        yield root, port, web_port
    finally:
        with contextlib.suppress(Exception):
            stop_holder(root / "run" / "web.pid", "the demo's web entrance", timeout=10)
        destroy_domains(PREFIX)
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_demo_down_while_the_demo_keeps_its_pool_stops_the_keeper_and_leaves_nothing_listening(
    demo_dir: tuple[Path, int, int],
) -> None:
    root, port, web_port = demo_dir
    log = root / "demo.log"
    with log.open("wb") as out:
        keeping = subprocess.Popen(
            [sys.executable, "-m", "imagepipe", "demo", "--dir", str(root)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + WAIT
        while not (_listening(port) and domains(PREFIX) == [f"{PREFIX}0"]):
            assert keeping.poll() is None, f"the demo exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no demo desktop:\n{log.read_text()[-3000:]}"
            time.sleep(1.0)
        assert "Keeping the pool" in log.read_text()
        # the web entrance runs beside HAProxy, and the demo says where
        assert f"or open http://127.0.0.1:{web_port}/ in a web browser" in log.read_text()
        assert _listening(web_port)
        down = subprocess.run(
            [sys.executable, "-m", "imagepipe", "demo", "--down", "--dir", str(root)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert down.returncode == 0, down.stderr
        assert "The demo is down" in down.stderr
        time.sleep(3.0)  # three of the keeper's ticks: nothing may come back
        assert not _listening(port), "HAProxy listens again after --down said it stopped"
        assert not _listening(web_port), "the web entrance still listens after --down"
        assert f"the demo's web entrance on http://127.0.0.1:{web_port}/ is stopped" in (
            down.stderr
        )
        assert domains(PREFIX) == []
        haproxy_pid = root / "run" / "haproxy.pid"
        assert not haproxy_pid.exists() or not _alive(int(haproxy_pid.read_text().split()[0]))
        assert keeping.poll() == 0, "the demo's keeper still runs after --down"
        assert f"the demo's keeper (pid {keeping.pid}) is stopped" in down.stderr
    finally:
        if keeping.poll() is None:
            keeping.terminate()
            keeping.wait(timeout=60)
