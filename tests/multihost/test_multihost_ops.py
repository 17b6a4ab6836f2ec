"""Operating several hosts, on the lab's real libvirt daemons (lab.py): an upload's progress
as another process sees it (`imagepipe status`, `imagepipe hosts`), the multi-host
hypervisor's close() with a hung host."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.app.hosts import rows
from imagepipe.app.status import SCHEMA, HostStatus
from imagepipe.cli.status import host_summary
from imagepipe.errors import FatalHypervisorError
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.hypervisors.libvirt.volumes import CHUNK
from imagepipe.pool.model import BaseImage, HostSpec
from imagepipe.pool.ports import HypervisorEvent
from imagepipe.record import replace
from imagepipe.stores.sqlite import SQLiteStore
from tests.multihost.conftest import registry_checksums, remove_version
from tests.multihost.lab import HostLab, NamespacedHost
from tests.multihost.test_multihost_libvirt import lab_spec

pytestmark = pytest.mark.real


def spec_of(host: NamespacedHost) -> HostSpec:
    return HostSpec(name=host.name, uri=host.uri, address=host.address)


@pytest.fixture
def held_upload(lab: HostLab, lab_base: BaseImage, tmp_path: Path) -> Iterator[dict[str, object]]:
    """An upload of a version to host2 held after its first chunk (its progress callback
    waits), so another connection can look at it half-way."""
    spec = spec_of(lab.hosts[1])
    base = replace(lab_base, image="tinyup", version=7)
    remove_version(spec, base)
    sender = MultiHostHypervisor(
        [spec], state_dir=tmp_path / "sender", checksums=registry_checksums
    )
    paused, resume = threading.Event(), threading.Event()
    seen: dict[str, object] = {"base": base, "spec": spec, "resume": resume}

    def progress(sent: int, total: int) -> None:
        seen["total"] = total
        if sent >= CHUNK and not paused.is_set():
            seen["held_at"] = sent
            paused.set()
            resume.wait(60)

    def send() -> None:
        try:
            sender.host(spec.name).upload(base, registry_checksums(base), progress)
        except Exception as exc:  # reported by the test
            seen["error"] = exc
        finally:
            paused.set()

    seen["started"] = time.time()
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        assert paused.wait(60), "the upload did not get past its first chunk"
        yield seen
    finally:
        resume.set()
        thread.join(60)
        sender.close()
        remove_version(spec, base)
    assert "error" not in seen, seen.get("error")


def test_an_upload_under_way_shows_how_far_and_since_when_to_another_process(
    held_upload: dict[str, object], tmp_path: Path
) -> None:
    """While a keeper sends a version to host2, `imagepipe status` and `imagepipe hosts` (their
    own connection, as another process has) show that upload: bytes on the host of the
    version's total, since when; once it is done, the version instead."""
    spec = held_upload["spec"]
    base = held_upload["base"]
    assert isinstance(spec, HostSpec) and isinstance(base, BaseImage)
    total = held_upload["total"]
    watcher = MultiHostHypervisor(
        [spec], state_dir=tmp_path / "watcher", checksums=registry_checksums
    )
    store = SQLiteStore(tmp_path / "state.db")
    try:
        watcher.list_clones()
        [state] = watcher.hosts()
        upload = state.upload
        assert upload is not None, state
        assert (upload.image, upload.version) == ("tinyup", 7)
        assert upload.total == total
        assert 0 < upload.sent < upload.total
        assert upload.since is not None
        assert held_upload["started"] - 5 <= upload.since <= time.time() + 5  # type: ignore[operator]
        assert ("tinyup", 7) not in state.versions

        summary = host_summary(HostStatus(SCHEMA, time.time(), (), (), None, hosts=(state,)))
        assert summary is not None and "host2: 0 desktops" in summary
        assert f"; uploading tinyup v7: {upload.amount()} since " in summary
        [row] = rows([spec], {spec.name: state}, store, [], time.time())
        assert row.upload == upload.describe() and row.upload_since == upload.since

        resume = held_upload["resume"]
        assert isinstance(resume, threading.Event)
        resume.set()
        deadline = time.monotonic() + 60
        while True:
            watcher.list_clones()
            [state] = watcher.hosts()
            if ("tinyup", 7) in state.versions:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert state.upload is None
    finally:
        watcher.close()
        store.close()


