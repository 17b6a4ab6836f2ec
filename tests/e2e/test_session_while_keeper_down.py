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

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import libvirt_available, require, require_program
from tests.e2e import test_kill9_campaign as kill9
from tests.guest import VncClient
from tests.host import destroy_domains, free_port

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "evd"  # unique to this module: domains evd-N
PORTS = (6461, 6469)  # not used by any other test module
FREE = 1
MAX = 3
RESET_WITHIN = 30.0  # seconds after the restart: the used desktop must have been reset


class Host(kill9.Host):
    """The kill -9 campaign's throwaway installation (keeper subprocess, CLI, consoles),
    looking at this module's pool."""

    def states(self) -> dict[str, str]:
        return {name: state for name, (state, _, _) in self.records().items()}

    def records(self) -> dict[str, tuple[str, int, int | None]]:
        """name -> (state, dirty, sessions_seen), read-only, straight from the database."""
        with contextlib.suppress(sqlite3.Error):
            uri = f"{(self.root / 'state' / 'state.db').resolve().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=1)
            try:
                rows = db.execute(
                    "SELECT name, state, dirty, sessions_seen FROM clones WHERE pool = ?", (POOL,)
                ).fetchall()
                return {name: (state, dirty, seen) for name, state, dirty, seen in rows}
            finally:
                db.close()
        return {}

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.root / "run" / "haproxy.sock"))
            sock.sendall(command.encode() + b"\n")
            return sock.makefile().read()

    def offered(self) -> list[str]:
        """Desktops HAProxy gives a new user: ready servers whose record says free."""
        ready = set()
        with contextlib.suppress(OSError):
            for line in self.haproxy("show servers state desktops").splitlines()[2:]:
                parts = line.split()
                if len(parts) > 6 and parts[3].startswith(f"{POOL}-") and parts[6] == "0":
                    ready.add(parts[3])
        return sorted(
            n for n, (state, _, _) in self.records().items() if state == "free" and n in ready
        )

    def stot(self, desktop: str) -> int:
        """HAProxy's session counter of the desktop's backend (`show stat`, column stot)."""
        lines = self.haproxy("show stat desktops 4 -1").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("svname") == desktop:
                return int(row["stot"] or 0)
        raise AssertionError(f"HAProxy has no backend {desktop}")

    def qemu_pid(self, desktop: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(f"/run/libvirt/qemu/{desktop}.pid").read_text().strip())
        return None


@pytest.fixture
def host() -> Iterator[Host]:
    require_program("packer")
    require_program("haproxy")
    require(libvirt_available(), "libvirtd does not answer on qemu:///system (run ./install.sh)")
    repo = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="ip-evd-", dir="/tmp"))  # short: unix socket paths
    destroy_domains(f"{POOL}-")
    (root / "pools").mkdir()
    config = root / "imagepipe.yml"
    bind_port = free_port()
    config.write_text(
        f"pools_dir: {root / 'pools'}\n"
        f"packer_dir: {repo / 'packer'}\n"
        f"state_db: {root / 'state' / 'state.db'}\n"
        f"registry: {root / 'registry'}\n"
        f"image_store: {root / 'images'}\n"
        f"run_dir: {root / 'run'}\n"
        "hypervisor: {driver: libvirt, uri: 'qemu:///system'}\n"
        f"balancer: {{driver: haproxy, bind: '127.0.0.1:{bind_port}', manage: true}}\n"
        "keeper: {tick: 1s, parallel: 4}\n"
    )
    (root / "pools" / f"{POOL}.yml").write_text(
        f"name: {POOL}\nimage: tiny\nchannel: latest\n"
        f"size: {{initial: {FREE}, free: {FREE}, max: {MAX}}}\n"
        "machine: {cpus: 1, memory: 160M}\n"
        f"display: {{port_range: {PORTS[0]}-{PORTS[1]}, address: 127.0.0.1}}\n"
        "sessions: {on_logoff: reset, recycle_after: 2s}\n"
    )
    h = Host(root=root, config=config, bind_port=bind_port)
    try:
        h.cli("build", "tiny")
        yield h
    finally:
        h.stop_keeper()
        destroy_domains(f"{POOL}-")
        pid_file = root / "run" / "haproxy.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def test_a_session_while_the_keeper_was_killed_is_reset_before_the_next_user_gets_the_desktop(
    host: Host,
) -> None:
    host.start_keeper()
    host.wait_until("a free desktop in HAProxy", lambda: len(host.offered()) >= FREE)
    host.kill_keeper()

    # bob, while no keeper runs: through HAProxy, a console login, a file, logout, gone
    viewer = VncClient("127.0.0.1", host.bind_port, timeout=30)
    desktop = viewer.handshake().removeprefix("QEMU (").removesuffix(")")
    with host.console(desktop) as console:
        console.login("bob")
        console.run("echo bob-was-here > /home/bob-file && sync")
        console.logout()
    viewer.close()
    assert host.records()[desktop][:2] == ("free", 0), "no keeper saw bob: still free, clean"
    assert host.stot(desktop) >= 1, "HAProxy counted bob's session"
    before = host.qemu_pid(desktop)

    host.start_keeper()
    host.wait_until(
        f"{desktop} reset (a new QEMU process)",
        lambda: host.qemu_pid(desktop) not in (before, None),
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
