"""The PostgreSQL store passes the store contract, on a real server (tests/postgres.py); the
lease runs on the server's clock, so the suite's waits are real ones."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from imagepipe.pool.store import HISTORY_LIMIT, Store
from imagepipe.stores.postgres import PostgresStore
from tests.contract.store_suite import StoreContract
from tests.postgres import PostgresServer


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
