"""The state store: what the hypervisor cannot tell, in SQLite (WAL mode).

Holds clone records (state and timers), pool records (rollout target, failures, breaker)
and a journal of actions: begun before an action starts, ended when it ends, so a crash
leaves the unfinished ones in journal_open(). The store decides nothing; it persists.

Readers (`imagepipe status`, through open_readonly) never block the keeper: WAL lets one
writer and any number of readers work at once. Writes are short IMMEDIATE transactions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from imagepipe.errors import EnvironmentMissingError, OperationFailedError
from imagepipe.log import fields
from imagepipe.pool.codec import CodecError, action_from_json, action_to_json
from imagepipe.pool.model import (
    Action,
    CloneRecord,
    CloneState,
    ForgetClone,
    LoginHistory,
    PoolDown,
    PoolRecord,
    RecordClone,
    RecordPool,
)
from imagepipe.pool.rollout.records import (
    Heartbeat,
    Rollout,
    RolloutState,
    rollout_from_json,
    rollout_to_json,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
HISTORY_LIMIT = 10_000  # finished journal rows kept for `status` / history
_PRUNE_EVERY = 100  # journal_end calls between two prunes

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
)
SCHEMA_VERSION = len(MIGRATIONS)


class _Unchanged(Enum):
    """save_pool(rollout_started_at=UNCHANGED): keep what the store has."""

    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED


@dataclass(frozen=True)
class JournalEntry:
    """An action that was begun and not (yet) ended."""

    id: int
    action: Action
    started_at: float


@dataclass(frozen=True)
class JournalRecord:
    """One journal row, finished or not, for status and history."""

    id: int
    pool: str
    clone: str
    kind: str
    action: Action | None  # None when written by a newer imagepipe and unreadable here
    started_at: float
    ended_at: float | None
    ok: bool | None
    error: str | None


class Store:
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
        self._db = self._connect()
        try:
            self._check_schema()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
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
        with self._write() as db:
            current = self._schema_version()  # another process may have migrated meanwhile
            for version in range(current, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[version]):
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

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise OperationFailedError(f"the state database {self.path} was opened read-only")
        with self._lock, self._sqlite_errors():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._sqlite_errors():
            db = self._db
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise OperationFailedError(f"state database {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- records ------------------------------------------------------------------------

    def load_pool(self, pool: str) -> PoolRecord:
        """The pool's record with its clones; an empty record if the pool is unknown."""
        with self._read() as db:
            row = db.execute(
                "SELECT target_version, failures, breaker_open_until, rollout_started_at "
                "FROM pools WHERE pool = ?",
                (pool,),
            ).fetchone()
            clones = db.execute(
                "SELECT name, slot, version, state, since, session_ended_at, last_user, "
                "failures, retry_at, dirty, sessions_seen FROM clones WHERE pool = ? "
                "ORDER BY slot, name",
                (pool,),
            ).fetchall()
        records = {
            name: CloneRecord(
                name=name,
                slot=slot,
                version=version,
                state=CloneState(state),
                since=since,
                session_ended_at=ended,
                last_user=user,
                failures=failures,
                retry_at=retry_at,
                dirty=bool(dirty),
                sessions_seen=seen,
            )
            for (
                name,
                slot,
                version,
                state,
                since,
                ended,
                user,
                failures,
                retry_at,
                dirty,
                seen,
            ) in clones
        }
        if row is None:
            return PoolRecord(pool=pool, clones=records)
        return PoolRecord(
            pool=pool,
            clones=records,
            target_version=row[0],
            failures=row[1],
            breaker_open_until=row[2],
            rollout_started_at=row[3],
        )

    def pools(self) -> list[str]:
        """Every pool the store has a record or a clone of."""
        with self._read() as db:
            rows = db.execute("SELECT pool FROM pools UNION SELECT pool FROM clones").fetchall()
        return sorted(row[0] for row in rows)

    def apply(self, pool: str, actions: Sequence[Action]) -> None:
        """Write the record actions (RecordClone, ForgetClone, RecordPool) in one
        transaction; other actions are not the store's business and are skipped."""
        for action in actions:
            if isinstance(action, RecordClone | ForgetClone | RecordPool) and action.pool != pool:
                raise ValueError(f"{action.kind} for pool {action.pool!r} applied to {pool!r}")
        with self._write() as db:
            for action in actions:
                if isinstance(action, RecordClone):
                    _upsert_clone(db, pool, action.record)
                elif isinstance(action, ForgetClone):
                    _delete_clone(db, pool, action.clone)
                elif isinstance(action, RecordPool):
                    _upsert_pool(
                        db,
                        pool,
                        action.target_version,
                        action.failures,
                        action.breaker_open_until,
                        action.rollout_started_at,
                    )

    def save_clone(self, pool: str, record: CloneRecord) -> None:
        with self._write() as db:
            _upsert_clone(db, pool, record)

    def mark_clean(self, pool: str, name: str) -> None:
        """A reset of the clone has completed: nothing of a previous user is left on it."""
        with self._write() as db:
            db.execute("UPDATE clones SET dirty = 0 WHERE pool = ? AND name = ?", (pool, name))

    def forget_clone(self, pool: str, name: str) -> None:
        with self._write() as db:
            _delete_clone(db, pool, name)

    def save_pool(
        self,
        pool: str,
        *,
        target_version: int | None,
        failures: int,
        breaker_open_until: float | None,
        rollout_started_at: float | _Unchanged | None = UNCHANGED,
    ) -> None:
        """Write the pool's record; rollout_started_at is kept unless given."""
        with self._write() as db:
            _upsert_pool(db, pool, target_version, failures, breaker_open_until, rollout_started_at)

    # --- login history (learned warm-up) ---------------------------------------------------

    def record_logins(
        self, pool: str, day: int, bucket: int, logins: int, *, seconds: float, keep_days: int
    ) -> None:
        """Add `logins` arrivals to the pool's `bucket` (of `seconds`) of local `day`, and
        forget the pool's days older than `keep_days` before it."""
        with self._write() as db:
            db.execute(
                "INSERT INTO login_history (pool, day, bucket, seconds, logins) "
                "VALUES (?,?,?,?,?) ON CONFLICT (pool, day, seconds, bucket) "
                "DO UPDATE SET logins = logins + excluded.logins",
                (pool, day, bucket, seconds, logins),
            )
            db.execute(
                "DELETE FROM login_history WHERE pool = ? AND day < ?", (pool, day - keep_days)
            )

    def login_history(self, pool: str, *, seconds: float, since_day: int) -> LoginHistory:
        """The pool's recorded logins per day (from `since_day` on) and bucket of `seconds`."""
        with self._read() as db:
            rows = db.execute(
                "SELECT day, bucket, logins FROM login_history "
                "WHERE pool = ? AND seconds = ? AND day >= ?",
                (pool, seconds, since_day),
            ).fetchall()
        days: dict[int, dict[int, int]] = {}
        for day, bucket, logins in rows:
            days.setdefault(day, {})[bucket] = logins
        return LoginHistory(bucket=seconds, days=days)

    # --- pools being taken down ---------------------------------------------------------

    def mark_down(self, pool: str, down: PoolDown) -> None:
        """Remember that the pool is to be taken down; a second call can only add `now`."""
        with self._write() as db:
            db.execute(
                "INSERT INTO pools_down (pool, since, now) VALUES (?,?,?) ON CONFLICT (pool) "
                "DO UPDATE SET now = max(now, excluded.now)",
                (pool, down.since, int(down.now)),
            )

    def pool_down(self, pool: str) -> PoolDown | None:
        """The pool's take-down request, or None when the pool is to be kept."""
        with self._read() as db:
            row = db.execute("SELECT since, now FROM pools_down WHERE pool = ?", (pool,)).fetchone()
        return None if row is None else PoolDown(since=row[0], now=bool(row[1]))

    def clear_down(self, pool: str) -> bool:
        """Keep the pool again; True when it had been marked down."""
        with self._write() as db:
            return db.execute("DELETE FROM pools_down WHERE pool = ?", (pool,)).rowcount > 0

    # --- journal ------------------------------------------------------------------------

    def journal_begin(self, action: Action, now: float) -> int:
        """Record that `action` is about to start; returns the entry id for journal_end."""
        text = action_to_json(action)
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO journal (pool, clone, kind, action, started_at) VALUES (?,?,?,?,?)",
                (action.pool, action.clone, action.kind, text, now),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def journal_end(self, entry_id: int, *, ok: bool, error: str | None, now: float) -> None:
        """Record how the action ended. Every so often, prune old finished entries."""
        with self._write() as db:
            db.execute(
                "UPDATE journal SET ended_at = ?, ok = ?, error = ? WHERE id = ?",
                (now, int(ok), error, entry_id),
            )
            self._ends += 1
            if self._ends % _PRUNE_EVERY == 0:
                self._prune(db)

    def prune(self) -> int:
        """Drop finished journal entries beyond history_limit; returns how many."""
        with self._write() as db:
            return self._prune(db)

    def _prune(self, db: sqlite3.Connection) -> int:
        cursor = db.execute(
            "DELETE FROM journal WHERE ended_at IS NOT NULL AND id <= ("
            " SELECT id FROM journal WHERE ended_at IS NOT NULL"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.history_limit,),
        )
        return cursor.rowcount

    def journal_open(self) -> list[JournalEntry]:
        """Actions begun and never ended (the keeper crashed or was killed), oldest first.

        Entries this version cannot read are logged and left out.
        """
        with self._read() as db:
            rows = db.execute(
                "SELECT id, action, started_at FROM journal WHERE ended_at IS NULL ORDER BY id"
            ).fetchall()
        entries = []
        for entry_id, text, started_at in rows:
            try:
                entries.append(JournalEntry(entry_id, action_from_json(text), started_at))
            except CodecError as exc:
                log.warning(
                    "unreadable journal entry skipped", extra=fields(id=entry_id, error=exc)
                )
        return entries

    # --- rollouts and the keeper's heartbeat ------------------------------------------

    def add_rollout(self, rollout: Rollout) -> Rollout:
        """Write a new rollout; returns it with its id."""
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO rollouts (image, body, state, created_at) VALUES (?,?,?,?)",
                (rollout.image, "{}", rollout.state.value, rollout.created_at),
            )
            assert cursor.lastrowid is not None
            saved = replace(rollout, id=cursor.lastrowid)
            db.execute(
                "UPDATE rollouts SET body = ? WHERE id = ?", (rollout_to_json(saved), saved.id)
            )
        return saved

    def save_rollout(self, rollout: Rollout) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE rollouts SET body = ?, state = ? WHERE id = ?",
                (rollout_to_json(rollout), rollout.state.value, rollout.id),
            )

    def update_rollout(
        self, rollout_id: int, change: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        """Read, change and write one rollout in one transaction (the keeper and the CLI
        both change rollouts: neither loses the other's change). Returns (before, after)."""
        with self._write() as db:
            row = db.execute("SELECT body FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                return None
            before = rollout_from_json(row[0])
            after = change(before)
            if after != before:
                db.execute(
                    "UPDATE rollouts SET body = ?, state = ? WHERE id = ?",
                    (rollout_to_json(after), after.state.value, rollout_id),
                )
        return before, after

    def rollout(self, rollout_id: int) -> Rollout | None:
        with self._read() as db:
            row = db.execute("SELECT body FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return None if row is None else rollout_from_json(row[0])

    def rollouts(
        self, image: str | None = None, *, active: bool = False, limit: int = 1000
    ) -> list[Rollout]:
        """Rollouts, newest first (of one image; only the active ones)."""
        query, args = "SELECT body FROM rollouts", []
        where = []
        if image is not None:
            where.append("image = ?")
            args.append(image)
        if active:
            states = [s.value for s in RolloutState if s.active]
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [rollout_from_json(row[0]) for row in rows]

    def beat(self, heartbeat: Heartbeat) -> None:
        """The keeper is alive: written at the start of every pass."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO keeper_heartbeat (id, at, pid, host, tick) "
                "VALUES (1,?,?,?,?)",
                (heartbeat.at, heartbeat.pid, heartbeat.host, heartbeat.tick),
            )

    def heartbeat(self) -> Heartbeat | None:
        with self._read() as db:
            row = db.execute("SELECT at, pid, host, tick FROM keeper_heartbeat").fetchone()
        return None if row is None else Heartbeat(at=row[0], pid=row[1], host=row[2], tick=row[3])

    def journal_recent(self, pool: str | None, limit: int) -> list[JournalRecord]:
        """The newest `limit` journal entries (of one pool, or all), newest first."""
        query = "SELECT id, pool, clone, kind, action, started_at, ended_at, ok, error FROM journal"
        args: tuple[object, ...] = (limit,)
        if pool is not None:
            query += " WHERE pool = ?"
            args = (pool, limit)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", args).fetchall()
        return [
            JournalRecord(
                id=entry_id,
                pool=row_pool,
                clone=clone,
                kind=kind,
                action=_try_decode(text),
                started_at=started,
                ended_at=ended,
                ok=None if ok is None else bool(ok),
                error=error,
            )
            for entry_id, row_pool, clone, kind, text, started, ended, ok, error in rows
        ]


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


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _try_decode(text: str) -> Action | None:
    try:
        return action_from_json(text)
    except CodecError:
        return None


def _upsert_clone(db: sqlite3.Connection, pool: str, record: CloneRecord) -> None:
    db.execute(
        "INSERT OR REPLACE INTO clones (pool, name, slot, version, state, since, "
        "session_ended_at, last_user, failures, retry_at, dirty, sessions_seen) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            pool,
            record.name,
            record.slot,
            record.version,
            record.state.value,
            record.since,
            record.session_ended_at,
            record.last_user,
            record.failures,
            record.retry_at,
            int(record.dirty),
            record.sessions_seen,
        ),
    )


def _delete_clone(db: sqlite3.Connection, pool: str, name: str) -> None:
    db.execute("DELETE FROM clones WHERE pool = ? AND name = ?", (pool, name))


def _upsert_pool(
    db: sqlite3.Connection,
    pool: str,
    target_version: int | None,
    failures: int,
    breaker_open_until: float | None,
    rollout_started_at: float | _Unchanged | None,
) -> None:
    db.execute(
        "INSERT INTO pools (pool, target_version, failures, breaker_open_until) VALUES (?,?,?,?) "
        "ON CONFLICT (pool) DO UPDATE SET target_version = excluded.target_version, "
        "failures = excluded.failures, breaker_open_until = excluded.breaker_open_until",
        (pool, target_version, failures, breaker_open_until),
    )
    if not isinstance(rollout_started_at, _Unchanged):
        db.execute(
            "UPDATE pools SET rollout_started_at = ? WHERE pool = ?", (rollout_started_at, pool)
        )
