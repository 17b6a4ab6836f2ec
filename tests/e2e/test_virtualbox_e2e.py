"""End to end on the VirtualBox adapter: `imagepipe keep` with `hypervisor.driver:
virtualbox` through pyvbox and the simulated VirtualBox (its VBoxSVC in its own process,
machines as real QEMU guests of the tiny image, VNC on the VRDE port, users from the guest
agent) behind real HAProxy, driven as a user would: `images import --from-vm`, `rollout
--drain`, a VNC client on the HAProxy address, the desktops' serial consoles, `status --json`.

One simulated VirtualBox and one keeper per module; each test leaves the pool converged.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import vboxsim
from tests.e2e.harness import (
    VIRTUALBOX,
    Installation,
    PoolFile,
    alive,
    clone,
    desktop_of,
    finished,
    free_ready,
    never_below,
    require_real_host,
    session,
    temp_root,
    viewer,
)
from tests.guest import SerialConsole, tiny_base_image
from tests.vboxsim.api import Boot

pytestmark = [pytest.mark.real, pytest.mark.slow]

FREE = 2
MAX = 4
RECYCLE_AFTER = 3  # seconds
POOL = PoolFile("vbe2e", FREE, MAX, (5970, 5979), recycle_after=f"{RECYCLE_AFTER}s")


class Site(Installation):
    """The installation on the simulated VirtualBox: its machines' consoles are the server's,
    and a new version is a base VM imported with `images import --from-vm`."""

    def __init__(self, root: Path, server: vboxsim.Server) -> None:
        super().__init__(root, POOL, hypervisor=VIRTUALBOX, env=server.env())
        self.server = server

    def console_path(self, clone: str) -> Path:
        return self.server.console(clone)

    def console(self, clone: str, timeout: float = 120.0) -> SerialConsole:
        return super().console(clone, timeout)

    def add_version(self) -> int:
        """What `build win10` + import does for VirtualBox: a base VM with a snapshot,
        registered with `imagepipe images import tiny --from-vm`; returns its version."""
        n = len(list(self.root.glob("tiny-v*"))) + 1
        tiny = tiny_base_image(self.root / f"tiny-v{n}")
        d = tiny.directory
        boot = Boot(d / (tiny.kernel or ""), d / (tiny.initrd or ""), tiny.cmdline or "")
        vm = f"imagepipe-tiny-v{n}"
        self.server.host.create_base_vm(vm, d / (tiny.disk or ""), boot=boot, snapshot="clean")
        doc = json.loads(self.cli("images", "import", "tiny", "--from-vm", vm, "--json"))
        return int(doc["version"])

    def machine_folders(self) -> list[str]:
        """The pool's machine folders in the simulated VirtualBox (settings and disks)."""
        folder = self.root / "vbox" / "imagepipe" / self.pool.name
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_real_host("haproxy", "qemu-system-x86_64", libvirt=False)
    root = temp_root("ipv-e2e-")
    server = vboxsim.Server(root / "vbox", version="7.0.14", qemu=True)
    s = Site(root, server)
    try:
        s.add_version()
        s.start_keeper()
        yield s
    finally:
        try:
            s.teardown()
        finally:
            server.close()
            shutil.rmtree(root, ignore_errors=True)


def test_pool_fills_and_each_vnc_client_gets_its_own_desktop(site: Site) -> None:
    pool = site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    assert pool["total"] <= MAX
    first = viewer(site)
    second = viewer(site)
    try:
        a, b = desktop_of(first), desktop_of(second)
        assert a != b, f"two users on one desktop {a}: {site.haproxy('show servers state')}"
        pool = site.wait_for(
            "both desktops in use and drained, and the pool refilled",
            lambda p: (
                all(
                    clone(p, n)["state"] == "in_use" and clone(p, n)["balancer"] != "ready"
                    for n in (a, b)
                )
                and len(free_ready(p)) >= FREE
            ),
        )
        assert pool["total"] <= MAX
    finally:
        first.close()
        second.close()


def test_logoff_resets_the_desktop_and_the_next_user_gets_a_clean_disk(site: Site) -> None:
    with session(site, "alice", console_timeout=120) as alice:
        alice.console.run("echo alice-was-here > /home/secret && sync")
        alice.logout()
        alice.viewer.close()
        logged_off = time.monotonic()
    name = alice.desktop
    pool = site.wait_for(
        f"{name} recycled and back in the balancer",
        lambda p: clone(p, name)["state"] == "free" and clone(p, name)["balancer"] == "ready",
    )
    assert time.monotonic() - logged_off >= RECYCLE_AFTER, "reset before recycle_after"
    # instant desktops (the pool's default start: restore): the reset resumed the clean
    # snapshot's saved state, the warm parent's memory, and the guest took its own name
    assert clone(pool, name)["started_by"] == "restore"
    with site.console(name) as console:
        console.login("bob")
        assert "alice-was-here" not in console.run("cat /home/secret 2>&1 || true")
        assert console.run("hostname") == name
        console.logout()


