"""End to end, on real components: `imagepipe rollout` moves a pool of real tiny desktops
(Packer build, libvirt + QEMU, HAProxy with `persist: source`) onto new versions while users
work, driven as an administrator and users would: the CLI (`rollout … --wait --json` in the
background), VNC clients through HAProxy from their own loopback addresses, and the
desktops' serial consoles.

One keeper per module; the pool follows the channel `stable`, which only `rollout` moves
(a build moves `latest`). Each test leaves the pool converged on the newest version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import libvirt_available, require, require_program
from tests.guest import SerialConsole, VncClient
from tests.host import destroy_domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "roll"
FREE = 2
MAX = 3
PORTS = (6380, 6389)  # not used by any other test module
WAIT = 240.0  # TCG guests on 2 shared cores


class Viewer(VncClient):
    """A VNC viewer on a user's own machine: its own (loopback) address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        )
        self.address = f"{source}:{self.sock.getsockname()[1]}"

    def desktop(self) -> str:
        return self.handshake().removeprefix("QEMU (").removesuffix(")")


@dataclass
class Host:
    root: Path
    config: Path
    bind_port: int
    keeper: subprocess.Popen[bytes] | None = None
    keeper_log: Path | None = None
    followers: list[subprocess.Popen[str]] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imagepipe", "--config", str(self.config), *args]

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"imagepipe {' '.join(args)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def rollout(self, *args: str) -> subprocess.Popen[str]:
        """`imagepipe rollout … --wait --json` in the background, as CI runs it."""
        follower = subprocess.Popen(
            self.command("rollout", *args, "--wait", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.followers.append(follower)
        return follower

    def start_keeper(self) -> None:
        self.keeper_log = self.root / f"keeper-{time.monotonic_ns()}.log"
        with self.keeper_log.open("wb") as out:
            self.keeper = subprocess.Popen(
                self.command("--log-level", "debug", "keep"), stdout=out, stderr=subprocess.STDOUT
            )

    def kill_keeper(self) -> None:
        assert self.keeper is not None
        self.keeper.send_signal(signal.SIGKILL)
        self.keeper.wait(timeout=60)
        self.keeper = None

    def status(self) -> dict[str, Any]:
        doc = json.loads(self.cli("status", "--json"))
        pool: dict[str, Any] = next(p for p in doc["pools"] if p["name"] == POOL)
        return pool

    def keeper_output(self) -> str:
        return self.keeper_log.read_text(errors="replace")[-5000:] if self.keeper_log else ""

    def wait_for(
        self,
        what: str,
        check: Callable[[dict[str, Any]], bool],
        *,
        also: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll status until `check`; `also` asserts an invariant on every status seen."""
        deadline = time.monotonic() + WAIT
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if also is not None:
                also(last)
            if check(last):
                return last
            time.sleep(1.0)
        raise AssertionError(
            f"timed out waiting for {what}; last status:\n{json.dumps(last, indent=1)[-3000:]}"
            f"\nkeeper log:\n{self.keeper_output()}"
        )

    def console(self, clone: str) -> SerialConsole:
        return SerialConsole(self.root / "state" / "clones" / "sockets" / f"{clone}.console")

    def history(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = json.loads(
            self.cli("rollout", "status", "tiny", "--all", "--json")
        )
        return docs


def free_ready(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pool["clones"] if c["state"] == "free" and c["balancer"] == "ready"]


def clone(pool: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in pool["clones"] if c["name"] == name), None)


def serving(pool: dict[str, Any]) -> list[dict[str, Any]]:
    """Desktops a new user can get now: ready in HAProxy, nobody on them."""
    return [
        c
        for c in pool["clones"]
        if c["balancer"] == "ready" and c["connections"] == 0 and not c["users"]
    ]


def never_below_free(pool: dict[str, Any]) -> None:
    assert len(serving(pool)) >= FREE, f"free desktops fell below {FREE}: {pool['clones']}"


def finished(
    process: subprocess.Popen[str], timeout: float = WAIT
) -> tuple[int, list[dict[str, Any]]]:
    out, err = process.communicate(timeout=timeout)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {err}"
    return process.returncode, lines


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    repo = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="ipr-e2e-", dir="/tmp"))
    destroy_domains(f"{POOL}-")
    (root / "pools").mkdir()
    bind_port = free_port()
    config = root / "imagepipe.yml"
    config.write_text(
        f"pools_dir: {root / 'pools'}\n"
        f"packer_dir: {repo / 'packer'}\n"
        f"state_db: {root / 'state' / 'state.db'}\n"
        f"registry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\n"
        f"run_dir: {root / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true, "
        "persist: source}\n"
        "keeper: {tick: 1s, parallel: 3}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nchannel: stable\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 192M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        "sessions: {on_logoff: reset, recycle_after: 2s}\n"
        "failures: {max: 2, backoff: 1s, cooldown: 1m}\n"
        "boot_timeout: 120s\n"
    )
    h = Host(root=root, config=config, bind_port=bind_port)
    try:
        h.cli("build", "tiny")
        h.cli("images", "promote", "tiny", "1", "--channel", "stable")
        h.start_keeper()
        yield h
    finally:
        for follower in h.followers:  # a failed test may leave one following
            if follower.poll() is None:
                follower.kill()
                follower.wait(timeout=30)
        if h.keeper is not None:
            h.keeper.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.keeper.wait(timeout=60)
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_drain_rollout_keeps_the_session_and_the_user_comes_back_to_it(host: Host) -> None:
    """While alice works on v1: build v2, `rollout tiny --drain --wait` (and a kill -9 of the
    keeper half-way): free desktops become v2, never fewer than the free target; alice's
    desktop drains with her session and files; her viewer reconnects to it; at her logoff
    it goes, and the rollout is done."""
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    viewer = Viewer(host.bind_port, "127.0.0.31")
    mine = viewer.desktop()
    with host.console(mine) as console:
        console.login("alice")
        console.run("echo alice-work > /home/alice-file && sync")
        host.wait_for(
            f"{mine} in use", lambda p: (c := clone(p, mine)) is not None and c["state"] == "in_use"
        )
        host.cli("build", "tiny", "--force")  # v2: `latest` moves, `stable` does not
        assert host.status()["version"] == 1
        dry = host.cli("rollout", "tiny", "--dry-run")
        assert "1 wait for a logoff" in dry and "nothing was changed" in dry
        assert host.status()["version"] == 1

        follower = host.rollout("tiny", "--drain")
        host.wait_for(
            "a v2 desktop",
            lambda p: any(c["version"] == 2 for c in p["clones"]),
            also=never_below_free,
        )
        host.kill_keeper()
        host.start_keeper()
        pool = host.wait_for(
            "free desktops all on v2",
            lambda p: len(free_ready(p)) >= FREE and all(c["version"] == 2 for c in free_ready(p)),
            also=never_below_free,
        )
        state = clone(pool, mine)
        assert state is not None and state["version"] == 1
        assert state["state"] == "retiring" and state["balancer"] != "ready"
        assert "alice-work" in console.run("cat /home/alice-file"), "her session lost its files"

        viewer.close()  # her connection drops; she reconnects from her own machine
        again = Viewer(host.bind_port, "127.0.0.31")
        assert again.desktop() == mine, "the returning user did not reach her session"
        newcomer = Viewer(host.bind_port, "127.0.0.32")
        assert newcomer.desktop() != mine, "a new user reached a draining desktop"
        newcomer.close()
        console.logout()
        again.close()

    code, lines = finished(follower)
    assert code == 0, lines[-1]
    assert lines[-1]["state"] == "done"
    pool = host.wait_for(f"{mine} gone", lambda p: clone(p, mine) is None)
    assert all(c["version"] == 2 for c in pool["clones"])
    assert host.history()[0]["state"] == "done"


def test_deadline_warns_inside_the_desktop_then_ends_the_session(host: Host) -> None:
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    viewer = Viewer(host.bind_port, "127.0.0.41")
    mine = viewer.desktop()
    with host.console(mine) as console:
        console.login("bob")
        host.wait_for(
            f"{mine} in use", lambda p: (c := clone(p, mine)) is not None and c["state"] == "in_use"
        )
        host.cli("build", "tiny", "--force")  # v3
        follower = host.rollout(
            "tiny", "--deadline", "40s", "--message", "Maintenance: save your work", "--warn", "30s"
        )
        console.wait_for("*** imagepipe: Maintenance: save your work", timeout=WAIT)
        assert "Maintenance: save your work" in console.run("cat /run/imagepipe-notice")
    viewer.close()
    code, lines = finished(follower)
    assert code == 0 and lines[-1]["state"] == "done"
    pool = host.wait_for(
        f"{mine} replaced", lambda p: clone(p, mine) is None or clone(p, mine)["version"] == 3
    )
    assert all(c["version"] == 3 for c in pool["clones"])


def register_broken_version(host: Host) -> int:
    """A version whose desktops cannot boot: its kernel is not a kernel (QEMU refuses to
    start them), the rest is the current version's."""
    from imagepipe.images.registry import NewVersion, Registry

    registry = Registry(host.root / "registry", host.root / "images")
    good = registry.resolve("tiny", "latest")
    work = Path(tempfile.mkdtemp(dir=host.root))
    files = []
    for name in ("disk.qcow2", "initrd.img"):
        shutil.copy(Path(good.directory) / name, work / name)
        files.append(work / name)
    (work / "vmlinuz").write_bytes(bytes(4096))
    files.append(work / "vmlinuz")
    record = registry.register(
        NewVersion(
            image="tiny",
            fingerprint=f"broken-{time.monotonic_ns()}",
            builder="test",
            packer_version="none",
            files=tuple(files),
            disk="disk.qcow2",
            kernel="vmlinuz",
            initrd="initrd.img",
            cmdline="console=ttyS0 imagepipe.mode=desktop",
        )
    )
    return record.version


def test_a_broken_version_rolls_back_by_itself_and_free_desktops_stay(host: Host) -> None:
    before = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    good = before["version"]
    broken = register_broken_version(host)

    code, lines = finished(host.rollout("tiny", "--to", str(broken)), timeout=2 * WAIT)

    assert code == 4
    assert lines[-1]["state"] == "rolled_back"
    assert f"v{broken}'s desktops failed" in lines[-1]["reason"]
    pool = host.wait_for(
        f"the pool back on v{good} only",
        lambda p: p["version"] == good and all(c["version"] == good for c in p["clones"]),
        also=never_below_free,
    )
    assert len(free_ready(pool)) >= FREE


GOLDEN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 imagepipe.mode=desktop</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def test_a_version_imported_from_a_running_domain_waits_until_it_is_powered_off(
    host: Host,
) -> None:
    """An administrator's golden domain: imported while off, then started again to patch it.
    The rollout to its version waits and says why; once the domain is off, it proceeds."""
    from imagepipe.images.registry import Registry

    before = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    current = Registry(host.root / "registry", host.root / "images").resolve(
        "tiny", before["version"]
    )
    golden = host.root / "golden"
    golden.mkdir()
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        shutil.copy(Path(current.directory) / name, golden / name)
        (golden / name).chmod(0o644)
    domain = f"{POOL}golden"
    xml = golden / "domain.xml"
    xml.write_text(
        GOLDEN_XML.format(
            name=domain,
            kernel=golden / "vmlinuz",
            initrd=golden / "initrd.img",
            disk=golden / "disk.qcow2",
        )
    )
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "define", str(xml)], check=True, capture_output=True
    )
    try:
        doc = json.loads(host.cli("images", "import", "tiny", "--from-domain", domain, "--json"))
        imported = doc["version"]
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "start", domain], check=True, capture_output=True
        )

        follower = host.rollout("tiny", "--to", str(imported))
        waiting = wait_rollout(
            host, "the wait for the base", lambda r: r["state"] == "waiting_for_base"
        )
        assert f"v{imported}" in waiting["reason"] and "not ready" in waiting["reason"]
        assert all(c["version"] != imported for c in host.status()["clones"])

        subprocess.run(
            ["virsh", "-c", "qemu:///system", "destroy", domain], check=True, capture_output=True
        )
        code, lines = finished(follower)
        assert code == 0 and lines[-1]["state"] == "done"
        assert all(c["version"] == imported for c in host.status()["clones"])
    finally:
        destroy_domains(domain)


