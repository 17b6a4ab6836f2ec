"""A standby keeper on real components: two `imagepipe keep` processes with the same settings
(state in a real PostgreSQL, started for this module), one pool of tiny libvirt/QEMU desktops
behind a real HAProxy. One keeper leads, the other waits; the lease is short here (6 s,
renewed every 2 s, 2 s per database call) so a failover takes seconds.

- kill -9 the leader: the standby leads, the pool stays at its free target, no desktop is
  created twice, no slot or display port is used twice;
- SIGSTOP the leader past its lease: the standby leads; SIGCONT: the old one steps down and
  says why, and changes nothing;
- PostgreSQL stopped for 30 s while users log in and out: the desktops and the balancer
  serve them throughout, nothing changes on the host meanwhile (no desktop reset, made or
  removed, the balancer unchanged), the keepers keep running and say so once, `status`
  says the database does not answer; once it answers, each used desktop is reset and the
  pool is back.

About 3 minutes on the 2-core TCG host (one image build, three desktops, two failovers, the
30 s outage).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator

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
from tests.e2e.standby import Pair, state_settings
from tests.postgres import PostgresServer
from tests.postgres import missing as postgres_missing

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = PoolFile("sbk", free=2, max=4, ports=(6481, 6489))
LEASE = "lease: 6s, lease_loop: 2s, lease_retry: 2s"
LEASE_SECONDS = 6.0
OUTAGE = 30.0  # seconds PostgreSQL is stopped


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    require_real_host("qemu-img", "haproxy", "packer")
    why = postgres_missing()
    require(why is None, why or "")
    server = PostgresServer.start()
    host = Installation(temp_root("ipe-sbk-"), POOL)
    both = Pair(host, server, state_settings(host, server, LEASE))
    try:
        host.cli("build", "tiny")
        both.keepers["a"].start()
        both.wait_leader()
        both.keepers["b"].start()
        host.wait_until("the pool at its free target", both.at_free_target)
        yield both
    finally:
        for keeper in both.keepers.values():
            keeper.stop()
        host.close()
        server.stop()


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
    pair.host.wait_until("the pool at its free target", pair.at_free_target)
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


def test_postgresql_stopped_for_30s_while_users_come_and_go_nothing_changes_and_all_resume(
    pair: Pair,
) -> None:
    host = pair.host
    host.wait_until("the pool at its free target", pair.at_free_target)
    pair.wait_leader()
    backends = host.backends()
    desktops = {name: qemu_pid(name) for name in backends}
    said = {name: k.output().count("state store unreachable") for name, k in pair.keepers.items()}

    pair.server.halt()
    stopped = time.monotonic()
    try:
        time.sleep(LEASE_SECONDS)  # the keepers notice
        carol = arrive_without_status(host, "carol")
        carol.logout()
        carol.leave()
        status = subprocess.run(
            host.command("status"), capture_output=True, text=True, env=host.env, check=False
        )
        dave = arrive_without_status(host, "dave")
        time.sleep(max(0.0, OUTAGE / 2 - (time.monotonic() - stopped)))
        assert dave.alive(), "dave's connection through the balancer holds"
        dave.logout()
        dave.leave()
        time.sleep(max(0.0, OUTAGE - 3 - (time.monotonic() - stopped)))
        last = viewer(host)  # a new user at the end of the outage still reaches a desktop
        late = desktop_of(last)
        last.close()
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
        unchanged = host.backends()
        still = {name: qemu_pid(name) for name in backends}
        outage = time.monotonic() - stopped
    finally:
        pair.server.resume()
    used = {carol.desktop, dave.desktop}
    resets = {name: pair.resets(name) for name in used}

    assert outage >= OUTAGE
    assert late in backends
    assert unchanged == backends, "the balancer changed during the outage"
    assert still == desktops, "a desktop was reset, made or removed during the outage"
    assert status.returncode == 4, status.stdout + status.stderr
    assert "cannot reach the state database" in status.stderr, status.stderr
    for name, keeper in pair.keepers.items():
        assert keeper.process is not None, name
        assert keeper.process.poll() is None, f"keeper {name} exited: {keeper.output()[-4000:]}"
        assert keeper.output().count("state store unreachable") == said[name] + 1
    for name in used:  # nothing lost: what the users did while it was down is acted on
        host.wait_until(f"{name} reset after the outage", lambda n=name: pair.resets(n) > resets[n])
    host.wait_for("the pool back at its free target", lambda p: len(free_ready(p)) >= POOL.free)
    assert pair.leading() is not None


def arrive_without_status(host: Installation, user: str) -> User:
    """A user logs in while the database is down (the harness's `arrive` waits for the
    keeper to record the desktop in use, which it cannot now): a VNC viewer on the pool's
    address, a console login."""
    client = viewer(host)
    name = desktop_of(client)
    console = host.console(name)
    console.login(user)
    return User(user, name, client, console)
