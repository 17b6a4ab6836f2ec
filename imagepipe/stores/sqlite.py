"""The state store (imagepipe.pool.store.Store) in SQLite, WAL mode: the embedded default,
one file on the keeper's host (settings key state_db).

Readers (`imagepipe status`, through open_readonly) never block the keeper: WAL lets one
writer and any number of readers work at once. Writes are short IMMEDIATE transactions.
"""

from __future__ import annotations

import copy
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from imagepipe.errors import EnvironmentMissingError, OperationFailedError
from imagepipe.log import fields
from imagepipe.pool.store import HISTORY_LIMIT
from imagepipe.stores.sql import BUMP, TABLES, Connection, SQLStore, select_all, statements

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

# Ordered schema migrations: MIGRATIONS[i] takes a database from version i to i + 1.
# Append only; never edit a released entry.
MIGRATIONS: tuple[str, ...] = (
    # 1: clone and pool records, the journal
    """
    CREATE TABLE clones (
        pool TEXT NOT NULL,
        name TEXT NOT NULL,
        slot INTEGER NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        since REAL NOT NULL,
        session_ended_at REAL,
        last_user TEXT,
        failures INTEGER NOT NULL DEFAULT 0,
        retry_at REAL,
        PRIMARY KEY (pool, name)
    );
    CREATE TABLE pools (
        pool TEXT PRIMARY KEY,
        target_version INTEGER,
        failures INTEGER NOT NULL DEFAULT 0,
        breaker_open_until REAL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pool TEXT NOT NULL,
        clone TEXT NOT NULL,
        kind TEXT NOT NULL,
        action TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        ok INTEGER,
        error TEXT
    );
    """,
    # 2: indexes for journal_open and per-pool history
    """
    CREATE INDEX journal_open_idx ON journal (id) WHERE ended_at IS NULL;
    CREATE INDEX journal_pool_idx ON journal (pool, id);
    """,
    # 3: when a rollout began retiring the old version's clones (drain deadline)
    """
    ALTER TABLE pools ADD COLUMN rollout_started_at REAL;
    """,
    # 4: the dirty-until-reset mark. Records written before it existed do not say whether
    # a user was on the clone since its last reset: every state but a clean one counts as
    # dirty (at worst one extra reset), so an upgrade never hands out a used desktop.
    """
    ALTER TABLE clones ADD COLUMN dirty INTEGER NOT NULL DEFAULT 0;
    UPDATE clones SET dirty = 1 WHERE state NOT IN ('creating', 'free', 'suspended', 'deleting');
    """,
    # 5: pools an administrator is taking down (`imagepipe pools down`)
    """
    CREATE TABLE pools_down (
        pool TEXT PRIMARY KEY,
        since REAL NOT NULL,
        now INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 6: login history (learned warm-up): logins per pool, local day (date ordinal) and
    # bucket of the day (`seconds` long). One row per bucket that saw a login: compact.
    """
    CREATE TABLE login_history (
        pool TEXT NOT NULL,
        day INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        seconds REAL NOT NULL,
        logins INTEGER NOT NULL,
        PRIMARY KEY (pool, day, seconds, bucket)
    );
    """,
    # 7: rollouts (`imagepipe rollout`): intent, state and progress, executed by the keeper;
    # the keeper's heartbeat, so the CLI can tell whether a keeper runs
    """
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX rollouts_image_idx ON rollouts (image, id);
    CREATE TABLE keeper_heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at REAL NOT NULL,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        tick REAL NOT NULL
    );
    """,
    # 8: the balancer's session counter each clone's record has accounted for (evidence of a
    # session while no keeper watched). Records written before it have no baseline: a free
    # one may have had a user while the keeper was being upgraded, so it counts as dirty
    # (at worst one reset per free desktop, once), like migration 4.
    """
    ALTER TABLE clones ADD COLUMN sessions_seen INTEGER;
    UPDATE clones SET dirty = 1 WHERE state = 'free';
    """,
    # 9: the leader lease and its fencing token (several keepers on one store)
    """
    CREATE TABLE leader (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        lease_until REAL NOT NULL
    );
    """,
    # 10: several hosts: the host each clone was made on, since when that host is lost (the
    # clone may still exist there), and the hosts an administrator drains (`hosts drain`)
    """
    ALTER TABLE clones ADD COLUMN host TEXT NOT NULL DEFAULT '';
    ALTER TABLE clones ADD COLUMN lost_since REAL;
    CREATE TABLE hosts_draining (
        host TEXT PRIMARY KEY,
        since REAL NOT NULL
    );
    """,
    # 11: a counter every write transaction of what a pass reads adds one to (a shared
    # store's keeper reads those records again only when it has grown)
    """
    CREATE TABLE state_changes (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO state_changes (id, generation) VALUES (1, 0);
    """,
    # 12: the hosts whose circuit breaker the keeper holds open, in its heartbeat (JSON:
    # host -> until), so `imagepipe hosts` can show them
    """
    ALTER TABLE keeper_heartbeat ADD COLUMN host_breakers TEXT NOT NULL DEFAULT '{}';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore(SQLStore):
    """SQLite state store. Thread-safe: one connection, used under a lock."""

    def __init__(
        self,
        path: Path,
        *,
        history_limit: int = HISTORY_LIMIT,
        _readonly: bool = False,
    ) -> None:
        self.path = path
        self.readonly = _readonly
        self.history_limit = history_limit
        self._lock = threading.Lock()
        self._ends = 0
        self._fence: int | None = None
        self._db = self._connect()
        try:
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open_readonly(cls, path: Path) -> SQLiteStore:
        """A reader that never blocks the keeper (for `status`).

        A missing database reads as empty: the keeper has not run yet.
        """
        return cls(path, _readonly=True)

    # --- connection and schema ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                if not self.path.exists():
                    db = _empty_database()
                else:
                    uri = f"{self.path.resolve().as_uri()}?mode=ro"
                    db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                _create_owner_only(self.path)
                db = sqlite3.connect(self.path, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.isolation_level = None  # explicit transactions only
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            return db
        except sqlite3.DatabaseError as exc:
            if not isinstance(exc, sqlite3.OperationalError):
                raise _not_a_database(self.path, exc) from exc
            raise _cannot_open(self.path, exc) from exc
        except (sqlite3.Error, OSError) as exc:
            raise _cannot_open(self.path, exc) from exc

    def _check_schema(self) -> None:
        try:
            current = self._schema_version()
        except sqlite3.DatabaseError as exc:
            raise _not_a_database(self.path, exc) from exc
        if current > SCHEMA_VERSION:
            raise EnvironmentMissingError(
                f"the state database {self.path} has schema version {current}, written by a "
                f"newer imagepipe (this one knows up to {SCHEMA_VERSION}); upgrade imagepipe "
                "or point state_db at another file"
            )
        if current == SCHEMA_VERSION:
            return
        if self.readonly and current == 0 and not _has_table(self._db, "clones"):
            # The keeper is making this database right now (its first start): it reads as
            # empty, as a missing one does, not as an old schema to upgrade.
            self._db.close()
            self._db = _empty_database()
            return
        if self.readonly:
            raise EnvironmentMissingError(
                f"the state database {self.path} has the old schema version {current}; "
                "start `imagepipe keep` once to upgrade it"
            )
        with self._write(changes=False) as db:  # no state_changes table before it is made
            current = self._schema_version()  # another process may have migrated meanwhile
            for version in range(current, SCHEMA_VERSION):
                for statement in statements(MIGRATIONS[version]):
                    db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        if current < SCHEMA_VERSION:
            log.info(
                "state database migrated",
                extra=fields(path=str(self.path), old=current, new=SCHEMA_VERSION),
            )

    def _schema_version(self) -> int:
        version = _stored_version(self._db)
        if version is None:
            if not self.readonly:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
            return 0
        return version

    @property
    def location(self) -> str:
        return str(self.path)

    def fenced(self, epoch: int) -> SQLiteStore:
        """A handle whose writes check the leader epoch in their transaction (see
        imagepipe.pool.store.Store.fenced); it shares this one's connection and lock."""
        handle = copy.copy(self)
        handle._fence = epoch
        return handle

    def _statement(self) -> AbstractContextManager[sqlite3.Connection]:
        # as durable as every commit here (synchronous=NORMAL: a power cut may lose the last
        # commits, never half of one)
        return self._write(fenced=False, changes=False)

    @contextmanager
    def _write(self, *, fenced: bool = True, changes: bool = True) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise OperationFailedError(f"the state database {self.path} was opened read-only")
        with self._lock, self._sqlite_errors():
            db = self._db
            db.execute("BEGIN IMMEDIATE")  # the write lock: the check and the writes are one
            try:
                if changes:
                    db.execute(BUMP)
                if fenced:
                    self._check_fence(db)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock, self._sqlite_errors():
            db = self._db
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def export(self, *, wait: float) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (`store copy`), read while holding the write lock, so no
        keeper writes meanwhile. OperationFailedError when another process holds the lock
        for longer than `wait` seconds (a keeper is running on this file)."""
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
        try:
            with self._write(fenced=False, changes=False) as db:
                return {table: select_all(db, table) for table in TABLES}
        finally:
            with self._lock:
                self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _clock(self, db: Connection, now: float) -> float:
        return now  # one host: the keeper's clock (injected, so tests use fake ones)

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise OperationFailedError(f"state database {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _cannot_open(path: Path, exc: Exception) -> EnvironmentMissingError:
    return EnvironmentMissingError(
        f"cannot open the state database {path}: {exc}; check that its folder exists and is "
        "writable (settings key state_db)"
    )


def read_schema_version(path: Path) -> int:
    """The schema version of an existing state database, without writing or creating any
    file (for `imagepipe doctor`); 0 for a database from before versioning.

    A read-only SQLite reader of a WAL database creates its -wal and -shm files when they are
    missing; a cleanly closed database has everything in the main file, so it is read as
    immutable then. EnvironmentMissingError when the file is not a state database."""
    keeper_has_it_open = Path(f"{path}-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if keeper_has_it_open else "&immutable=1")
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            return _stored_version(db) or 0
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise _not_a_database(path, exc) from exc


def _create_owner_only(path: Path) -> None:
    """A new database file is 0600 in a 0700 folder whatever the umask: it holds who used
    which desktop when. SQLite gives its -wal and -shm files the database file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


def _empty_database() -> sqlite3.Connection:
    """An in-memory database of the current schema: what a reader sees before the keeper
    has made the real one."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(
        "".join(MIGRATIONS)
        + "CREATE TABLE schema_version (version INTEGER NOT NULL);"
        + f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION});"
    )
    db.isolation_level = None  # explicit transactions only, as for the real database
    return db


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)
    ).fetchone()
    return found is not None


def _stored_version(db: sqlite3.Connection) -> int | None:
    """The schema version recorded in `db`; None when it has no version table."""
    has_table = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if has_table is None:
        return None
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _not_a_database(path: Path, exc: Exception) -> EnvironmentMissingError:
    return EnvironmentMissingError(
        f"{path} is not an imagepipe state database ({exc}); point the settings key state_db "
        "at another file"
    )
