"""`imagepipe keep` as systemd runs it: a real process with NOTIFY_SOCKET and WATCHDOG_USEC,
reloaded with SIGHUP, scraped over HTTP, stopped with SIGTERM. The hypervisor is libvirt's
own test driver (test:///default: real libvirt, no guests), so this costs no VM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_libvirt_python
from tests.host import free_port

POOL = """\
name: {name}
image: tiny
size: {{initial: 1, free: 1, max: 2}}
display: {{port_range: {ports}}}
"""


@pytest.fixture
def libvirt_python() -> None:
    require_libvirt_python()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


def messages_until(sock: socket.socket, key: str) -> list[dict[str, str]]:
    seen = []
    while True:
        text = sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in text.splitlines())
        seen.append(message)
        if key in message:
            return seen


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.real
def test_keep_under_systemd_notifies_reloads_on_sighup_serves_metrics_and_stops_on_sigterm(
    tmp_path: Path, notify: socket.socket, libvirt_python: None
) -> None:
    port = free_port()
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL.format(name="lab", ports="5900-5901"))
    config = tmp_path / "imagepipe.yml"
    config.write_text(
        "pools_dir: pools\nstate_db: state.db\nrun_dir: run\nregistry: registry\n"
        "image_store: images\nhypervisor: {driver: libvirt, uri: 'test:///default'}\n"
        f"balancer: {{driver: none}}\nkeeper: {{tick: 1s, metrics: '127.0.0.1:{port}'}}\n"
    )
    log_file = tmp_path / "journal"  # stands in for journald's stream: JOURNAL_STREAM names it
    log_file.touch()
    stream = log_file.stat()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "10000000",
        "JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}",
    }
    env.pop("WATCHDOG_PID", None)
    argv = [sys.executable, "-c", "from imagepipe.cli.app import run; run()"]
    with log_file.open("w") as stderr:
        keeper = subprocess.Popen([*argv, "--config", str(config), "keep"], env=env, stderr=stderr)
    try:
        ready = messages_until(notify, "READY")
        assert ready[-1]["STATUS"].startswith("pools observed (lab)")
        assert any("WATCHDOG" in m for m in ready)  # pinged from the first pass on
        messages_until(notify, "STATUS")  # the first pass is done: its metrics are there
        assert scrape(port)["imagepipe_free_target[('pool', 'lab')]"] == 1.0

        (tmp_path / "pools" / "class.yml").write_text(POOL.format(name="class", ports="5910-5911"))
        keeper.send_signal(signal.SIGHUP)
        reload = messages_until(notify, "READY")
        assert any("RELOADING" in m for m in reload)
        messages_until(notify, "STATUS")  # a pass with the new configuration
        assert scrape(port)["imagepipe_free_target[('pool', 'class')]"] == 1.0

        keeper.send_signal(signal.SIGTERM)
        assert "STOPPING" in messages_until(notify, "STOPPING")[-1]
        keeper.wait(timeout=30)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
    lines = log_file.read_text().splitlines()
    assert keeper.returncode == 0, lines
    assert any(line.startswith("<6>") and "configuration reloaded" in line for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # journald stamps; we do not