def test_keeper_killed_during_a_session_keeps_it_after_restart(site: Site) -> None:
    site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    client = viewer(site)
    try:
        desktop = desktop_of(client)
        site.wait_for(f"{desktop} in use", lambda p: clone(p, desktop)["state"] == "in_use")
        assert site.kill_keeper() == -signal.SIGKILL
        site.start_keeper()
        pool = site.wait_for(
            "the restarted keeper converged, with no orphan or missing VirtualBox machine",
            lambda p: (
                len(free_ready(p)) >= FREE
                and clone(p, desktop)["state"] == "in_use"
                and site.machine_folders() == sorted(c["name"] for c in p["clones"])
                # a desktop the killed keeper was making is finished (or removed) too
                and all(c["balancer"] is not None for c in p["clones"])
            ),
        )
        names = sorted(c["name"] for c in pool["clones"])
        assert clone(pool, desktop)["client"] is not None
        assert set(site.backends()) == set(names), "orphan or missing balancer entries"
        assert alive(client), "the session was cut"
    finally:
        client.close()


def test_a_new_image_version_rolls_out_without_kicking_anybody_off(site: Site) -> None:
    before = site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    old = before["version"]
    with session(site, "dave", console_timeout=120) as dave:
        new = site.add_version()
        pool = site.wait_for(
            "the pool's free desktops all on the new version",
            lambda p: (
                p["version"] == new
                and len(free_ready(p)) >= FREE
                and all(c["version"] == new for c in free_ready(p))
            ),
        )
        mine = clone(pool, dave.desktop)
        assert mine["version"] == old and mine["state"] == "retiring"
        assert mine["balancer"] != "ready"
        assert "still-here" in dave.console.run("echo still-here"), "the session was cut"
        dave.logout()
        dave.viewer.close()
    site.wait_for(
        f"{dave.desktop} removed after its user left",
        lambda p: all(c["version"] == new for c in p["clones"]) and len(free_ready(p)) >= FREE,
    )
    assert dave.desktop not in site.machine_folders(), "the retired machine folder is still there"


def test_rollout_with_drain_replaces_free_desktops_and_keeps_a_held_one_until_logoff(
    site: Site,
) -> None:
    """The pool follows `stable`, which only `imagepipe rollout` moves. While erin works on
    the current version a new one is imported (`latest` moves; the pool stays), then
    `rollout tiny --drain --wait`: the free desktops are replaced by new-version ones, never
    fewer than the free target; erin's desktop takes no new user and keeps her session, and
    the rollout waits for her; at her logoff her desktop and its machine folder go, and the
    rollout is done."""
    old = site.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)["version"]
    site.cli("images", "promote", "tiny", str(old), "--channel", "stable")
    site.write_pool(channel="stable")
    site.reload_keeper()
    try:
        with session(site, "erin", console_timeout=120) as erin:
            new = site.add_version()
            assert site.status()["version"] == old, "an import moved the pool's channel"

            follower = site.rollout("tiny", "--drain")
            pool = site.wait_for(
                f"the free desktops all on v{new}",
                lambda p: (
                    len(free_ready(p)) >= FREE and all(c["version"] == new for c in free_ready(p))
                ),
                also=never_below(FREE),
            )
            mine = clone(pool, erin.desktop)
            assert mine["version"] == old, "the held desktop was replaced under its user"
            assert mine["state"] == "retiring" and mine["balancer"] != "ready"
            assert "still-here" in erin.console.run("echo still-here"), "the session was cut"
            assert follower.poll() is None, f"the rollout ended while erin was on v{old}"
            erin.logout()
            erin.viewer.close()

        code, lines = finished(follower)
        assert code == 0 and lines[-1]["state"] == "done", lines[-3:]
        pool = site.wait_for(
            f"{erin.desktop} removed after its user left",
            lambda p: (
                not clone(p, erin.desktop)
                and all(c["version"] == new for c in p["clones"])
                and len(free_ready(p)) >= FREE
            ),
        )
        assert pool["version"] == new and pool["total"] <= MAX
        assert erin.desktop not in site.machine_folders(), "its machine folder is still there"
    finally:
        site.write_pool()  # back on `latest`, which the rollout left where `stable` is
        site.reload_keeper()
