"""The executor: ordering, bounded parallelism, retries, timeouts, journal and recovery."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.errors import BusyError, FatalHypervisorError
from imagepipe.pool.actions import (
    Action,
    BalancerEnable,
    CreateClone,
    DeleteClone,
    RecordClone,
    ResetClone,
    StartClone,
)
from imagepipe.pool.executor import ExecutionReport, Executor, ExecutorSettings
from imagepipe.pool.model import CloneRecord, CloneSpec, CloneState, Endpoint, PoolSpec
from imagepipe.pool.planner import failures_after
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

LAB = PoolSpec(name="lab", image="tiny", max=8, port_first=5900, port_last=5907, max_failures=2)
SPECS = {"lab": LAB}


@dataclass
class Rig:
    store: SQLiteStore
    clock: FakeClock = field(default_factory=FakeClock)
    images: FakeImages = field(default_factory=FakeImages)
    lb: FakeBalancer = field(default_factory=FakeBalancer)
    hv: FakeHypervisor = field(init=False)

    def __post_init__(self) -> None:
        self.hv = FakeHypervisor(clock=self.clock.now)
        self.hv.add_base(self.images.publish("tiny", 1))

    def executor(self, **settings: float) -> Executor:
        return Executor(
            self.hv,
            self.lb,
            self.store,
            lambda image, version: self.images.resolve(image, version).base_image(),
            self.clock,
            ExecutorSettings(**settings),  # type: ignore[arg-type]
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(store=SQLiteStore(tmp_path / "state.db"))
    yield r
    r.store.close()


def create(slot: int) -> CreateClone:
    return CreateClone(
        pool="lab",
        clone=f"lab-{slot}",
        slot=slot,
        version=1,
        display=Endpoint("127.0.0.1", 5900 + slot),
    )


def creating(slot: int, now: float) -> RecordClone:
    record = CloneRecord(
        name=f"lab-{slot}", slot=slot, version=1, state=CloneState.CREATING, since=now
    )
    return RecordClone(pool="lab", clone=f"lab-{slot}", record=record)


def bring_up(slot: int) -> list[Action]:
    name = f"lab-{slot}"
    return [
        create(slot),
        StartClone(pool="lab", clone=name),
        BalancerEnable(pool="lab", clone=name, address=Endpoint("127.0.0.1", 5900 + slot)),
    ]


def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a background thread's effect; returns as soon as it shows (a loaded CI
    machine may need longer than a quiet one, never a fixed number of tries)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the background work never finished"
        threading.Event().wait(0.01)


def test_actions_on_one_clone_run_in_order_and_are_journaled(rig: Rig) -> None:
    report = rig.executor().run(SPECS, bring_up(0) + bring_up(1))

    assert report.ok and len(report.outcomes) == 6
    for name in ("lab-0", "lab-1"):
        ops = [op for op, clone in rig.hv.calls if clone == name]
        assert ops == ["create_clone", "start"]
    assert [b.name for b in rig.lb.list_backends()] == ["lab-0", "lab-1"]
    history = rig.store.journal_recent("lab", 20)
    assert len(history) == 6 and all(entry.ok for entry in history)
    assert rig.store.journal_open() == []


def test_clones_are_made_in_parallel_but_never_more_than_parallel_at_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    meeting = threading.Barrier(2, timeout=5)
    lock = threading.Lock()
    running = peak = 0
    real_create = rig.hv.create_clone

    def create_clone(spec: CloneSpec) -> object:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        meeting.wait()  # fails unless two creates overlap
        try:
            return real_create(spec)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(rig.hv, "create_clone", create_clone)
    report = rig.executor(parallel=2).run(SPECS, [create(s) for s in range(4)])

    assert report.ok
    assert peak == 2
    assert len(rig.hv.clones) == 4


def test_busy_is_retried_with_doubling_backoff_and_the_retries_are_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.hv.fail_next("start", BusyError("domain is locked"), times=2)
    rig.executor().run(SPECS, [create(0)])
    caplog.set_level(logging.INFO)

    report = rig.executor(busy_backoff=1.5).run(SPECS, [StartClone(pool="lab", clone="lab-0")])

    assert report.ok and report.outcomes[0].attempts == 3
    assert rig.clock.slept == [1.5, 3.0]
    assert sum("busy, retrying" in r.getMessage() for r in caplog.records) == 2


def test_busy_retries_are_bounded(rig: Rig) -> None:
    rig.hv.fail_next("create_clone", BusyError("storage pool locked"), times=10)

    report = rig.executor(busy_retries=2).run(SPECS, bring_up(0))

    assert not report.ok
    assert report.outcomes[0].attempts == 3
    assert rig.hv.count("create_clone") == 3
    assert len(report.skipped) == 2, "start and enable do not run after a failed create"


def test_a_missing_clone_is_final_except_that_deleting_it_succeeds(rig: Rig) -> None:
    report = rig.executor().run(
        SPECS, [DeleteClone(pool="lab", clone="lab-5"), StartClone(pool="lab", clone="lab-6")]
    )

    outcomes = {o.action.kind: o for o in report.outcomes}
    assert outcomes["DeleteClone"].ok
    assert not outcomes["StartClone"].ok and outcomes["StartClone"].attempts == 1
    assert "lab-6" in (outcomes["StartClone"].error or "")


def test_a_failed_create_is_reported_and_the_failure_policy_counts_it_against_the_pool(
    rig: Rig,
) -> None:
    now = rig.clock.now()
    rig.hv.fail_next("create_clone", FatalHypervisorError("no space left on device"), times=2)

    report = rig.executor().run(SPECS, [creating(0, now), create(0), creating(1, now), create(1)])
    assert [o.action for o in report.failed] == [create(0), create(1)]
    assert rig.store.load_pool("lab").failures == 0, "the executor reports, it does not decide"
    # what the keeper does with the report: the planner's failure policy, written down
    failed = [o.action for o in report.failed]
    rig.store.apply("lab", failures_after(LAB, rig.store.load_pool("lab"), failed, now))

    record = rig.store.load_pool("lab")
    assert {c.state for c in record.clones.values()} == {CloneState.FAILED}
    assert all(c.retry_at is not None and c.retry_at > now for c in record.clones.values())
    assert record.failures == 2
    assert record.breaker_open_until == now + LAB.breaker_cooldown


def run_until_the_clock_passes(
    rig: Rig, executor: Executor, actions: list[Action]
) -> ExecutionReport:
    """Run `actions` while the fake clock is moved past the executor's action timeout as
    soon as the hypervisor has the first call: no real waiting for a timeout."""
    result: list[ExecutionReport] = []
    calls = len(rig.hv.calls)
    runner = threading.Thread(
        target=lambda: result.append(executor.run(SPECS, actions)), daemon=True
    )
    runner.start()
    eventually(lambda: len(rig.hv.calls) > calls)
    rig.clock.advance(executor.settings.action_timeout + 1)
    runner.join(10)
    (report,) = result
    return report


def test_a_hung_call_times_out_and_its_clone_is_left_alone_until_it_returns(rig: Rig) -> None:
    executor = rig.executor(action_timeout=30.0, poll=0.01)
    executor.run(SPECS, [create(0)])
    gate = rig.hv.block("start")

    hung = run_until_the_clock_passes(rig, executor, [StartClone(pool="lab", clone="lab-0")])
    assert not hung.ok and "timed out" in (hung.failed[0].error or "")
    meanwhile = executor.run(SPECS, [StartClone(pool="lab", clone="lab-0")])
    assert meanwhile.skipped and not meanwhile.outcomes

    gate.set()
    eventually(lambda: rig.hv.clones["lab-0"].power == "running")
    after = executor.run(SPECS, [StartClone(pool="lab", clone="lab-0")])
    assert after.ok and after.outcomes


def test_stop_lets_the_action_in_flight_finish_and_starts_no_other(rig: Rig) -> None:
    executor = rig.executor(parallel=1)
    gate = rig.hv.block("create_clone")
    result: list[object] = []
    runner = threading.Thread(
        target=lambda: result.append(executor.run(SPECS, [create(0), create(1), create(2)]))
    )
    runner.start()
    eventually(lambda: bool(rig.hv.calls))

    executor.stop()
    gate.set()
    runner.join(10)

    (report,) = result
    assert report.ok and len(report.outcomes) == 1  # type: ignore[attr-defined]
    assert len(report.skipped) == 2  # type: ignore[attr-defined]
    assert list(rig.hv.clones) == ["lab-0"]
    assert rig.store.journal_open() == []


def test_recovery_removes_a_half_made_clone_and_repeats_an_interrupted_delete(
    rig: Rig,
) -> None:
    rig.executor().run(SPECS, [creating(0, rig.clock.now()), create(0), create(1)])
    rig.store.journal_begin(create(0), rig.clock.now())  # crashed right after the create
    rig.store.journal_begin(DeleteClone(pool="lab", clone="lab-1"), rig.clock.now())
    rig.store.journal_begin(ResetClone(pool="lab", clone="lab-7"), rig.clock.now())

    outcomes = rig.executor().recover()

    assert len(outcomes) == 3 and all(o.ok for o in outcomes)
    assert rig.hv.clones == {}
    assert "lab-0" not in rig.store.load_pool("lab").clones
    assert rig.store.journal_open() == []
    notes = [e.error or "" for e in rig.store.journal_recent("lab", 10)]
    assert any("half-made" in n for n in notes)


def test_recovery_never_resets_a_clone_somebody_is_on(rig: Rig) -> None:
    rig.executor().run(SPECS, bring_up(0))
    rig.hv.connect("lab-0", "10.0.0.9")
    rig.store.journal_begin(ResetClone(pool="lab", clone="lab-0"), rig.clock.now())

    rig.executor().recover()

    assert rig.hv.count("reset") == 0
    assert rig.hv.clones["lab-0"].session.client == "10.0.0.9"


def test_a_completed_reset_clears_the_dirty_mark_and_a_failed_one_keeps_it(rig: Rig) -> None:
    rig.executor().run(SPECS, [*bring_up(0), *bring_up(1)])
    for slot in (0, 1):
        used = CloneRecord(f"lab-{slot}", slot, 1, CloneState.BOOTING, rig.clock.now(), dirty=True)
        rig.store.save_clone("lab", used)
    rig.hv.fail_next("reset", FatalHypervisorError("disk full"))

    report = rig.executor().run(
        SPECS, [ResetClone(pool="lab", clone="lab-0"), ResetClone(pool="lab", clone="lab-1")]
    )

    clones = rig.store.load_pool("lab").clones
    failed = {o.action.clone for o in report.failed}
    assert len(failed) == 1
    assert all(clones[n].dirty == (n in failed) for n in ("lab-0", "lab-1"))


def test_a_timeout_follows_the_injected_clock_not_the_wall_clock(rig: Rig) -> None:
    executor = rig.executor(action_timeout=600.0, poll=0.01)
    gate = rig.hv.block("create_clone")
    started = time.monotonic()

    report = run_until_the_clock_passes(rig, executor, [create(0)])

    assert "timed out after 600s" in (report.failed[0].error or "")
    assert time.monotonic() - started < 60, "the executor waited for real time"
    assert executor.in_flight("lab") == frozenset({"lab-0"})
    gate.set()
    eventually(lambda: executor.in_flight("lab") == frozenset())
