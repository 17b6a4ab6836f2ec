"""The SQLite store passes the store contract (lease on a fake clock: its caller's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagepipe.pool.store import HISTORY_LIMIT, Store
from imagepipe.stores.sqlite import SQLiteStore
from tests.contract.store_suite import StoreContract


@dataclass
class FakeLeaseClock:
    at: float = 1_000.0

    def now(self) -> float:
        return self.at

    def wait(self, seconds: float) -> None:
        self.at += seconds


@dataclass
class SQLitePlace:
    path: Path
    clock: FakeLeaseClock = field(default_factory=FakeLeaseClock)

    def open(self, *, history_limit: int = HISTORY_LIMIT) -> Store:
        return SQLiteStore(self.path, history_limit=history_limit)


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def place(self, tmp_path: Path) -> SQLitePlace:
        return SQLitePlace(tmp_path / "state" / "state.db")
