"""The PostgreSQL store passes the store contract, on a real server (tests/postgres.py); the
lease runs on the server's clock, so the suite's waits are real ones."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from imagepipe.errors import StoreUnavailableError
from imagepipe.pool.model import PoolDown
from imagepipe.pool.store import HISTORY_LIMIT, Store
from imagepipe.stores import postgres, sqlite
from imagepipe.stores.postgres import PostgresStore
from imagepipe.stores.sql import statements
from tests.contract.store_suite import StoreContract
from tests.postgres import PostgresServer

pytestmark = pytest.mark.real


class ServerClock:
    def now(self) -> float:
        return time.time()  # passed along, and ignored: the server's clock decides

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class PostgresPlace:
    dsn: str
    password: str
    clock: ServerClock = field(default_factory=ServerClock)

    def open(self, *, history_limit: int = HISTORY_LIMIT) -> Store:
        return PostgresStore(self.dsn, password=self.password, history_limit=history_limit)


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def place(self, postgres_server: PostgresServer, postgres_dsn: str) -> PostgresPlace:
        return PostgresPlace(postgres_dsn, postgres_server.password)


# --- what is PostgreSQL's own ---------------------------------------------------------------


def test_both_stores_know_the_same_schema_versions() -> None:
    assert len(postgres.MIGRATIONS) == len(sqlite.MIGRATIONS)


def test_keepers_starting_together_migrate_once(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PostgresStore(postgres_dsn, password=postgres_server.password))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(stores) == 4
    with psycopg.connect(postgres_dsn, password=postgres_server.password) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (postgres.SCHEMA_VERSION,)
        ]
    for store in stores:
        store.close()


def test_an_older_schema_is_migrated_keeping_its_records(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn, password=postgres_server.password, autocommit=True) as c:
        for script in postgres.MIGRATIONS[:7]:
            for statement in statements(script):
                c.execute(statement)
        c.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        c.execute("INSERT INTO schema_version VALUES (7)")
        c.execute(
            "INSERT INTO clones (pool, name, slot, version, state, since) "
            "VALUES ('lab', 'lab-0', 0, 1, 'free', 1.0)"
        )
    store = PostgresStore(postgres_dsn, password=postgres_server.password)
    clone = store.load_pool("lab").clones["lab-0"]
    assert clone.dirty and clone.sessions_seen is None  # migration 8's rule, as in SQLite
    assert store.leader(time.time()) is None
    store.close()


def test_a_database_outage_fails_calls_and_the_same_store_works_again_after(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = PostgresStore(postgres_dsn, password=postgres_server.password, timeout=2)
    store.mark_down("lab", PoolDown(since=1.0, now=False))
    postgres_server.halt()
    try:
        with pytest.raises(StoreUnavailableError, match="state database"):
            store.pool_down("lab")
        with pytest.raises(StoreUnavailableError, match="cannot reach the state database"):
            store.mark_down("hall", PoolDown(since=2.0, now=False))
    finally:
        postgres_server.resume()
    assert store.pool_down("lab") == PoolDown(since=1.0, now=False)
    assert store.pool_down("hall") is None  # the refused write did not happen
    store.close()


def test_a_write_waiting_for_a_lock_gives_up_after_the_timeout_and_writes_nothing(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = PostgresStore(postgres_dsn, password=postgres_server.password, timeout=1)
    epoch = store.try_acquire("keeper", 60.0, time.time())
    assert epoch is not None
    blocker = psycopg.connect(postgres_dsn, password=postgres_server.password)
    try:
        blocker.execute("SELECT * FROM leader FOR UPDATE")  # an election that never ends
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="state database"):
            store.fenced(epoch).mark_down("lab", PoolDown(since=1.0, now=False))
        assert time.monotonic() - started < 3
    finally:
        blocker.rollback()
        blocker.close()
    assert store.pool_down("lab") is None
    store.close()


def test_a_hung_database_server_fails_a_call_within_the_timeout_and_the_store_recovers(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = PostgresStore(postgres_dsn, password=postgres_server.password, timeout=1)
    store.mark_down("lab", PoolDown(since=1.0, now=False))
    with psycopg.connect(postgres_dsn, password=postgres_server.password) as admin:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'imagepipe' "
            "ORDER BY backend_start DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    server = int(row[0])  # the server process serving the store's connection
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            store.pool_down("lab")
        except BaseException as exc:  # what the call ended with, for the assertion below
            outcome.append(exc)
        else:
            outcome.append(None)

    os.kill(server, signal.SIGSTOP)  # hung: its socket stays open, nothing answers
    try:
        caller = threading.Thread(target=call)
        started = time.monotonic()
        caller.start()
        caller.join(timeout=4)
        waited = time.monotonic() - started
    finally:
        os.kill(server, signal.SIGCONT)
    caller.join()
    assert waited < 4, "the call waited for the hung server past its timeout"
    assert isinstance(outcome[0], StoreUnavailableError)
    assert "did not answer within 1s" in str(outcome[0])
    assert store.pool_down("lab") == PoolDown(since=1.0, now=False)  # a new connection
    store.close()