def test_a_new_host_list_connects_the_added_host_and_closes_the_removed_one(
    lab: HostLab, lab_base: BaseImage, tmp_path: Path
) -> None:
    """set_hosts (a SIGHUP reload of hosts:) on the real hosts: host3 added is observed and
    its events reach the subscriber the keeper made before; host2 removed is no longer
    asked (its libvirt connection closed); host1's new labels are its spec."""
    host1, host2, host3 = (spec_of(h) for h in lab.hosts)
    hv = MultiHostHypervisor([host1, host2], state_dir=tmp_path, checksums=registry_checksums)
    events: list[HypervisorEvent] = []
    subscription = hv.subscribe(events.append)
    try:
        hv.list_clones()
        assert {h.name for h in hv.hosts() if h.connected} == {"host1", "host2"}
        removed = hv.host("host2")
        relabelled = replace(host1, labels=("gpu",))

        hv.set_hosts([relabelled, host3])

        hv.list_clones()
        assert [(h.name, h.connected) for h in hv.hosts()] == [("host1", True), ("host3", True)]
        assert hv.host("host1").host == relabelled
        assert not removed.connected
        with pytest.raises(FatalHypervisorError, match="no host named 'host2'"):
            hv.host("host2")
        spec = lab_spec(lab_base, "reload", 1, lab.hosts[2])
        hv.create_clone(spec)
        hv.start(spec.name)
        deadline = time.monotonic() + 20
        while not any(e.clone == spec.name for e in events):
            assert time.monotonic() < deadline, f"no event of {spec.name} from host3: {events}"
            time.sleep(0.1)
    finally:
        subscription.close()
        for clone in hv.list_clones():
            if clone.pool == "reload":
                hv.delete(clone.name)
        hv.close()


CLOSE_WITH_A_HUNG_HOST = """
import json, sys, threading, time
from pathlib import Path
from imagepipe.hypervisors.libvirt.multihost import MultiHostHypervisor
from imagepipe.pool.model import HostSpec
hosts = [HostSpec(**h) for h in json.loads(sys.argv[1])]
hv = MultiHostHypervisor(hosts, state_dir=Path(sys.argv[2]), checksums=dict, observe_timeout=2.0)
hv.list_clones()
print(json.dumps([[h.name, h.connected] for h in hv.hosts()]), flush=True)
started = time.monotonic()
hv.close()
print(json.dumps({"close": time.monotonic() - started}), flush=True)
"""


def test_close_with_a_hung_host_returns_and_the_process_can_exit(
    lab: HostLab, tmp_path: Path
) -> None:
    """libvirtd of host1 stopped (SIGSTOP: it accepts the connection, never answers): the
    observer thread of host1 hangs in libvirt. close() still returns within seconds and the
    process exits (the keeper stops on SIGTERM), instead of waiting for host1 for ever."""
    import json
    import os
    import signal
    import subprocess
    import sys

    host1 = lab.hosts[0]
    assert host1.daemon_pid is not None
    hosts = json.dumps(
        [{"name": h.name, "uri": h.uri, "address": h.address} for h in lab.hosts[:2]]
    )
    os.kill(host1.daemon_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-c", CLOSE_WITH_A_HUNG_HOST, hosts, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the process did not exit within 30 s: {out} {err[-2000:]}")
        took = time.monotonic() - started
    finally:
        os.kill(host1.daemon_pid, signal.SIGCONT)
    assert process.returncode == 0, err[-2000:]
    seen, closed = (json.loads(line) for line in out.splitlines())
    assert seen == [["host1", False], ["host2", True]]
    print(f"close() with a hung host took {closed['close']:.2f} s; the process {took:.1f} s")
    assert closed["close"] < 8.0, closed
    assert took < 25.0, took
