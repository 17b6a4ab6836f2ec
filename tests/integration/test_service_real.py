"""The keeper service on the real components: `imagepipe keep` under a NOTIFY_SOCKET with
metrics on, libvirt/QEMU desktops of the tiny image behind a real HAProxy. A person with a
real VNC client library (vncdotool) through HAProxy sees the desktop's screen, logs in and
out with the keyboard, and the keeper sees the user; then `imagepipe pools down`: the free
desktop goes at once, the user's desktop when the user leaves, and the balancer entries with
them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from vncdotool import api as vnc

from tests.conftest import libvirt_available, require, require_program
from tests.guest import VncClient
from tests.host import destroy_domains, domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "svcdown"
PORTS = (5976, 5979)
WAIT = 240.0  # TCG guests on a shared 2-core host


@dataclass
class Service:
    root: Path
    config: Path
    bind_port: int
    metrics_port: int
    notify: socket.socket
    keeper: subprocess.Popen[bytes] | None = None
    heard: queue.Queue[dict[str, str]] = field(default_factory=queue.Queue)

    def listen(self) -> None:
        """Read the notify socket all along, as systemd does."""
        while True:
            try:
                text = self.notify.recv(4096).decode()
            except OSError:
                return
            self.heard.put(dict(line.split("=", 1) for line in text.splitlines()))

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"imagepipe {args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done.stdout

    def pool(self) -> dict[str, Any]:
        doc = json.loads(self.cli("status", "--json"))
        result: dict[str, Any] = next(p for p in doc["pools"] if p["name"] == POOL)
        return result

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.keeper is not None and self.keeper.poll() is None, self.log()
            last = self.pool()
            if check(last):
                return last
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}: {json.dumps(last)}\n{self.log()}")

    def message(self, key: str) -> dict[str, str]:
        while True:
            message = self.heard.get(timeout=WAIT)
            if key in message:
                return message

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def log(self) -> str:
        path = self.root / "keeper.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    repo = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="ipe-svc-", dir="/tmp"))  # short: unix socket paths
    destroy_domains(f"{POOL}-")
    (root / "pools").mkdir()
    bind_port, metrics_port = free_port(), free_port()
    config = root / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {root / 'pools'}\npacker_dir: {repo / 'packer'}\n"
        f"state_db: {root / 'state' / 'state.db'}\nregistry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\nrun_dir: {root / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
        f"keeper: {{tick: 1s, metrics: '127.0.0.1:{metrics_port}'}}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nsize: {{initial: 1, free: 1, max: 2}}\n"
        "machine: {cpus: 1, memory: 192M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        "sessions: {recycle_after: 2s}\nboot_timeout: 3m\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify.sock"))
    s = Service(root, config, bind_port, metrics_port, notify)
    threading.Thread(target=s.listen, daemon=True).start()
    # The guest is built into a cache of this test's own: build-guest.sh keeps one build per
    # cache, so a guest changed here must not evict the one other test runs share.
    cache = root / "guest-cache"
    shared_debs = Path("/var/cache/imagepipe/guest/debs")
    if shared_debs.is_dir():
        shutil.copytree(shared_debs, cache / "debs")
    os.environ["IMAGEPIPE_CACHE"] = str(cache)
    try:
        s.cli("build", "tiny")
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(root / "notify.sock"),
            "WATCHDOG_USEC": "60000000",
        }
        with (root / "keeper.log").open("wb") as out:
            s.keeper = subprocess.Popen(
                [sys.executable, "-m", "imagepipe", "--config", str(config), "keep"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        yield s
    finally:
        if s.keeper is not None and s.keeper.poll() is None:
            s.keeper.send_signal(signal.SIGTERM)
            s.keeper.wait(timeout=120)
        notify.shutdown(socket.SHUT_RDWR)
        notify.close()
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        os.environ.pop("IMAGEPIPE_CACHE", None)
        shutil.rmtree(root, ignore_errors=True)


def free_ready(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pool["clones"] if c["state"] == "free" and c["balancer"] == "ready"]


def screen(viewer: Any, path: Path) -> Image.Image:
    viewer.captureScreen(str(path))
    return Image.open(path).convert("L")


def test_a_person_sees_the_desktop_and_logs_in_and_out_with_the_keyboard(
    service: Service, tmp_path: Path
) -> None:
    ready = service.message("READY")
    assert ready["STATUS"].startswith(f"pools observed ({POOL}), balancer up")
    service.wait_for("a free desktop behind HAProxy", lambda p: len(free_ready(p)) == 1)
    viewer = vnc.connect(f"127.0.0.1::{service.bind_port}", timeout=60)
    try:
        before = screen(viewer, tmp_path / "before.png")
        for key in "alice":
            viewer.keyPress(key)
        viewer.keyPress("enter")
        pool = service.wait_for(
            "alice logged in", lambda p: any(c["users"] == ["alice"] for c in p["clones"])
        )
        after = screen(viewer, tmp_path / "after.png")
        for key in "exit":
            viewer.keyPress(key)
        viewer.keyPress("enter")
        service.wait_for("alice logged out", lambda p: not any(c["users"] for c in p["clones"]))
    finally:
        viewer.disconnect()
    shot = os.environ.get("IMAGEPIPE_SCREENSHOT")
    if shot:  # README's picture: IMAGEPIPE_SCREENSHOT=docs/desktop.png pytest …
        after.save(shot)

    (desktop,) = [c for c in pool["clones"] if c["users"] == ["alice"]]
    assert desktop["state"] == "in_use" and desktop["balancer"] != "ready"
    lit = sum(1 for v in after.tobytes() if v > 64)
    assert lit > 2000  # text on the screen, not a black one
    assert before.tobytes() != after.tobytes()  # the typed login shows


def test_ready_then_pools_down_removes_the_free_desktop_now_and_the_users_after_logoff(
    service: Service,
) -> None:
    service.wait_for("a free desktop behind HAProxy", lambda p: len(free_ready(p)) == 1)

    viewer = VncClient("127.0.0.1", service.bind_port, timeout=30)
    try:
        desktop = viewer.handshake().removeprefix("QEMU (").removesuffix(")")
        service.wait_for(
            "the user's desktop in use and a new free one",
            lambda p: (
                any(c["name"] == desktop and c["state"] == "in_use" for c in p["clones"])
                and len(free_ready(p)) == 1
            ),
        )
        service.cli("pools", "down", POOL)
        pool = service.wait_for(
            "only the user's desktop left",
            lambda p: p["total"] == 1 and len(p["clones"]) == 1,  # the free one deleted, forgotten
        )
        (left,) = pool["clones"]
        assert (left["name"], left["balancer"], pool["going_down"]) == (
            desktop,
            "drain",
            "as sessions end",
        )
        assert domains(f"{POOL}-") == [desktop]
        scraped = service.metrics()
        pool_label = json.dumps({"pool": POOL})
        assert scraped["imagepipe_pool_going_down" + pool_label] == 1.0
        assert left["state"] in {"retiring", "in_use"}  # drained, removed when the user leaves
        on_it = json.dumps({"pool": POOL, "state": left["state"], "version": "1"})
        assert scraped["imagepipe_desktops" + on_it] == 1.0
    finally:
        viewer.close()

    pool = service.wait_for("nothing left", lambda p: p["total"] == 0 and not p["clones"])
    assert domains(f"{POOL}-") == []
    assert "is down" in service.cli("status", POOL)
    drained = json.dumps({"pool": POOL, "state": "drain"})
    assert service.metrics()["imagepipe_balancer_backends" + drained] == 0.0

    assert service.keeper is not None
    service.keeper.send_signal(signal.SIGTERM)
    assert service.message("STOPPING")["STOPPING"] == "1"
    assert service.keeper.wait(timeout=120) == 0
