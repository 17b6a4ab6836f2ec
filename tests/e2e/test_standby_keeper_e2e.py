"""A standby keeper on real components: two `imagepipe keep` processes with the same settings
(state in a real PostgreSQL, started for this module), one pool of tiny libvirt/QEMU desktops
behind a real HAProxy. One keeper leads, the other waits; the lease is short here (6 s,
renewed every 2 s, 2 s per database call) so a failover takes seconds.

- kill -9 the leader: the standby leads, the pool stays at its free target, no desktop is
  created twice, no slot or display port is used twice;
- SIGSTOP the leader past its lease: the standby leads; SIGCONT: the old one steps down and
  says why, and changes nothing;
- PostgreSQL stopped (for 12 s, shorter than the 30 s of the issue, to keep the suite fast)
  while a user logs in and out: nothing changes on the host meanwhile (the used desktop is
  not reset, no desktop made or removed, the balancer unchanged), the keepers keep running
  and say so once; once it answers, the used desktop is reset and the pool is back.

About 2-3 minutes on the 2-core TCG host (one image build, three desktops, two failovers).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.e2e.harness import (
    Installation,
    PoolFile,
    User,
    desktop_of,
    free_ready,
    never_below,
    qemu_pid,
    require_real_host,
    temp_root,
    viewer,
)
from tests.postgres import PostgresServer
from tests.postgres import missing as postgres_missing

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = PoolFile("sbk", free=2, max=4, ports=(6481, 6489))
LEASE = "lease: 6s, lease_loop: 2s, lease_retry: 2s"
LEASE_SECONDS = 6.0
OUTAGE = 12.0  # seconds PostgreSQL is stopped


class Keeper:
    """One more `imagepipe keep` on the installation's settings (the standby's machine)."""

    def __init__(self, host: Installation, name: str) -> None:
        self.host = host
        self.log = host.root / f"keeper-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.host.command("--log-level", "debug", "keep"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None


class Pair:
    """The installation with two keepers on a PostgreSQL state."""

    def __init__(self, host: Installation, server: PostgresServer, dsn: str) -> None:
        self.host = host
        self.server = server
        self.dsn = dsn
        self.keepers = {"a": Keeper(host, "a"), "b": Keeper(host, "b")}

    def leader(self) -> dict[str, Any] | None:
        leader: dict[str, Any] | None = self.host.status_doc().get("leader")
        return leader if leader is not None and leader["lease_left"] > 0 else None

    def leading(self) -> Keeper | None:
        leader = self.leader()
        if leader is None:
            return None
        pid = int(str(leader["holder"]).rsplit("/", 1)[1])
        return next((k for k in self.keepers.values() if k.process and k.pid == pid), None)

    def wait_leader(self, not_pid: int | None = None, timeout: float = 60.0) -> Keeper:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keeper = self.leading()
            if keeper is not None and keeper.pid != not_pid:
                return keeper
            time.sleep(0.3)
        raise AssertionError(f"no keeper took the lease; status leader {self.leader()}")

    def standby(self, leader: Keeper) -> Keeper:
        return next(k for k in self.keepers.values() if k is not leader)

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, password=self.server.password) as conn:
            return conn.execute(sql, args).fetchall()

    def creates(self) -> list[str]:
        """Every desktop a CreateClone was begun for, in order (the shared journal)."""
        rows = self.query("SELECT clone FROM journal WHERE kind = 'CreateClone' ORDER BY id")
        return [str(r[0]) for r in rows]

    def records(self) -> list[tuple[str, int]]:
        rows = self.query("SELECT name, slot FROM clones WHERE pool = %s", POOL.name)
        return [(str(n), int(s)) for n, s in rows]

    def journal_count(self) -> int:
        return int(self.query("SELECT count(*) FROM journal")[0][0])

    def resets(self, desktop: str) -> int:
        """Resets of the desktop that completed (the shared journal)."""
        rows = self.query(
            "SELECT count(*) FROM journal WHERE kind = 'ResetClone' AND clone = %s AND ok = 1",
            desktop,
        )
        return int(rows[0][0])


def _state_settings(host: Installation, server: PostgresServer) -> str:
    dsn = server.fresh_dsn()
    secret = host.root / "pgpass"
    secret.write_text(server.password + "\n")
    secret.chmod(0o600)
    text = host.config.read_text()
    text = re.sub(r"keeper: \{(.*)\}", lambda m: f"keeper: {{{m.group(1)}, {LEASE}}}", text)
    host.config.write_text(text + f"state: '{dsn}'\nstate_password_file: {secret}\n")
    return dsn


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    require_real_host("qemu-img", "haproxy", "packer")
    why = postgres_missing()
    require(why is None, why or "")
    server = PostgresServer.start()
    host = Installation(temp_root("ipe-sbk-"), POOL)
    both = Pair(host, server, _state_settings(host, server))
    try:
        host.cli("build", "tiny")
        both.keepers["a"].start()
        both.wait_leader()
        both.keepers["b"].start()
        host.wait_until("the pool at its free target", host_converged(both))
        yield both
    finally:
        for keeper in both.keepers.values():
            keeper.stop()
        host.close()
        server.stop()


def host_converged(pair: Pair) -> Any:
    def check() -> bool:
        return len(free_ready(pair.host.status())) >= POOL.free

    return check


def test_one_keeper_leads_and_the_other_waits_saying_so(pair: Pair) -> None:
    leader = pair.wait_leader()
    standby = pair.standby(leader)
    deadline = time.monotonic() + 20
    while "standby: another keeper leads" not in standby.output():
        assert time.monotonic() < deadline, standby.output()[-3000:]
        time.sleep(0.3)

    assert standby.output().count("standby: another keeper leads") == 1
    assert "leading: this keeper acts on the hosts" in leader.output()
    status = pair.host.cli("status")
    assert f"/{leader.pid} leads" in status


def test_kill9_of_the_leader_the_standby_leads_and_the_pool_stays_at_its_free_target(
    pair: Pair,
) -> None:
    leader = pair.wait_leader()
    standby = pair.standby(leader)
    pair.host.wait_until("the pool at its free target", host_converged(pair))
    creates_before = pair.creates()
    killed = time.monotonic()

    leader.send(signal.SIGKILL)
    assert leader.process is not None
    leader.process.wait(timeout=30)
    leader.process = None
    new = pair.wait_leader(timeout=LEASE_SECONDS * 4)
    took_over = time.monotonic() - killed
    pool = pair.host.wait_for(
        "the pool at its free target after the failover",
        lambda p: len(free_ready(p)) >= POOL.free,
        also=never_below(POOL.free),
    )

    assert new is standby
    assert took_over <= LEASE_SECONDS * 3, f"the standby led only after {took_over:.1f}s"
    creates = pair.creates()
    assert creates == creates_before, f"desktops created after the failover: {creates}"
    slots = [slot for _, slot in pair.records()]
    ports = [c["display"] for c in pool["clones"]]
    assert len(slots) == len(set(slots)) and len(ports) == len(set(ports))
    leader.start()  # the killed machine comes back: a standby now


def test_sigstop_of_the_leader_past_its_lease_the_standby_leads_and_the_old_one_steps_down(
    pair: Pair,
) -> None:
    leader = pair.wait_leader()
    standby = pair.standby(leader)
    deadline = time.monotonic() + 20
    while "standby: another keeper leads" not in standby.output():
        assert time.monotonic() < deadline
        time.sleep(0.3)
    said = leader.output()

    leader.send(signal.SIGSTOP)
    try:
        new = pair.wait_leader(not_pid=leader.pid, timeout=LEASE_SECONDS * 4)
        assert new is standby
        journal = pair.journal_count()
    finally:
        leader.send(signal.SIGCONT)
    deadline = time.monotonic() + 20
    while "stepped down" not in leader.output()[len(said) :]:
        assert time.monotonic() < deadline, leader.output()[-3000:]
        time.sleep(0.3)
    time.sleep(3)  # a few of the old leader's loops

    after = leader.output()[len(said) :]
    assert "leads no more and changes nothing" in after
    assert re.search(
        r"reason=.*(not renewed in time|lease was taken over|another keeper was elected)", after
    )
    assert "action done" not in after and "action failed" not in after
    assert pair.leading() is standby
    assert pair.journal_count() >= journal
    assert leader.process is not None and leader.process.poll() is None  # it waits, alive


def test_postgresql_stopped_nothing_changes_and_the_keepers_resume(pair: Pair) -> None:
    host = pair.host
    host.wait_until("the pool at its free target", host_converged(pair))
    pair.wait_leader()
    backends = host.backends()

    said = {name: k.output().count("state store unreachable") for name, k in pair.keepers.items()}

    pair.server.halt()
    try:
        time.sleep(LEASE_SECONDS)  # the keepers notice; a user comes meanwhile
        user = arrive_without_status(host)
        qemu = qemu_pid(user.desktop)
        user.logout()
        user.leave()
        time.sleep(max(0.0, OUTAGE - LEASE_SECONDS))
        unchanged = host.backends()
        still = qemu_pid(user.desktop)
    finally:
        pair.server.resume()
    resets = pair.resets(user.desktop)

    assert unchanged == backends, "the balancer changed during the outage"
    assert still == qemu is not None, "the used desktop was reset or stopped during the outage"
    for name, keeper in pair.keepers.items():
        assert keeper.process is not None and keeper.process.poll() is None
        assert keeper.output().count("state store unreachable") == said[name] + 1
    host.wait_until(
        f"{user.desktop} reset after the outage", lambda: pair.resets(user.desktop) > resets
    )
    host.wait_for("the pool back at its free target", lambda p: len(free_ready(p)) >= POOL.free)
    assert pair.leading() is not None


def arrive_without_status(host: Installation) -> User:
    """A user logs in while the database is down (the harness's `arrive` waits for the
    keeper to record the desktop in use, which it cannot now): a VNC viewer on the pool's
    address, a console login."""
    client = viewer(host)
    name = desktop_of(client)
    console = host.console(name)
    console.login("carol")
    return User("carol", name, client, console)
