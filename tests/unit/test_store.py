"""The state store keeps what the hypervisor cannot tell, across restarts and crashes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from imagepipe.errors import EnvironmentMissingError, ImagepipeError
from imagepipe.pool.model import (
    CloneRecord,
    CloneState,
    CreateClone,
    DeleteClone,
    Endpoint,
    ForgetClone,
    PoolRecord,
    RecordClone,
    RecordPool,
    StartClone,
)
from imagepipe.stores.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore


def clone(name: str = "lab-1", slot: int = 1, **changes: Any) -> CloneRecord:
    record = CloneRecord(name=name, slot=slot, version=2, state=CloneState.FREE, since=100.0)
    return replace(record, **changes)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db: Path) -> SQLiteStore:
    return SQLiteStore(db)


def test_records_survive_a_restart(db: Path) -> None:
    store = SQLiteStore(db)
    busy = clone(
        "lab-0",
        0,
        state=CloneState.IN_USE,
        session_ended_at=90.5,
        last_user="ann",
        failures=2,
        retry_at=130.0,
    )
    store.save_clone("lab", busy)
    store.save_clone("lab", clone("lab-1", 1))
    store.save_pool("lab", target_version=3, failures=1, breaker_open_until=700.0)
    store.close()

    again = SQLiteStore(db)
    assert again.load_pool("lab") == PoolRecord(
        pool="lab",
        clones={"lab-0": busy, "lab-1": clone("lab-1", 1)},
        target_version=3,
        failures=1,
        breaker_open_until=700.0,
    )
    assert again.pools() == ["lab"]


def test_an_unknown_pool_has_an_empty_record(store: SQLiteStore) -> None:
    assert store.load_pool("nope") == PoolRecord(pool="nope")
    assert store.pools() == []


def test_apply_writes_record_actions_and_skips_the_others(store: SQLiteStore) -> None:
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


def test_apply_is_all_or_nothing(store: SQLiteStore) -> None:
    too_big = clone("lab-2", 2**70)  # SQLite integers stop at 2**63
    with pytest.raises(OverflowError):
        store.apply(
            "lab",
            [
                RecordClone(pool="lab", clone="lab-1", record=clone("lab-1", 1)),
                RecordClone(pool="lab", clone="lab-2", record=too_big),
            ],
        )
    assert store.load_pool("lab").clones == {}


def test_apply_refuses_a_record_of_another_pool(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="for pool 'lab' applied to 'other'"):
        store.apply("other", [RecordClone(pool="lab", clone="lab-1", record=clone())])


def test_saving_a_clone_replaces_its_record_and_forgetting_removes_it(store: SQLiteStore) -> None:
    store.save_clone("lab", clone())
    store.save_clone("lab", clone(state=CloneState.RECYCLING, since=200.0))
    assert store.load_pool("lab").clones["lab-1"].state is CloneState.RECYCLING
    store.forget_clone("lab", "lab-1")
    store.forget_clone("lab", "lab-1")  # already gone: harmless
    assert store.load_pool("lab").clones == {}


def test_saving_pool_counters_keeps_the_rollout_start(store: SQLiteStore) -> None:
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


def test_pools_are_listed_from_pool_and_clone_records(store: SQLiteStore) -> None:
    store.save_clone("b", clone("b-0", 0))
    store.save_pool("a", target_version=None, failures=0, breaker_open_until=None)
    assert store.pools() == ["a", "b"]


# --- journal ---------------------------------------------------------------------------


def create(slot: int, pool: str = "lab") -> CreateClone:
    return CreateClone(
        pool=pool,
        clone=f"{pool}-{slot}",
        slot=slot,
        version=1,
        display=Endpoint("127.0.0.1", 5900 + slot),
    )


def test_actions_unfinished_at_a_crash_are_open_after_restart(db: Path) -> None:
    store = SQLiteStore(db)
    done = store.journal_begin(create(0), now=10.0)
    store.journal_begin(create(1), now=11.0)
    store.journal_end(done, ok=True, error=None, now=12.0)
    store.close()  # the keeper dies before create(1) ends

    again = SQLiteStore(db)
    [entry] = again.journal_open()
    assert (entry.action, entry.started_at) == (create(1), 11.0)
    again.journal_end(entry.id, ok=False, error="keeper restarted", now=20.0)
    assert again.journal_open() == []


def test_recent_history_is_newest_first_and_per_pool(store: SQLiteStore) -> None:
    for slot in range(3):
        entry = store.journal_begin(create(slot), now=float(slot))
        store.journal_end(entry, ok=slot != 1, error="boom" if slot == 1 else None, now=slot + 0.5)
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


def test_old_finished_history_is_pruned_but_open_actions_are_kept(db: Path) -> None:
    store = SQLiteStore(db, history_limit=5)
    unfinished = store.journal_begin(create(99), now=0.0)
    for n in range(250):
        entry = store.journal_begin(create(n % 10), now=float(n))
        store.journal_end(entry, ok=True, error=None, now=float(n))
    assert len(store.journal_recent(None, limit=1000)) <= 1 + 5 + 100  # pruned every 100 ends
    store.prune()
    history = store.journal_recent(None, limit=1000)
    assert len(history) == 6
    assert [e.id for e in store.journal_open()] == [unfinished]
    assert history[0].started_at == 249.0


def test_the_journal_is_safe_to_use_from_several_threads(store: SQLiteStore) -> None:
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


# --- schema ------------------------------------------------------------------------------


def test_a_database_from_an_older_version_is_migrated_keeping_its_records(db: Path) -> None:
    db.parent.mkdir(parents=True)
    old = sqlite3.connect(db)
    old.executescript(MIGRATIONS[0])
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (1)")
    old.execute(
        "INSERT INTO clones (pool, name, slot, version, state, since) "
        "VALUES ('lab', 'lab-0', 0, 1, 'in_use', 5.0)"
    )
    old.execute("INSERT INTO pools (pool, target_version, failures) VALUES ('lab', 1, 0)")
    old.commit()
    old.close()

    store = SQLiteStore(db)
    record = store.load_pool("lab")
    assert record.clones["lab-0"].state is CloneState.IN_USE
    assert (record.target_version, record.rollout_started_at) == (1, None)
    store.close()
    check = sqlite3.connect(db)
    assert check.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    check.close()


def test_an_upgrade_marks_every_desktop_that_may_have_had_a_user_for_reset(db: Path) -> None:
    db.parent.mkdir(parents=True)
    old = sqlite3.connect(db)
    for script in MIGRATIONS[:3]:
        old.executescript(script)
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (3)")
    for slot, state in enumerate(["in_use", "recycling", "booting", "free", "creating"]):
        old.execute(
            "INSERT INTO clones (pool, name, slot, version, state, since) "
            f"VALUES ('lab', 'lab-{slot}', {slot}, 1, '{state}', 5.0)"
        )
    old.commit()
    old.close()

    store = SQLiteStore(db)
    dirty = {n: r.dirty for n, r in store.load_pool("lab").clones.items()}
    assert dirty == {
        "lab-0": True,
        "lab-1": True,
        "lab-2": True,  # a reset may have been under way: one more reset, never none
        "lab-3": True,  # no session counter baseline yet (migration 8): used while upgrading?
        "lab-4": False,
    }
    store.close()


def test_the_dirty_mark_survives_a_restart_until_a_reset_clears_it(db: Path) -> None:
    store = SQLiteStore(db)
    store.save_clone("lab", clone("lab-0", 0, state=CloneState.BOOTING, dirty=True))
    store.close()
    store = SQLiteStore(db)
    assert store.load_pool("lab").clones["lab-0"].dirty
    store.mark_clean("lab", "lab-0")
    store.mark_clean("lab", "lab-9")  # a clone without a record: nothing to do
    assert not store.load_pool("lab").clones["lab-0"].dirty
    assert set(store.load_pool("lab").clones) == {"lab-0"}
    store.close()


def test_a_database_from_a_newer_version_is_refused(db: Path) -> None:
    SQLiteStore(db).close()
    newer = sqlite3.connect(db)
    newer.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    newer.commit()
    newer.close()
    with pytest.raises(EnvironmentMissingError, match="written by a newer imagepipe") as caught:
        SQLiteStore(db)
    assert f"schema version {SCHEMA_VERSION + 5}" in str(caught.value)
    with pytest.raises(EnvironmentMissingError, match="newer imagepipe"):
        SQLiteStore.open_readonly(db)


def test_a_file_that_is_not_a_database_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(EnvironmentMissingError, match="not an imagepipe state database"):
        SQLiteStore(db)


# --- readers -------------------------------------------------------------------------------


def test_a_reader_sees_an_empty_store_before_the_keeper_ever_ran(db: Path) -> None:
    reader = SQLiteStore.open_readonly(db)
    assert reader.pools() == [] and reader.journal_open() == []
    assert not db.exists()


@pytest.mark.parametrize("made_so_far", ["empty file", "version table, no row yet"])
def test_a_reader_sees_an_empty_store_while_the_keeper_is_creating_it(
    db: Path, made_so_far: str
) -> None:
    """`status` right as the keeper starts for the first time: the file exists, its schema
    does not yet. That is a store that is being made, not an old one to upgrade."""
    db.parent.mkdir(parents=True, exist_ok=True)
    if made_so_far == "empty file":
        db.touch()
    else:
        raw = sqlite3.connect(db)
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.commit()
        raw.close()

    reader = SQLiteStore.open_readonly(db)

    assert reader.pools() == [] and reader.load_pool("lab").clones == {}
    reader.close()
    writer = SQLiteStore(db)  # the keeper then finishes making it
    writer.save_clone("lab", clone())
    writer.close()
    assert set(SQLiteStore.open_readonly(db).load_pool("lab").clones) == {"lab-1"}


def test_a_reader_of_a_real_old_schema_is_told_to_upgrade(db: Path) -> None:
    SQLiteStore(db).close()
    old = sqlite3.connect(db)
    old.execute("UPDATE schema_version SET version = 1")
    old.commit()
    old.close()
    with pytest.raises(EnvironmentMissingError, match="old schema version 1"):
        SQLiteStore.open_readonly(db)


def test_a_reader_cannot_write(db: Path) -> None:
    SQLiteStore(db).close()
    reader = SQLiteStore.open_readonly(db)
    with pytest.raises(ImagepipeError, match="opened read-only"):
        reader.save_clone("lab", clone())


READER = """
import sys, time
from pathlib import Path
from imagepipe.stores.sqlite import SQLiteStore
start = time.monotonic()
store = SQLiteStore.open_readonly(Path(sys.argv[1]))
record = store.load_pool("lab")
print(record.clones["lab-1"].state.value, len(store.journal_open()), time.monotonic() - start)
"""


def test_a_reader_in_another_process_is_not_blocked_by_a_writing_keeper(db: Path) -> None:
    store = SQLiteStore(db)
    store.save_clone("lab", clone())
    store.journal_begin(create(1), now=1.0)
    keeper = sqlite3.connect(db, isolation_level=None)
    keeper.execute("BEGIN IMMEDIATE")  # the keeper is in the middle of a write
    keeper.execute("UPDATE clones SET state = 'in_use'")
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", READER, str(db)], capture_output=True, text=True, timeout=30
        )
        elapsed = time.monotonic() - started
    finally:
        keeper.execute("ROLLBACK")
        keeper.close()
    assert result.returncode == 0, result.stderr
    state, open_actions, read_seconds = result.stdout.split()
    assert (state, open_actions) == ("free", "1")  # the last committed state
    assert float(read_seconds) < 2.0 and elapsed < 20


def test_a_long_read_does_not_block_the_keeper_writing(db: Path) -> None:
    store = SQLiteStore(db)
    store.save_clone("lab", clone())
    status = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, isolation_level=None)
    status.execute("BEGIN")
    assert status.execute("SELECT count(*) FROM clones").fetchone() == (1,)  # holds a snapshot
    try:
        started = time.monotonic()
        store.save_clone("lab", clone("lab-2", 2))
        store.journal_end(store.journal_begin(create(2), now=1.0), ok=True, error=None, now=2.0)
        assert time.monotonic() - started < 1.0
        assert status.execute("SELECT count(*) FROM clones").fetchone() == (1,)
    finally:
        status.execute("COMMIT")
        status.close()
    assert len(SQLiteStore.open_readonly(db).load_pool("lab").clones) == 2
