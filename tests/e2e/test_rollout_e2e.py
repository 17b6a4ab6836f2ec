"""End to end, on real components: `imagepipe rollout` moves a pool of real tiny desktops
(Packer build, libvirt + QEMU, HAProxy with `persist: source`) onto new versions while users
work, driven as an administrator and users would: the CLI (`rollout … --wait --json` in the
background), VNC clients through HAProxy from their own loopback addresses, and the
desktops' serial consoles.

One keeper per module; the pool follows the channel `stable`, which only `rollout` moves
(a build moves `latest`). Each test leaves the pool converged on the newest version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    Installation,
    PoolFile,
    clone,
    desktop_of,
    finished,
    free_ready,
    never_below,
    require_real_host,
    temp_root,
    viewer,
)
from tests.host import destroy_domains

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "roll"
FREE = 2
MAX = 3
PORTS = (6380, 6389)  # not used by any other test module
WAIT = 240.0  # TCG guests on 2 shared cores


def history(host: Installation) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = json.loads(
        host.cli("rollout", "status", "tiny", "--all", "--json")
    )
    return docs


def build_new_version(host: Installation) -> int:
    """`imagepipe build tiny --force`: a new version on `latest` (the pool's `stable` stays)."""
    doc = json.loads(host.cli("build", "tiny", "--force", "--json").splitlines()[-1])
    return int(doc["version"])


@pytest.fixture(scope="module")
def host() -> Iterator[Installation]:
    require_real_host("packer", "haproxy")
    pool = PoolFile(
        POOL,
        FREE,
        MAX,
        PORTS,
        recycle_after="2s",
        boot_timeout="120s",
        channel="stable",
        extra="failures: {max: 2, backoff: 1s, cooldown: 1m}\n",
    )
    h = Installation(
        temp_root("ipr-e2e-"), pool, balancer=", persist: source", parallel=3, wait=WAIT
    )
    try:
        h.cli("build", "tiny")
        h.cli("images", "promote", "tiny", "1", "--channel", "stable")
        h.start_keeper()
        yield h
    finally:
        h.close()


def test_drain_rollout_keeps_the_session_and_the_user_comes_back_to_it(
    host: Installation,
) -> None:
    """While alice works on the current version: build a new one, `rollout tiny --drain
    --wait` (and a kill -9 of the keeper half-way): free desktops move to the new version,
    never fewer than the free target; alice's desktop drains with her session and files; her
    viewer reconnects to it; at her logoff it goes, and the rollout is done."""
    old = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)["version"]
    client = viewer(host, "127.0.0.31")
    mine = desktop_of(client)
    with host.console(mine) as console:
        console.login("alice")
        console.run("echo alice-work > /home/alice-file && sync")
        host.wait_for(f"{mine} in use", lambda p: clone(p, mine).get("state") == "in_use")
        new = build_new_version(host)  # `latest` moves, `stable` does not
        assert host.status()["version"] == old
        dry = host.cli("rollout", "tiny", "--dry-run")
        assert "1 wait for a logoff" in dry and "nothing was changed" in dry
        assert host.status()["version"] == old

        follower = host.rollout("tiny", "--drain")
        host.wait_for(
            f"a v{new} desktop",
            lambda p: any(c["version"] == new for c in p["clones"]),
            also=never_below(FREE),
        )
        host.kill_keeper()
        host.start_keeper()
        pool = host.wait_for(
            f"free desktops all on v{new}",
            lambda p: (
                len(free_ready(p)) >= FREE and all(c["version"] == new for c in free_ready(p))
            ),
            also=never_below(FREE),
        )
        state = clone(pool, mine)
        assert state.get("version") == old
        assert state["state"] == "retiring" and state["balancer"] != "ready"
        assert "alice-work" in console.run("cat /home/alice-file"), "her session lost its files"

        client.close()  # her connection drops; she reconnects from her own machine
        again = viewer(host, "127.0.0.31")
        assert desktop_of(again) == mine, "the returning user did not reach her session"
        newcomer = viewer(host, "127.0.0.32")
        assert desktop_of(newcomer) != mine, "a new user reached a draining desktop"
        newcomer.close()
        console.logout()
        again.close()

    code, lines = finished(follower)
    assert code == 0, lines[-1]
    assert lines[-1]["state"] == "done"
    pool = host.wait_for(f"{mine} gone", lambda p: not clone(p, mine))
    assert all(c["version"] == new for c in pool["clones"])
    assert history(host)[0]["state"] == "done"


def test_deadline_warns_inside_the_desktop_then_ends_the_session(host: Installation) -> None:
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    client = viewer(host, "127.0.0.41")
    mine = desktop_of(client)
    with host.console(mine) as console:
        console.login("bob")
        host.wait_for(f"{mine} in use", lambda p: clone(p, mine).get("state") == "in_use")
        new = build_new_version(host)
        follower = host.rollout(
            "tiny", "--deadline", "40s", "--message", "Maintenance: save your work", "--warn", "30s"
        )
        console.wait_for("*** imagepipe: Maintenance: save your work", timeout=WAIT)
        assert "Maintenance: save your work" in console.run("cat /run/imagepipe-notice")
    client.close()
    code, lines = finished(follower)
    assert code == 0 and lines[-1]["state"] == "done"
    pool = host.wait_for(f"{mine} replaced", lambda p: clone(p, mine).get("version", new) == new)
    assert all(c["version"] == new for c in pool["clones"])


def register_broken_version(host: Installation) -> int:
    """A version whose desktops cannot boot: its kernel is not a kernel (QEMU refuses to
    start them), the rest is the current version's."""
    from imagepipe.images.registry import NewVersion, Registry

    registry = Registry(host.root / "registry", host.root / "images")
    good = registry.resolve("tiny", "stable")  # the pool's version, whatever ran before
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


def test_a_broken_version_rolls_back_by_itself_and_free_desktops_stay(host: Installation) -> None:
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
        also=never_below(FREE),
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
    host: Installation,
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


def newest(host: Installation) -> dict[str, Any]:
    """The newest rollout of tiny ({} before the first one is written)."""
    docs = history(host)
    return docs[0] if docs else {}


def wait_rollout(
    host: Installation, what: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        doc = newest(host)
        if doc and check(doc):
            return doc
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {doc}"
        time.sleep(1.0)


def test_canary_pause_resume_undo_and_cancel(host: Installation) -> None:
    start = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)["version"]
    new = build_new_version(host)

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
