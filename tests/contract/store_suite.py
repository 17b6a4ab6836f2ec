"""The contract every state store (imagepipe.pool.store.Store) passes: SQLite and PostgreSQL.

Use it by subclassing `StoreContract` in a `Test...` class that provides one fixture,
`place`: a `StorePlace` for a fresh, empty store. `place.open()` opens a handle on it (a
second call: another keeper, the CLI, or the same keeper after a restart) and `place.clock`
is the lease clock: a fake one the test moves for a store whose lease runs on its caller's
clock (SQLite), the real one for a store on the database server's clock (PostgreSQL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from imagepipe.errors import FencedError, ImagepipeError
from imagepipe.pool.actions import (
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    StartClone,
)
from imagepipe.pool.model import CloneRecord, CloneState, Endpoint, PoolDown, PoolRecord
from imagepipe.pool.rollout.records import Heartbeat, PoolProgress, Rollout, RolloutState
from imagepipe.pool.store import HISTORY_LIMIT, PassState, Store
from imagepipe.record import replace

TTL = 0.5  # a lease; long enough for a test's calls, short enough to wait out


class LeaseClock(Protocol):
    def now(self) -> float:
        """What the caller passes as `now` (ignored by a store on the server's clock)."""
        ...

    def wait(self, seconds: float) -> None:
        """Let `seconds` pass on the store's lease clock."""
        ...


class StorePlace(Protocol):
    clock: LeaseClock

    def open(self, *, history_limit: int = HISTORY_LIMIT) -> Store:
        """A handle on the place's store (closed by the suite)."""
        ...


def clone(name: str = "lab-1", slot: int = 1, **changes: Any) -> CloneRecord:
    record = CloneRecord(name=name, slot=slot, version=2, state=CloneState.FREE, since=100.0)
    return replace(record, **changes)


def create(slot: int, pool: str = "lab") -> CreateClone:
    return CreateClone(
        pool=pool,
        clone=f"{pool}-{slot}",
        slot=slot,
        version=1,
        display=Endpoint("127.0.0.1", 5900 + slot),
    )


ROLLOUT = Rollout(
    id=0,
    image="tiny",
    channel="stable",
    pools=("lab", "hall"),
    from_version=1,
    to_version=2,
    state=RolloutState.PENDING,
    created_at=100.0,
    created_by="admin@host",
    deadline_at=500.0,
    message="Maintenance",
    canary=1,
    bake=60.0,
    progress=(PoolProgress(pool="lab", new_ready=1, old_in_use=2, old_at_start=3),),
)


class StoreContract:
    @pytest.fixture
    def opened(self, place: StorePlace) -> Iterator[list[Store]]:
        handles: list[Store] = []
        yield handles
        for handle in handles:
            handle.close()

    @pytest.fixture
    def store(self, place: StorePlace, opened: list[Store]) -> Store:
        return self.open(place, opened)

    def open(self, place: StorePlace, opened: list[Store], **kwargs: Any) -> Store:
        handle = place.open(**kwargs)
        opened.append(handle)
        return handle

    # --- clone and pool records ---------------------------------------------------------

    def test_records_survive_a_restart(self, place: StorePlace, opened: list[Store]) -> None:
        store = place.open()
        busy = clone(
            "lab-0",
            0,
            state=CloneState.IN_USE,
            session_ended_at=90.5,
            last_user="ann",
            failures=2,
            retry_at=130.0,
            dirty=True,
            sessions_seen=17,
        )
        store.save_clone("lab", busy)
        store.save_clone("lab", clone("lab-1", 1))
        store.save_pool("lab", target_version=3, failures=1, breaker_open_until=700.0)
        store.close()

        again = self.open(place, opened)
        assert again.load_pool("lab") == PoolRecord(
            pool="lab",
            clones={"lab-0": busy, "lab-1": clone("lab-1", 1)},
            target_version=3,
            failures=1,
            breaker_open_until=700.0,
        )
        assert again.pools() == ["lab"]

    def test_an_unknown_pool_has_an_empty_record(self, store: Store) -> None:
        assert store.load_pool("nope") == PoolRecord(pool="nope")
        assert store.pools() == []

    def test_apply_writes_record_actions_and_skips_the_others(self, store: Store) -> None:
        store.save_clone("lab", clone("lab-9", 9))
        store.apply(
            "lab",
            [
                RecordClone(pool="lab", clone="lab-1", record=clone("lab-1", 1)),
                StartClone(pool="lab", clone="lab-1"),
                DeleteClone(pool="lab", clone="lab-9"),
                ForgetClone(pool="lab", clone="lab-9"),
                RecordPool(
                    pool="lab",
                    target_version=4,
                    failures=0,
                    breaker_open_until=None,
                    rollout_started_at=50.0,
                ),
            ],
        )
        record = store.load_pool("lab")
        assert list(record.clones) == ["lab-1"]
        assert (record.target_version, record.rollout_started_at) == (4, 50.0)

    def test_apply_is_all_or_nothing(self, store: Store) -> None:
        too_big = clone("lab-2", 2**70)  # both databases' integers stop at 2**63
        with pytest.raises((OverflowError, ImagepipeError)):
            store.apply(
                "lab",
                [
                    RecordClone(pool="lab", clone="lab-1", record=clone("lab-1", 1)),
                    RecordClone(pool="lab", clone="lab-2", record=too_big),
                ],
            )
        assert store.load_pool("lab").clones == {}
        store.save_clone("lab", clone("lab-3", 3))  # and the store still works
        assert list(store.load_pool("lab").clones) == ["lab-3"]

    def test_apply_refuses_a_record_of_another_pool(self, store: Store) -> None:
        with pytest.raises(ValueError, match="for pool 'lab' applied to 'other'"):
            store.apply("other", [RecordClone(pool="lab", clone="lab-1", record=clone())])

    def test_saving_a_clone_replaces_its_record_and_forgetting_removes_it(
        self, store: Store
    ) -> None:
        store.save_clone("lab", clone())
        store.save_clone("lab", clone(state=CloneState.RECYCLING, since=200.0))
        assert store.load_pool("lab").clones["lab-1"].state is CloneState.RECYCLING
        store.forget_clone("lab", "lab-1")
        store.forget_clone("lab", "lab-1")  # already gone: harmless
        assert store.load_pool("lab").clones == {}

    def test_a_completed_reset_clears_the_dirty_mark(self, store: Store) -> None:
        store.save_clone("lab", clone(dirty=True))
        store.mark_clean("lab", "lab-1")
        assert store.load_pool("lab").clones["lab-1"].dirty is False

    def test_saving_pool_counters_keeps_the_rollout_start(self, store: Store) -> None:
        store.apply(
            "lab",
            [
                RecordPool(
                    pool="lab",
                    target_version=2,
                    failures=0,
                    breaker_open_until=None,
                    rollout_started_at=10.0,
                )
            ],
        )
        store.save_pool("lab", target_version=2, failures=3, breaker_open_until=99.0)
        record = store.load_pool("lab")
        assert (record.failures, record.breaker_open_until, record.rollout_started_at) == (
            3,
            99.0,
            10.0,
        )
        store.save_pool(
            "lab", target_version=2, failures=0, breaker_open_until=None, rollout_started_at=None
        )
        assert store.load_pool("lab").rollout_started_at is None

    def test_pools_are_listed_from_pool_and_clone_records(self, store: Store) -> None:
        store.save_clone("b", clone("b-0", 0))
        store.save_pool("a", target_version=None, failures=0, breaker_open_until=None)
        assert store.pools() == ["a", "b"]

    # --- journal --------------------------------------------------------------------------

    def test_actions_unfinished_at_a_crash_are_open_after_restart(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        store = place.open()
        done = store.journal_begin(create(0), now=10.0)
        store.journal_begin(create(1), now=11.0)
        store.journal_end(done, ok=True, error=None, now=12.0)
        store.close()  # the keeper dies before create(1) ends

        again = self.open(place, opened)
        [entry] = again.journal_open()
        assert (entry.action, entry.started_at) == (create(1), 11.0)
        again.journal_end(entry.id, ok=False, error="keeper restarted", now=20.0)
        assert again.journal_open() == []

    def test_recent_history_is_newest_first_and_per_pool(self, store: Store) -> None:
        for slot in range(3):
            entry = store.journal_begin(create(slot), now=float(slot))
            store.journal_end(
                entry, ok=slot != 1, error="boom" if slot == 1 else None, now=slot + 0.5
            )
        store.journal_begin(create(0, pool="other"), now=9.0)

        recent = store.journal_recent(None, limit=2)
        assert [(r.pool, r.clone, r.ended_at) for r in recent] == [
            ("other", "other-0", None),
            ("lab", "lab-2", 2.5),
        ]
        lab = store.journal_recent("lab", limit=10)
        assert [(r.clone, r.ok, r.error, r.kind) for r in lab] == [
            ("lab-2", True, None, "CreateClone"),
            ("lab-1", False, "boom", "CreateClone"),
            ("lab-0", True, None, "CreateClone"),
        ]
        assert lab[0].action == create(2)

    def test_old_finished_history_is_pruned_but_open_actions_are_kept(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        store = self.open(place, opened, history_limit=5)
        unfinished = store.journal_begin(create(99), now=0.0)
        for n in range(250):
            entry = store.journal_begin(create(n % 10), now=float(n))
            store.journal_end(entry, ok=True, error=None, now=float(n))
        assert len(store.journal_recent(None, limit=1000)) <= 1 + 5 + 100  # every 100 ends
        store.prune()
        history = store.journal_recent(None, limit=1000)
        assert len(history) == 6
        assert [e.id for e in store.journal_open()] == [unfinished]
        assert history[0].started_at == 249.0

    def test_the_journal_is_safe_to_use_from_several_threads(self, store: Store) -> None:
        ids: list[int] = []

        def work(worker: int) -> None:
            for n in range(25):
                entry = store.journal_begin(create(worker * 100 + n), now=float(n))
                store.journal_end(entry, ok=True, error=None, now=float(n))
                ids.append(entry)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(ids)) == 100
        assert store.journal_open() == []

    # --- login history, pools down ----------------------------------------------------------

    def test_logins_add_up_per_bucket_and_old_days_are_forgotten(self, store: Store) -> None:
        store.record_logins("lab", 100, 3, 2, seconds=900.0, keep_days=7)
        store.record_logins("lab", 100, 3, 1, seconds=900.0, keep_days=7)
        store.record_logins("lab", 101, 5, 4, seconds=900.0, keep_days=7)
        store.record_logins("hall", 101, 5, 9, seconds=900.0, keep_days=7)
        history = store.login_history("lab", seconds=900.0, since_day=0)
        assert history.days == {100: {3: 3}, 101: {5: 4}}
        store.record_logins("lab", 108, 0, 1, seconds=900.0, keep_days=7)
        assert set(store.login_history("lab", seconds=900.0, since_day=0).days) == {101, 108}
        assert store.login_history("lab", seconds=900.0, since_day=102).days == {108: {0: 1}}

    def test_a_pool_marked_down_can_only_be_hurried_and_then_kept_again(self, store: Store) -> None:
        assert store.pool_down("lab") is None
        store.mark_down("lab", PoolDown(since=5.0, now=True))
        store.mark_down("lab", PoolDown(since=9.0, now=False))
        assert store.pool_down("lab") == PoolDown(since=5.0, now=True)
        assert store.clear_down("lab") is True
        assert store.clear_down("lab") is False
        assert store.pool_down("lab") is None

    def test_a_drained_host_keeps_its_first_since_until_undrained(self, store: Store) -> None:
        assert store.draining_hosts() == {}
        assert store.set_host_draining("h2", 5.0) is True
        assert store.set_host_draining("h2", 9.0) is False
        assert store.set_host_draining("h1", 7.0) is True
        assert store.draining_hosts() == {"h1": 7.0, "h2": 5.0}
        assert store.set_host_draining("h2", None) is True
        assert store.set_host_draining("h2", None) is False
        assert store.draining_hosts() == {"h1": 7.0}

    def test_a_clone_record_keeps_its_host_and_since_when_it_is_lost(self, store: Store) -> None:
        store.save_clone("lab", clone(host="h2", lost_since=12.5))
        record = store.load_pool("lab").clones["lab-1"]
        assert (record.host, record.lost_since) == ("h2", 12.5)

    # --- rollouts and the heartbeat -----------------------------------------------------

    def test_a_rollout_reads_back_as_written_after_a_restart(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        store = place.open()
        saved = store.add_rollout(ROLLOUT)
        store.close()

        again = self.open(place, opened)
        assert again.rollout(saved.id) == saved == replace(ROLLOUT, id=1)
        assert again.rollouts("tiny", active=True) == [saved]
        assert again.rollouts("other") == []
        assert again.rollout(99) is None

    def test_ended_rollouts_are_history_newest_first(self, store: Store) -> None:
        first = store.add_rollout(ROLLOUT)
        store.save_rollout(replace(first, state=RolloutState.DONE, finished_at=200.0))
        second = store.add_rollout(replace(ROLLOUT, from_version=2, to_version=3))

        assert [r.id for r in store.rollouts("tiny")] == [second.id, first.id]
        assert [r.id for r in store.rollouts("tiny", active=True)] == [second.id]
        assert [r.id for r in store.rollouts(limit=1)] == [second.id]

    def test_a_pause_written_by_the_cli_is_not_lost_to_the_keepers_write(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        keeper = self.open(place, opened)
        cli = self.open(place, opened)
        saved = keeper.add_rollout(ROLLOUT)

        def keeper_judges(current: Rollout) -> Rollout:
            return replace(current, reason=f"judged paused={current.paused}")

        cli.update_rollout(saved.id, lambda r: replace(r, paused=True))
        result = keeper.update_rollout(saved.id, keeper_judges)

        assert result is not None
        assert result[1].paused and result[1].reason == "judged paused=True"
        assert keeper.update_rollout(99, keeper_judges) is None

    def test_the_heartbeat_keeps_the_last_pass(self, store: Store) -> None:
        assert store.heartbeat() is None
        store.beat(Heartbeat(at=1.0, pid=10, host="h", tick=5.0))
        store.beat(Heartbeat(at=2.0, pid=11, host="h2", tick=5.0))
        assert store.heartbeat() == Heartbeat(at=2.0, pid=11, host="h2", tick=5.0)

    def test_the_heartbeat_tells_which_hosts_breaker_is_open_until_when(self, store: Store) -> None:
        """The host circuit breaker lives in the leading keeper's memory; `imagepipe hosts`
        (another process, maybe another machine) reads it from the heartbeat."""
        broken = Heartbeat(at=1.0, pid=10, host="k", tick=5.0, host_breakers=(("h2", 601.0),))
        store.beat(broken)
        assert store.heartbeat() == broken
        healed = replace(broken, at=2.0, host_breakers=())
        store.begin_pass(healed, ["lab"])
        assert store.heartbeat() == healed
        store.begin_pass(replace(broken, at=3.0), ["lab"])
        assert store.heartbeat() == replace(broken, at=3.0)

    def test_a_pass_begins_with_its_heartbeat_and_reads_what_the_single_reads_give(
        self, store: Store
    ) -> None:
        store.apply(
            "lab",
            [
                RecordClone(pool="lab", clone="lab-2", record=clone("lab-2", 2, dirty=True)),
                RecordClone(pool="lab", clone="lab-1", record=clone("lab-1", 1)),
                RecordPool(pool="lab", target_version=2, failures=1, breaker_open_until=9.0),
            ],
        )
        store.save_clone("hall", clone("hall-1", 1, host="h2"))
        store.save_clone("other", clone("other-1", 1))
        store.mark_down("hall", PoolDown(since=5.0, now=True))
        done = store.add_rollout(ROLLOUT)
        store.save_rollout(replace(done, state=RolloutState.DONE, finished_at=200.0))
        newer = store.add_rollout(replace(ROLLOUT, from_version=2, to_version=3))
        store.set_host_draining("h2", 7.0)
        beat = Heartbeat(at=3.0, pid=12, host="h", tick=5.0)

        state = store.begin_pass(beat, ["lab", "hall", "empty"])

        assert store.heartbeat() == beat
        assert state.records == {name: store.load_pool(name) for name in ("lab", "hall", "empty")}
        assert list(state.records["lab"].clones) == ["lab-1", "lab-2"]  # in slot order
        assert state.down == {"hall": PoolDown(since=5.0, now=True)}
        assert state.rollouts == (newer,)
        assert state.draining == {"h2": 7.0}
        nothing = store.begin_pass(beat, [])
        assert nothing.records == {} and nothing.down == {} and nothing.rollouts == (newer,)

    def test_every_pass_sees_what_another_machine_wrote_since_the_last_one(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        """A keeper's passes over a store that another keeper or an admin's `rollout`,
        `pools down` or `hosts drain` (another connection) writes to: each pass sees every
        write made before it, also after passes that found nothing new; and every pass
        writes its heartbeat."""
        keeper, admin = self.open(place, opened), self.open(place, opened)
        pools = ["lab", "hall"]

        def begin(at: float) -> PassState:
            state = keeper.begin_pass(Heartbeat(at=at, pid=1, host="k", tick=5.0), pools)
            assert keeper.heartbeat() == admin.heartbeat() == Heartbeat(at, 1, "k", 5.0)
            assert state.records == {name: admin.load_pool(name) for name in pools}
            assert state.down == {p: d for p in pools if (d := admin.pool_down(p)) is not None}
            assert state.rollouts == tuple(admin.rollouts(active=True))
            assert state.draining == admin.draining_hosts()
            return state

        first = begin(1.0)
        assert begin(2.0) == first  # nothing written meanwhile
        changes = [
            lambda: admin.save_clone("lab", clone("lab-1", 1, dirty=True)),
            lambda: admin.mark_down("hall", PoolDown(since=5.0, now=False)),
            lambda: admin.add_rollout(ROLLOUT),
            lambda: admin.update_rollout(1, lambda r: replace(r, paused=True, reason="admin")),
            lambda: admin.set_host_draining("h2", 7.0),
            lambda: admin.save_pool("lab", target_version=3, failures=2, breaker_open_until=None),
            lambda: admin.mark_clean("lab", "lab-1"),
            lambda: admin.clear_down("hall"),
            lambda: admin.set_host_draining("h2", None),
            lambda: admin.forget_clone("lab", "lab-1"),
        ]
        at, seen = 3.0, [first]
        for change in changes:
            change()
            state = begin(at)
            assert state != seen[-1]  # every change shows at the next pass
            assert begin(at + 1) == state  # and the pass after reads what it had
            seen.append(state)
            at += 2
        # the keeper's own journal and lease writes change nothing a pass reads
        keeper.journal_end(keeper.journal_begin(create(1), now=1.0), ok=True, error=None, now=2.0)
        assert begin(at) == seen[-1]

    def test_a_pass_that_reads_nothing_new_is_still_fenced(
        self, place: StorePlace, opened: list[Store]
    ) -> None:
        old, new = self.open(place, opened), self.open(place, opened)
        clock = place.clock
        old_epoch = old.try_acquire("old", TTL, clock.now())
        assert old_epoch is not None
        leader = old.fenced(old_epoch)
        leader.begin_pass(Heartbeat(at=1.0, pid=1, host="old", tick=5.0), ["lab"])
        leader.begin_pass(Heartbeat(at=2.0, pid=1, host="old", tick=5.0), ["lab"])
        clock.wait(TTL * 1.5)
        new_epoch = new.try_acquire("new", TTL, clock.now())
        assert new_epoch == old_epoch + 1

        with pytest.raises(FencedError) as refused:
            leader.begin_pass(Heartbeat(at=3.0, pid=1, host="old", tick=5.0), ["lab"])
        assert (refused.value.epoch, refused.value.current) == (old_epoch, new_epoch)
        assert new.heartbeat() == Heartbeat(at=2.0, pid=1, host="old", tick=5.0)

    # --- the leader lease and the fencing token -----------------------------------------

    def test_one_holder_leads_until_its_lease_runs_out(self, place: StorePlace) -> None:
        a, b = place.open(), place.open()
        clock = place.clock
        assert a.leader(clock.now()) is None
        assert a.try_acquire("a", TTL, clock.now()) == 1
        assert b.try_acquire("b", TTL, clock.now()) is None
        lease = b.leader(clock.now())
        assert lease is not None and (lease.holder, lease.epoch, lease.held) == ("a", 1, True)
        assert a.try_acquire("a", TTL, clock.now()) == 1  # the holder again: a renewal

        clock.wait(TTL * 1.5)
        assert b.try_acquire("b", TTL, clock.now()) == 2  # a new epoch at each election
        assert a.renew("a", 1, TTL, clock.now()) is False  # replaced: step down
        assert b.renew("b", 2, TTL, clock.now()) is True
        a.close()
        b.close()

    def test_a_lease_that_is_renewed_stays_and_one_not_renewed_runs_out(
        self, place: StorePlace
    ) -> None:
        a, b = place.open(), place.open()
        clock = place.clock
        epoch = a.try_acquire("a", TTL, clock.now())
        assert epoch is not None
        for _ in range(3):
            clock.wait(TTL * 0.5)
            assert a.renew("a", epoch, TTL, clock.now()) is True
            assert b.try_acquire("b", TTL, clock.now()) is None
        clock.wait(TTL * 1.5)
        assert a.renew("a", epoch, TTL, clock.now()) is False  # ran out: renew no more
        lease = b.leader(clock.now())
        assert lease is not None and not lease.held
        a.close()
        b.close()

    def test_a_released_lease_is_taken_at_once(self, place: StorePlace) -> None:
        a, b = place.open(), place.open()
        clock = place.clock
        assert a.try_acquire("a", 60.0, clock.now()) == 1
        b.release("a", 7, clock.now())  # not its epoch: nothing happens
        assert b.try_acquire("b", 60.0, clock.now()) is None
        a.release("a", 1, clock.now())
        assert b.try_acquire("b", 60.0, clock.now()) == 2
        a.close()
        b.close()

    def test_a_write_with_the_current_epoch_commits(self, place: StorePlace) -> None:
        store = place.open()
        epoch = store.try_acquire("a", 60.0, place.clock.now())
        assert epoch is not None
        leader = store.fenced(epoch)
        leader.save_clone("lab", clone())
        leader.journal_end(leader.journal_begin(create(1), now=1.0), ok=True, error=None, now=2.0)
        assert list(store.load_pool("lab").clones) == ["lab-1"]
        store.close()

    def test_a_replaced_leader_writes_nothing(self, place: StorePlace) -> None:
        """A keeper paused past its lease comes back: each of its writes is refused in its
        own transaction, and nothing of it is in the store."""
        old, new = place.open(), place.open()
        clock = place.clock
        old_epoch = old.try_acquire("old", TTL, clock.now())
        assert old_epoch is not None
        paused = old.fenced(old_epoch)
        paused.save_clone("lab", clone("lab-1", 1))
        clock.wait(TTL * 1.5)
        new_epoch = new.try_acquire("new", TTL, clock.now())
        assert new_epoch == old_epoch + 1

        before = new.load_pool("lab")
        writes = [
            lambda: paused.save_clone("lab", clone("lab-2", 2)),
            lambda: paused.apply(
                "lab", [RecordClone(pool="lab", clone="lab-3", record=clone("lab-3", 3))]
            ),
            lambda: paused.forget_clone("lab", "lab-1"),
            lambda: paused.journal_begin(create(4), now=5.0),
            lambda: paused.beat(Heartbeat(at=5.0, pid=1, host="old", tick=5.0)),
            lambda: paused.begin_pass(Heartbeat(at=5.0, pid=1, host="old", tick=5.0), ["lab"]),
            lambda: paused.add_rollout(ROLLOUT),
            lambda: paused.mark_down("lab", PoolDown(since=5.0, now=True)),
        ]
        for write in writes:
            with pytest.raises(FencedError) as refused:
                write()
            assert (refused.value.epoch, refused.value.current) == (old_epoch, new_epoch)
            assert refused.value.holder == "new"
        assert new.load_pool("lab") == before
        assert new.journal_open() == [] and new.heartbeat() is None
        assert new.rollouts() == [] and new.pool_down("lab") is None
        new.fenced(new_epoch).save_clone("lab", clone("lab-5", 5))  # the new leader writes
        assert sorted(new.load_pool("lab").clones) == ["lab-1", "lab-5"]
        old.close()
        new.close()

    def test_a_fenced_write_before_any_election_is_refused(self, store: Store) -> None:
        with pytest.raises(FencedError):
            store.fenced(1).save_clone("lab", clone())
        assert store.load_pool("lab").clones == {}
