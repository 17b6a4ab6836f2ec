"""What is SQLite's own in the SQLite store: its schema upgrades, files that are not a state
database, and readers that never block the keeper. What every store does is in
tests/contract/store_suite.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepipe.errors import EnvironmentMissingError, ImagepipeError
from imagepipe.pool.model import (
    CloneState,
)
from imagepipe.stores.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from tests.contract.store_suite import clone, create


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


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


def test_a_database_from_before_rollouts_is_upgraded_with_its_records(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    for script in MIGRATIONS[:4]:
        old.executescript(script)
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (4)")
    old.execute("INSERT INTO pools (pool, target_version, failures) VALUES ('lab', 1, 0)")
    old.commit()
    old.close()

    store = SQLiteStore(db)
    assert store.load_pool("lab").target_version == 1
    assert store.rollouts() == [] and store.heartbeat() is None
    store.close()


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