def newest(host: Host) -> dict[str, Any]:
    """The newest rollout of tiny ({} before the first one is written)."""
    history = host.history()
    return history[0] if history else {}


def wait_rollout(host: Host, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        doc = newest(host)
        if doc and check(doc):
            return doc
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {doc}"
        time.sleep(1.0)


def test_canary_pause_resume_undo_and_cancel(host: Host) -> None:
    start = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)["version"]
    doc = json.loads(host.cli("build", "tiny", "--force", "--json").splitlines()[-1])
    new = doc["version"]

    follower = host.rollout("tiny", "--to", str(new), "--canary", "1", "--bake", "15s")
    wait_rollout(host, "the canary", lambda r: r["state"] == "canary" and r["canary_ready_at"])
    host.cli("rollout", "pause", "tiny")
    time.sleep(20)  # longer than the bake: a paused rollout does not go on by itself
    paused = newest(host)
    assert paused["state"] == "paused"
    assert sum(1 for c in host.status()["clones"] if c["version"] == new) == 1
    host.cli("rollout", "resume", "tiny")
    code, lines = finished(follower)
    assert code == 0 and lines[-1]["state"] == "done", lines[-3:]
    host.wait_for(f"all on v{new}", lambda p: all(c["version"] == new for c in p["clones"]))

    host.cli("rollout", "undo", "tiny")
    back = wait_rollout(host, "the undo", lambda r: r["state"] == "done")
    assert (back["from_version"], back["to_version"]) == (new, start)
    host.wait_for(f"all on v{start}", lambda p: all(c["version"] == start for c in p["clones"]))

    follower = host.rollout("tiny", "--to", str(new), "--canary", "1")
    wait_rollout(host, "the canary", lambda r: r["state"] == "canary")
    host.cli("rollout", "cancel", "tiny")
    code, lines = finished(follower)
    assert code == 4 and lines[-1]["state"] == "cancelled"
    wait_rollout(host, "the way back", lambda r: r["state"] == "done" and r["to_version"] == start)
    host.wait_for(
        f"all on v{start} again",
        lambda p: all(c["version"] == start for c in p["clones"]) and len(free_ready(p)) >= FREE,
        also=None,
    )
