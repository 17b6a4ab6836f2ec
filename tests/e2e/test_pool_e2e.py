"""End to end, on real components: `imagepipe build tiny` (Packer + QEMU), `imagepipe keep`
(libvirt + QEMU desktops behind HAProxy), `imagepipe status --json`, driven as a user would:
through the CLI, a VNC client on the HAProxy address and the desktops' serial consoles.

One image build and one keeper per start mode (`restore`: instant desktops restored from a
warm parent; `boot`); each test leaves the pool converged for the next.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.e2e.harness import (
    Installation,
    PoolFile,
    alive,
    clone,
    desktop_of,
    free_ready,
    require_real_host,
    session,
    temp_root,
    viewer,
)
from tests.host import domains

pytestmark = [pytest.mark.real, pytest.mark.slow]

FREE = 2
MAX = 4
RECYCLE_AFTER = 3  # seconds
PORTS = (5940, 5949)


@pytest.fixture(scope="module", params=["restore", "boot"])
def host(request: pytest.FixtureRequest) -> Iterator[Installation]:
    require_real_host("packer", "haproxy")
    pool = PoolFile(
        "e2e", FREE, MAX, PORTS, recycle_after=f"{RECYCLE_AFTER}s", start=str(request.param)
    )
    h = Installation(temp_root("ipe-e2e-"), pool)
    try:
        h.cli("build", "tiny")
        h.start_keeper()
        yield h
    finally:
        h.close()


def test_pool_fills_and_each_vnc_client_gets_its_own_desktop(host: Installation) -> None:
    pool = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    assert pool["total"] <= MAX

    first = viewer(host)
    second = viewer(host)
    try:
        desktop_a = desktop_of(first)
        desktop_b = desktop_of(second)
        assert desktop_a != desktop_b, (
            f"two concurrent users landed on the same desktop {desktop_a}\n"
            f"haproxy: {host.haproxy('show servers state desktops')}\n"
            f"keeper log:\n{host.keeper_output()}"
        )
        assert {desktop_a, desktop_b} <= {c["name"] for c in pool["clones"]}

        pool = host.wait_for(
            "both desktops in use and drained, and the pool refilled",
            lambda p: (
                all(
                    clone(p, n)["state"] == "in_use" and clone(p, n)["balancer"] != "ready"
                    for n in (desktop_a, desktop_b)
                )
                and len(free_ready(p)) >= FREE
            ),
        )
        assert pool["total"] <= MAX
        assert pool["in_use"] == 2
    finally:
        first.close()
        second.close()


def test_logoff_resets_the_desktop_and_the_next_user_gets_a_clean_disk(host: Installation) -> None:
    with session(host, "alice") as alice:
        alice.console.run("echo alice-was-here > /home/secret && sync")
        assert "alice-was-here" in alice.console.run("cat /home/secret")
        alice.logout()
        alice.viewer.close()
        logged_off = time.monotonic()
    name = alice.desktop

    host.wait_for(
        f"{name} recycled and back in the balancer",
        lambda p: clone(p, name)["state"] == "free" and clone(p, name)["balancer"] == "ready",
    )
    assert time.monotonic() - logged_off >= RECYCLE_AFTER, "reset before recycle_after"
    assert clone(host.status(), name)["started_by"] == host.pool.start
    with host.console(name) as console:
        console.login("bob")
        listing = console.run("ls -a /home; cat /home/secret 2>&1 || true")
        assert "alice-was-here" not in listing
        console.logout()


def test_poweroff_inside_the_guest_is_treated_like_logoff(host: Installation) -> None:
    with session(host, "carol") as carol:
        carol.console.send_line("poweroff")
        carol.logged_in = False
        name = carol.desktop
        host.wait_for(f"{name} powered off", lambda p: clone(p, name)["power"] != "running")
    host.wait_for(
        f"{name} powered on again, clean and ready",
        lambda p: (
            clone(p, name)["power"] == "running"
            and clone(p, name)["state"] == "free"
            and clone(p, name)["balancer"] == "ready"
        ),
    )


def test_keeper_killed_during_a_session_keeps_it_after_restart(host: Installation) -> None:
    host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    client = viewer(host)
    try:
        desktop = desktop_of(client)
        host.wait_for(f"{desktop} in use", lambda p: clone(p, desktop)["state"] == "in_use")
        assert host.kill_keeper() == -signal.SIGKILL
        host.start_keeper()

        pool = host.wait_for(
            "the restarted keeper converged",
            lambda p: len(free_ready(p)) >= FREE and clone(p, desktop)["state"] == "in_use",
        )
        in_use = clone(pool, desktop)
        assert in_use["balancer"] != "ready", "a desktop in use takes new users"
        assert in_use["client"] is not None
        names = [c["name"] for c in pool["clones"]]
        assert len(names) == len(set(names))
        assert domains(f"{host.pool.name}-") == sorted(names), "orphan or missing domains"
        disks = sorted(f.removesuffix(".qcow2") for f in host.disk_files())
        assert disks == sorted(names), "orphan or missing clone disks"
        assert set(host.backends()) == set(names), "orphan or missing balancer entries"
        assert pool["total"] == len(names) <= MAX
        # the VNC session is still alive through HAProxy: the server answers a client message
        assert alive(client), "the session was cut"
    finally:
        client.close()

    # strays of this pool only: other test runs may share qemu:///system with their pools
    strays = host.status_doc()["stray_clones"]
    assert [s for s in strays if s["pool"] == host.pool.name] == []


def test_a_new_image_version_rolls_out_without_kicking_anybody_off(host: Installation) -> None:
    """Blue/green: while a user works on a v1 desktop, `imagepipe build tiny --force`
    registers v2. Free desktops are replaced by v2 ones at once; the user's desktop gets no
    new users, keeps its session, and is removed only after the user logs off."""
    before = host.wait_for(f"{FREE} free desktops", lambda p: len(free_ready(p)) >= FREE)
    old = before["version"]
    with session(host, "dave") as dave:
        host.cli("build", "tiny", "--force")
        pool = host.wait_for(
            "the pool's free desktops all on the new version",
            lambda p: (
                p["version"] == old + 1
                and len(free_ready(p)) >= FREE
                and all(c["version"] == old + 1 for c in free_ready(p))
            ),
        )
        mine = clone(pool, dave.desktop)
        assert mine["version"] == old, "the user's desktop was replaced under them"
        assert mine["state"] == "retiring" and mine["balancer"] != "ready"
        assert "still-here" in dave.console.run("echo still-here"), "the session was cut"
        dave.logout()
        dave.viewer.close()

    pool = host.wait_for(
        f"{dave.desktop} removed after its user left",
        lambda p: all(c["version"] == old + 1 for c in p["clones"]) and len(free_ready(p)) >= FREE,
    )
    assert pool["total"] <= MAX
