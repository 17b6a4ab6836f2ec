"""The election unit (imagepipe/app/leadership.py) on a real SQLite store and a fake clock:
one keeper leads, the other waits and says so once; a leader that cannot renew stops acting
before its lease runs out; a refused write makes it step down at once; the lease settings
keep Patroni's rule."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepipe.app.leadership import Election, LeaseSettings, Role, pass_once
from imagepipe.config import parse_settings
from imagepipe.errors import (
    ConfigError,
    FencedError,
    OperationFailedError,
    StoreUnavailableError,
)
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import GuestSession, PoolSpec
from imagepipe.stores.sqlite import SQLiteStore
from imagepipe.yamlsrc import load_file
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

LEASE = LeaseSettings(lease=30.0, loop_wait=10.0, retry_timeout=10.0)


class Cutoff:
    """The store's leadership calls, failing while `down` (the database unreachable)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.store, name)

        def checked(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailableError("cannot reach the state database: refused")
            return call(*args, **kwargs)

        return checked


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_one_keeper_leads_and_the_other_waits_saying_so_once(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")

    assert a.step() is Role.LEADING
    for _ in range(5):
        assert b.step() is Role.STANDBY
        assert a.step() is Role.LEADING
        clock.advance(LEASE.loop_wait)

    assert a.term() == 1 and b.term() is None
    assert b.leader == "host-a/1"
    standby = [r for r in caplog.records if r.getMessage().startswith("standby")]
    assert len(standby) == 1
    assert logged(standby[0])["leader"] == "host-a/1"


def test_the_standby_takes_over_only_once_the_leaders_lease_has_run_out(
    store: SQLiteStore, clock: FakeClock
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    a.step()  # then host-a dies: no more renewals

    clock.advance(LEASE.lease - 1)
    assert b.step() is Role.STANDBY
    clock.advance(2)
    assert b.step() is Role.LEADING
    assert b.term() == 2  # a new epoch: the fencing token grew
    assert a.term() is None  # the dead leader's own view has run out too


def test_a_leader_that_cannot_renew_stops_acting_before_its_lease_runs_out(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cut = Cutoff(store)
    a = Election(cut, "host-a/1", LEASE, clock)  # type: ignore[arg-type]
    b = Election(store, "host-b/2", LEASE, clock)
    assert a.step() is Role.LEADING
    renewed_at = clock.monotonic()
    cut.down = True
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")

    acting_until = renewed_at
    while a.term() is not None:
        assert a.step() is Role.UNREACHABLE
        acting_until = clock.monotonic()
        clock.advance(1.0)

    assert acting_until < renewed_at + LEASE.lease - LEASE.retry_timeout + 1
    assert b.step() is Role.STANDBY  # the lease still runs: nobody else acts yet either
    clock.advance(LEASE.retry_timeout)
    assert b.step() is Role.LEADING
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("state store unreachable") for m in messages) == 1
    assert sum(m.startswith("stepped down") for m in messages) == 1


def test_the_keeper_comes_back_after_the_store_answers_again_under_a_new_epoch(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cut = Cutoff(store)
    a = Election(cut, "host-a/1", LEASE, clock)  # type: ignore[arg-type]
    a.step()
    cut.down = True
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")
    for _ in range(40):
        a.step()
        clock.advance(1.0)
    cut.down = False

    assert a.step() is Role.LEADING
    assert a.term() == 2  # its lease ran out meanwhile: a new term, so it recovers first
    assert any(r.getMessage() == "state store answers again" for r in caplog.records)


def test_a_refused_write_makes_the_leader_step_down_at_once_and_say_why(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    a.step()
    stale = store.fenced(1)
    clock.advance(LEASE.lease + 1)  # host-a paused (SIGSTOP) past its lease
    b.step()
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")

    with pytest.raises(FencedError) as refused:
        stale.save_pool("lab", target_version=None, failures=0, breaker_open_until=None)
    a.fenced(refused.value)

    assert a.term() is None and a.role is Role.STANDBY
    assert store.load_pool("lab").failures == 0  # nothing of the refused write
    down = [r for r in caplog.records if r.getMessage().startswith("stepped down")]
    assert len(down) == 1
    assert "epoch 2, held by host-b/2" in logged(down[0])["reason"]


def test_a_clean_stop_hands_the_lease_over_without_waiting_for_it_to_run_out(
    store: SQLiteStore, clock: FakeClock
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    a.step()
    a.release()

    assert b.step() is Role.LEADING


def test_a_leader_whose_loop_is_wedged_hands_the_lease_over_within_the_lease(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    assert a.step() is Role.LEADING
    a.working(True)  # a pass begins ...
    wedged_at = clock.monotonic()  # ... and its first call never returns
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")

    while b.step() is not Role.LEADING:  # both election loops go on as before
        a.step()
        clock.advance(1.0)
        assert clock.monotonic() - wedged_at <= LEASE.lease, "the standby never took over"

    assert a.term() is None and a.wedged is not None
    assert a.step() is Role.STANDBY  # and the wedged keeper does not take the lease back
    down = [r for r in caplog.records if r.getMessage().startswith("stepped down")]
    assert len(down) == 1 and "no progress" in logged(down[0])["reason"]


def test_a_leader_paused_mid_pass_past_its_lease_says_it_was_not_renewed_not_wedged(
    store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP in a pass: when the process runs again, its election loop may step before
    the keeper's loop asks; the reason it gives is the paused lease, not a wedged call."""
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    assert a.step() is Role.LEADING
    a.working(True)  # a pass begins; then the whole process is stopped
    clock.advance(LEASE.lease + 5)
    assert b.step() is Role.LEADING
    caplog.set_level(logging.INFO, logger="imagepipe.app.leadership")

    assert a.step() is Role.STANDBY  # resumed: the election loop runs first

    down = [r for r in caplog.records if r.getMessage().startswith("stepped down")]
    assert len(down) == 1
    assert "not renewed in time" in logged(down[0])["reason"]
    assert a.term() is None and b.term() == 2


def test_a_long_pass_that_makes_progress_and_a_long_wait_keep_the_lease(
    store: SQLiteStore, clock: FakeClock
) -> None:
    a = Election(store, "host-a/1", LEASE, clock)
    b = Election(store, "host-b/2", LEASE, clock)
    a.step()
    for busy in (True, False):  # a pass waiting for slow actions; then no pass at all
        for _ in range(30):
            a.working(busy)
            assert a.step() is Role.LEADING and b.step() is Role.STANDBY
            clock.advance(LEASE.loop_wait / 2)
    assert a.term() == 1


def logged(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a log record (imagepipe.log.fields)."""
    values: dict[str, Any] = getattr(record, "imagepipe_fields", {})
    return values


def write_settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imagepipe.yml"
    path.write_text(text)
    return path


def test_lease_settings_that_break_patronis_rule_are_refused_with_file_line_and_key(
    tmp_path: Path,
) -> None:
    path = write_settings(tmp_path, "keeper:\n  tick: 5s\n  lease: 20s\n  lease_loop: 10s\n")

    with pytest.raises(ConfigError) as refused:
        parse_settings(load_file(path), base=tmp_path)

    text = str(refused.value)
    assert f"{path}:3" in text and "keeper.lease" in text
    assert "10 + 2 * 10 = 30s" in text and "at most keeper.lease (20s)" in text


def test_lease_settings_that_keep_patronis_rule_are_taken(tmp_path: Path) -> None:
    path = write_settings(tmp_path, "keeper:\n  lease: 12s\n  lease_loop: 4s\n  lease_retry: 4s\n")

    keeper = parse_settings(load_file(path), base=tmp_path).keeper

    assert (keeper.lease, keeper.lease_loop, keeper.lease_retry) == (12.0, 4.0, 4.0)


def test_the_lease_loop_pings_the_watchdog_says_who_leads_and_sets_the_metrics(
    tmp_path: Path, store: SQLiteStore
) -> None:
    from imagepipe.app.bootstrap import SystemClock
    from imagepipe.app.leadership import ElectionLoop
    from imagepipe.app.metrics import KeeperMetrics
    from imagepipe.app.notify import SystemdNotifier
    from tests.unit.test_service import NotifySocket

    fast = LeaseSettings(lease=3.0, loop_wait=0.05, retry_timeout=0.05)
    listener = NotifySocket(tmp_path / "notify.sock")
    a = Election(store, "host-a/1", fast, SystemClock())
    a.step()
    b = Election(store, "host-b/2", fast, SystemClock())
    woken = threading.Event()
    metrics = KeeperMetrics()
    notifier = SystemdNotifier(str(listener.path), watchdog_usec=1_000_000)
    loop = ElectionLoop(b, notifier, on_change=woken.set, metrics=metrics)
    loop.start()
    try:
        seen = listener.until("READY")
        pings = listener.until("WATCHDOG")
    finally:
        loop.stop()
        listener.sock.close()
        notifier.close()

    ready = next(m for m in seen if "READY" in m)
    assert ready["STATUS"].startswith("standby: host-a/1 leads")
    assert pings[-1] == {"WATCHDOG": "1"}
    assert metrics.registry.get_sample_value("imagepipe_keeper_leading") == 0
    assert metrics.registry.get_sample_value("imagepipe_state_store_reachable") == 1
    assert not woken.is_set()  # it was a standby from its first step: nothing to wake


def a_keeper(store: SQLiteStore, clock: FakeClock) -> tuple[Keeper, FakeHypervisor]:
    images = FakeImages()
    hv = FakeHypervisor(clock=clock.now)
    hv.add_base(images.publish("tiny", 1))
    spec = PoolSpec(name="lab", image="tiny", initial=1, free=1, max=2, port_first=7400)
    keeper = Keeper(
        hypervisor=hv,
        balancer=FakeBalancer(),
        store=store,
        images=images,
        specs=[spec],
        clock=clock,
    )
    return keeper, hv


def test_keep_once_while_another_keeper_leads_changes_nothing_and_says_who_leads(
    store: SQLiteStore, clock: FakeClock
) -> None:
    Election(store, "host-a/1", LEASE, clock).step()
    keeper, hv = a_keeper(store, clock)

    with pytest.raises(OperationFailedError, match="host-a/1 leads the keepers"):
        pass_once(keeper, Election(store, "host-b/2", LEASE, clock))

    assert hv.clones == {}
    lease = store.leader(clock.now())
    assert lease is not None and lease.holder == "host-a/1" and lease.held


def test_keep_once_with_nobody_leading_passes_under_the_lease_and_gives_it_back(
    store: SQLiteStore, clock: FakeClock
) -> None:
    keeper, _ = a_keeper(store, clock)

    report = pass_once(keeper, Election(store, "host-b/2", LEASE, clock))

    assert report.ok
    assert store.load_pool("lab").target_version == 1  # its pass wrote under the lease
    lease = store.leader(clock.now())
    assert lease is not None and lease.holder == "host-b/2" and not lease.held


class SlowAgents(FakeHypervisor):
    """Each session read takes `seconds[name]` of the fake clock, during which the keeper's
    lease loop goes on stepping its election every second, as `imagepipe keep`'s does."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock.now)
        self.fake_clock = clock
        self.seconds: dict[str, float] = {}
        self.lease_loops: list[Election] = []

    def sessions(self, name: str) -> GuestSession:
        left = self.seconds.get(name, 0.0)
        while left > 0:
            step = min(1.0, left)
            self.fake_clock.advance(step)
            left -= step
            for election in self.lease_loops:
                election.step()
        return super().sessions(name)


def a_leading_keeper_of_late_agents(
    store: SQLiteStore, clock: FakeClock, desktops: int
) -> tuple[Keeper, SlowAgents, Election, Election]:
    """A leader keeping `desktops` running desktops whose guest agents answer late, and a
    standby; both elections step during each session read."""
    images = FakeImages()
    hv = SlowAgents(clock)
    hv.add_base(images.publish("tiny", 1))
    spec = PoolSpec(
        name="lab",
        image="tiny",
        initial=desktops,
        free=desktops,
        max=desktops,
        port_first=7400,
        port_last=7499,
    )
    keeper = Keeper(
        hypervisor=hv,
        balancer=FakeBalancer(),
        store=store,
        images=images,
        specs=[spec],
        clock=clock,
    )
    leader, standby = (
        Election(store, "host-a/1", LEASE, clock),
        Election(store, "host-b/2", LEASE, clock),
    )
    keeper.lead = leader
    assert leader.step() is Role.LEADING
    for _ in range(10):  # the pool fills, quickly
        keeper.pass_if_leading()
        clock.advance(1.0)
        assert leader.step() is Role.LEADING
    assert len(hv.clones) == desktops and keeper.may_act()
    hv.late_agents = set(hv.clones)  # from now on each agent ping waits for its timeout
    hv.lease_loops = [leader, standby]
    return keeper, hv, leader, standby


def test_a_healthy_pass_reading_many_late_agents_one_by_one_keeps_the_lease(
    store: SQLiteStore, clock: FakeClock
) -> None:
    """15 agents of 2 s each: a 30 s observation, longer than the 20 s a pass may go without
    progress; but every answer is progress, so the leader is not taken for wedged."""
    keeper, hv, leader, standby = a_leading_keeper_of_late_agents(store, clock, 15)
    hv.seconds = dict.fromkeys(hv.clones, 2.0)
    began = clock.monotonic()

    report = keeper.pass_if_leading()

    assert clock.monotonic() - began >= 30 > LEASE.stall
    assert report is not None  # the pass ran to its end under its term
    assert leader.term() == 1 and keeper.may_act() and leader.wedged is None
    assert standby.step() is Role.STANDBY and standby.leader == "host-a/1"


def test_a_single_host_call_stuck_past_the_limit_still_hands_the_lease_over(
    store: SQLiteStore, clock: FakeClock
) -> None:
    keeper, hv, leader, standby = a_leading_keeper_of_late_agents(store, clock, 3)
    stuck = sorted(hv.clones)[1]
    hv.seconds = {name: 2.0 for name in hv.clones} | {stuck: LEASE.lease}

    keeper.pass_if_leading()

    assert leader.term() is None and not keeper.may_act()
    assert standby.term() == 2  # the standby took over while the call was stuck
