"""A whole session while no keeper runs, on real components (issue 14): a real `imagepipe keep`
keeps a pool of tiny libvirt/QEMU desktops behind a real HAProxy. The keeper is killed with
SIGKILL; bob connects through HAProxy (VNC) to the free desktop, logs in on its console,
writes a file in /home, logs out and disconnects. Nothing of that reached a keeper: no
libvirt event had a listener. Then the keeper starts again. Only HAProxy's session counter
(`stot`) saw bob; the desktop must be reset before it is offered again, and the next user
must not find bob's file.

About 30-60 s on the 2-core TCG host (one image build, two desktops, one reset).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import (
    Installation,
    PoolFile,
    desktop_of,
    qemu_pid,
    require_real_host,
    temp_root,
    viewer,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

FREE = 1
MAX = 3
RESET_WITHIN = 30.0  # seconds after the restart: the used desktop must have been reset
# domains evd-N and display ports unique to this module
POOL = PoolFile(
    "evd", FREE, MAX, (6461, 6469), memory="160M", recycle_after="2s", boot_timeout=None
)


class Host(Installation):
    """The installation, and what HAProxy and the state database say about one desktop."""

    def records(self) -> dict[str, tuple[str, int, int | None]]:
        """name -> (state, dirty, sessions_seen), straight from the database."""
        rows = self.query(
            "SELECT name, state, dirty, sessions_seen FROM clones WHERE pool = ?", self.pool.name
        )
        return {name: (state, dirty, seen) for name, state, dirty, seen in rows}

    def stot(self, desktop: str) -> int:
        """HAProxy's session counter of the desktop's backend (`show stat`, column stot)."""
        lines = self.haproxy("show stat desktops 4 -1").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("svname") == desktop:
                return int(row["stot"] or 0)
        raise AssertionError(f"HAProxy has no backend {desktop}")


@pytest.fixture
def host() -> Iterator[Host]:
    require_real_host("packer", "haproxy")
    h = Host(temp_root("ip-evd-"), POOL, keeper_args=())
    try:
        h.cli("build", "tiny")
        yield h
    finally:
        h.close()


def test_a_session_while_the_keeper_was_killed_is_reset_before_the_next_user_gets_the_desktop(
    host: Host,
) -> None:
    host.start_keeper()
    host.wait_until("a free desktop in HAProxy", lambda: len(host.offered()) >= FREE)
    host.kill_keeper()

    # bob, while no keeper runs: through HAProxy, a console login, a file, logout, gone
    client = viewer(host)
    desktop = desktop_of(client)
    with host.console(desktop) as console:
        console.login("bob")
        console.run("echo bob-was-here > /home/bob-file && sync")
        console.logout()
    client.close()
    assert host.records()[desktop][:2] == ("free", 0), "no keeper saw bob: still free, clean"
    assert host.stot(desktop) >= 1, "HAProxy counted bob's session"
    before = qemu_pid(desktop)

    host.start_keeper()
    host.wait_until(
        f"{desktop} reset (a new QEMU process)",
        lambda: qemu_pid(desktop) not in (before, None),
        timeout=RESET_WITHIN,
    )
    host.wait_until(f"{desktop} offered again", lambda: desktop in host.offered())
    state, dirty, seen = host.records()[desktop]
    assert (state, dirty, seen) == ("free", 0, 0), "clean, and counted afresh since re-added"

    # the next user, on that very desktop: bob's file is gone
    with host.console(desktop) as console:
        console.login("carol")
        listing = console.run("cat /home/bob-file 2>&1 || true")
        console.logout()
    assert "bob-was-here" not in listing, f"carol read bob's file on {desktop}"
