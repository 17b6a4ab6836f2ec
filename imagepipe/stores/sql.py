"""What the SQLite and the PostgreSQL stores share: every record operation of the store port,
in SQL both databases speak (qmark placeholders; `ON CONFLICT ... DO UPDATE`; `RETURNING`).

A subclass supplies the connection and its transactions (`_write`, `_read`), the leader-row
locks of its database and its lease clock. Records are the same in both: times are seconds
since the epoch (REAL / double precision), flags 0/1 integers, actions and rollouts JSON text.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from imagepipe.errors import FencedError
from imagepipe.log import fields
from imagepipe.pool.model import CloneRecord, CloneState, LoginHistory, PoolDown, PoolRecord
from imagepipe.pool.rollout.records import (
    Heartbeat,
    Rollout,
    RolloutState,
    breakers_from_json,
    breakers_to_json,
    rollout_from_json,
    rollout_to_json,
)
from imagepipe.pool.store import (
    HISTORY_LIMIT,
    UNCHANGED,
    JournalEntry,
    JournalRecord,
    Lease,
    PassState,
    Unchanged,
)
from imagepipe.record import replace

# The actions are loaded by the methods that apply or journal them (the keeper's), not with
# the store: reading pools and records (`imagepipe status`) does not build their classes.
if TYPE_CHECKING:
    from imagepipe.pool.actions import Action

log = logging.getLogger(__name__)

PRUNE_EVERY = 100  # journal_end calls between two prunes
ACTIVE = tuple(s.value for s in RolloutState if s.active)
# The first statement of a write transaction that changes what begin_pass reads: always
# first, so concurrent writers queue on this one row before taking any other lock
BUMP = "UPDATE state_changes SET generation = generation + 1"
# a clone's columns, in the order _clone reads them
CLONE_COLUMNS = (
    "name, slot, version, state, since, session_ended_at, last_user, failures, retry_at, "
    "dirty, sessions_seen, host, lost_since"
)

# The tables and their columns, in the order `store copy` reads and writes them.
TABLES: dict[str, tuple[str, ...]] = {
    "clones": (
        "pool",
        "name",
        "slot",
        "version",
        "state",
        "since",
        "session_ended_at",
        "last_user",
        "failures",
        "retry_at",
        "dirty",
        "sessions_seen",
        "host",
        "lost_since",
    ),
    "pools": ("pool", "target_version", "failures", "breaker_open_until", "rollout_started_at"),
    "journal": ("id", "pool", "clone", "kind", "action", "started_at", "ended_at", "ok", "error"),
    "pools_down": ("pool", "since", "now"),
    "login_history": ("pool", "day", "bucket", "seconds", "logins"),
    "rollouts": ("id", "image", "body", "state", "created_at"),
    "keeper_heartbeat": ("id", "at", "pid", "host", "tick", "host_breakers"),
    "leader": ("id", "holder", "epoch", "lease_until"),
    "hosts_draining": ("host", "since"),
}


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What both sqlite3.Connection and the PostgreSQL store's connection offer."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...


class SQLStore(ABC):
    """The store port's operations over one SQL connection (see the module docstring)."""

    history_limit: int = HISTORY_LIMIT
    _fence: int | None = None
    _ends: int = 0
    LOCK_SHARE = ""  # how a transaction locks the leader row against changes till it ends
    LOCK_UPDATE = ""  # and for changing it

    # --- what a subclass provides ------------------------------------------------------

    @abstractmethod
    def _write(
        self, *, fenced: bool = True, changes: bool = True
    ) -> AbstractContextManager[Connection]:
        """A write transaction; with `fenced` and a fence set, check the epoch first. With
        `changes` (whatever may change what begin_pass reads: clone and pool records, take-
        downs, rollouts, drained hosts) it first adds one to the state_changes generation
        (BUMP), so a reader that kept what it read at an older generation reads again. The
        journal, login history, heartbeat and lease are not read by begin_pass: their
        writes leave it alone (a lease renewed every few seconds would make every pass a
        full read)."""

    @abstractmethod
    def _statement(self) -> AbstractContextManager[Connection]:
        """For one write statement that may be lost if the database server crashes right
        after it (never half-applied): only what the next pass writes again anyway. Not
        fenced: the statement checks the fence itself."""

    @abstractmethod
    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[Connection]:
        """A read. Each statement sees one consistent state; with `snapshot`, all of them
        see the same one."""

    @abstractmethod
    def _clock(self, db: Connection, now: float) -> float:
        """The lease clock inside a transaction (the caller's `now`, or the database's)."""

    def _check_fence(self, db: Connection) -> None:
        """Inside a write transaction: FencedError unless the leader epoch is the fence."""
        if self._fence is None:
            return
        row = db.execute("SELECT epoch, holder FROM leader" + self.LOCK_SHARE).fetchone()
        if row is None or row[0] != self._fence:
            raise self._refused(row)

    # --- records ------------------------------------------------------------------------

    def load_pool(self, pool: str) -> PoolRecord:
        # One statement (so one snapshot, also where a read is not a transaction): the
        # pool's row, or NULLs, joined with each of its clones, or one row of NULLs.
        with self._read() as db:
            rows = db.execute(
                "SELECT p.failures, p.target_version, p.breaker_open_until, "
                "p.rollout_started_at, "
                + ", ".join(f"c.{c}" for c in CLONE_COLUMNS.split(", "))
                + " FROM (SELECT CAST(? AS TEXT) AS pool) AS k "
                "LEFT JOIN pools AS p ON p.pool = k.pool "
                "LEFT JOIN clones AS c ON c.pool = k.pool ORDER BY c.slot, c.name",
                (pool,),
            ).fetchall()
        clones = {r[4]: _clone(r[4:]) for r in rows if r[4] is not None}
        failures, target, breaker, rollout_started = rows[0][:4]
        if failures is None:  # no pool row (failures is NOT NULL)
            return PoolRecord(pool=pool, clones=clones)
        return PoolRecord(
            pool=pool,
            clones=clones,
            target_version=target,
            failures=failures,
            breaker_open_until=breaker,
            rollout_started_at=rollout_started,
        )

    def pools(self) -> list[str]:
        with self._read() as db:
            rows = db.execute("SELECT pool FROM pools UNION SELECT pool FROM clones").fetchall()
        return sorted(row[0] for row in rows)

    def apply(self, pool: str, actions: Sequence[Action]) -> None:
        from imagepipe.pool.actions import ForgetClone, RecordClone, RecordPool

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
        rollout_started_at: float | Unchanged | None = UNCHANGED,
    ) -> None:
        with self._write() as db:
            _upsert_pool(db, pool, target_version, failures, breaker_open_until, rollout_started_at)

    # --- login history ------------------------------------------------------------------

    def record_logins(
        self, pool: str, day: int, bucket: int, logins: int, *, seconds: float, keep_days: int
    ) -> None:
        with self._write(changes=False) as db:
            db.execute(
                "INSERT INTO login_history (pool, day, bucket, seconds, logins) "
                "VALUES (?,?,?,?,?) ON CONFLICT (pool, day, seconds, bucket) "
                "DO UPDATE SET logins = login_history.logins + excluded.logins",
                (pool, day, bucket, seconds, logins),
            )
            db.execute(
                "DELETE FROM login_history WHERE pool = ? AND day < ?", (pool, day - keep_days)
            )

    def login_history(self, pool: str, *, seconds: float, since_day: int) -> LoginHistory:
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
        with self._write() as db:
            db.execute(
                "INSERT INTO pools_down (pool, since, now) VALUES (?,?,?) ON CONFLICT (pool) "
                "DO UPDATE SET now = CASE WHEN excluded.now > pools_down.now "
                "THEN excluded.now ELSE pools_down.now END",
                (pool, down.since, int(down.now)),
            )

    def pool_down(self, pool: str) -> PoolDown | None:
        with self._read() as db:
            row = db.execute("SELECT since, now FROM pools_down WHERE pool = ?", (pool,)).fetchone()
        return None if row is None else PoolDown(since=row[0], now=bool(row[1]))

    def clear_down(self, pool: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM pools_down WHERE pool = ?", (pool,)).rowcount > 0

    # --- hosts being drained ------------------------------------------------------------

    def set_host_draining(self, host: str, since: float | None) -> bool:
        with self._write() as db:
            if since is None:
                return db.execute("DELETE FROM hosts_draining WHERE host = ?", (host,)).rowcount > 0
            return (
                db.execute(
                    "INSERT INTO hosts_draining (host, since) VALUES (?,?) "
                    "ON CONFLICT (host) DO NOTHING",
                    (host, since),
                ).rowcount
                > 0
            )

    def draining_hosts(self) -> dict[str, float]:
        with self._read() as db:
            rows = db.execute("SELECT host, since FROM hosts_draining ORDER BY host").fetchall()
        return {host: since for host, since in rows}

    # --- journal ------------------------------------------------------------------------

    def journal_begin(self, action: Action, now: float) -> int:
        from imagepipe.pool.codec import action_to_json

        text = action_to_json(action)
        with self._write(changes=False) as db:
            row = db.execute(
                "INSERT INTO journal (pool, clone, kind, action, started_at) VALUES (?,?,?,?,?) "
                "RETURNING id",
                (action.pool, action.clone, action.kind, text, now),
            ).fetchone()
        return int(row[0])

    def journal_end(self, entry_id: int, *, ok: bool, error: str | None, now: float) -> None:
        with self._write(changes=False) as db:
            db.execute(
                "UPDATE journal SET ended_at = ?, ok = ?, error = ? WHERE id = ?",
                (now, int(ok), error, entry_id),
            )
            self._ends += 1
            if self._ends % PRUNE_EVERY == 0:
                self._prune(db)

    def prune(self) -> int:
        with self._write(changes=False) as db:
            return self._prune(db)

    def _prune(self, db: Connection) -> int:
        cursor = db.execute(
            "DELETE FROM journal WHERE ended_at IS NOT NULL AND id <= ("
            " SELECT id FROM journal WHERE ended_at IS NOT NULL"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.history_limit,),
        )
        return cursor.rowcount

    def journal_open(self) -> list[JournalEntry]:
        from imagepipe.pool.codec import CodecError, action_from_json

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

    def journal_recent(self, pool: str | None, limit: int) -> list[JournalRecord]:
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

    # --- rollouts and the keeper's heartbeat ------------------------------------------

    def add_rollout(self, rollout: Rollout) -> Rollout:
        with self._write() as db:
            row = db.execute(
                "INSERT INTO rollouts (image, body, state, created_at) VALUES (?,?,?,?) "
                "RETURNING id",
                (rollout.image, "{}", rollout.state.value, rollout.created_at),
            ).fetchone()
            saved = replace(rollout, id=int(row[0]))
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
        with self._write() as db:
            row = db.execute(
                "SELECT body FROM rollouts WHERE id = ?" + self.LOCK_UPDATE, (rollout_id,)
            ).fetchone()
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
        query, args = "SELECT body FROM rollouts", list[object]()
        where = []
        if image is not None:
            where.append("image = ?")
            args.append(image)
        if active:
            where.append(f"state IN ({','.join('?' * len(ACTIVE))})")
            args += ACTIVE
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [rollout_from_json(row[0]) for row in rows]

    def beat(self, heartbeat: Heartbeat) -> None:
        # One statement, the fence checked in it: the heartbeat is written at every pass
        with self._statement() as db:
            if self._beat(db, heartbeat).rowcount == 1 or self._fence is None:
                return
            row = db.execute("SELECT epoch, holder FROM leader").fetchone()
        raise self._refused(row)

    def _beat(self, db: Connection, heartbeat: Heartbeat) -> Cursor:
        """Write the heartbeat in one statement that checks the fence itself: its rowcount
        is 0 when a fenced handle's epoch is not the leader's (nothing written)."""
        values = (
            heartbeat.at,
            heartbeat.pid,
            heartbeat.host,
            heartbeat.tick,
            breakers_to_json(heartbeat.host_breakers),
        )
        update = (
            "ON CONFLICT (id) DO UPDATE SET at = excluded.at, pid = excluded.pid, "
            "host = excluded.host, tick = excluded.tick, host_breakers = excluded.host_breakers"
        )
        columns = "INSERT INTO keeper_heartbeat (id, at, pid, host, tick, host_breakers) "
        if self._fence is None:
            return db.execute(columns + "VALUES (1,?,?,?,?,?) " + update, values)
        return db.execute(
            columns + "SELECT 1, ?, ?, ?, ?, ? "
            f"WHERE (SELECT epoch FROM leader{self.LOCK_SHARE}) = ? " + update,
            (*values, self._fence),
        )

    def _refused(self, leader_row: Any) -> FencedError:
        """The error for a write refused by the fence, naming who leads now."""
        assert self._fence is not None
        if leader_row is None:
            return FencedError(self._fence, None, None)
        return FencedError(self._fence, int(leader_row[0]), str(leader_row[1]))

    def begin_pass(self, heartbeat: Heartbeat, pools: Sequence[str]) -> PassState:
        names = list(pools)
        among = f"IN ({','.join('?' * len(names))})" if names else "IN (NULL)"
        with self._write(fenced=False, changes=False) as db:
            if self._beat(db, heartbeat).rowcount != 1 and self._fence is not None:
                raise self._refused(db.execute("SELECT epoch, holder FROM leader").fetchone())
            pool_rows = db.execute(
                "SELECT pool, failures, target_version, breaker_open_until, rollout_started_at "
                f"FROM pools WHERE pool {among}",
                names,
            ).fetchall()
            clone_rows = db.execute(
                f"SELECT pool, {CLONE_COLUMNS} FROM clones WHERE pool {among} "
                "ORDER BY pool, slot, name",
                names,
            ).fetchall()
            down_rows = db.execute(
                f"SELECT pool, since, now FROM pools_down WHERE pool {among}", names
            ).fetchall()
            bodies = db.execute(
                f"SELECT body FROM rollouts WHERE state IN ({','.join('?' * len(ACTIVE))}) "
                "ORDER BY id DESC",
                ACTIVE,
            ).fetchall()
            draining = db.execute("SELECT host, since FROM hosts_draining ORDER BY host").fetchall()
        return pass_state(names, pool_rows, clone_rows, down_rows, [b[0] for b in bodies], draining)

    def heartbeat(self) -> Heartbeat | None:
        with self._read() as db:
            row = db.execute(
                "SELECT at, pid, host, tick, host_breakers FROM keeper_heartbeat"
            ).fetchone()
        if row is None:
            return None
        breakers = breakers_from_json(row[4])
        return Heartbeat(at=row[0], pid=row[1], host=row[2], tick=row[3], host_breakers=breakers)

    # --- the leader lease ----------------------------------------------------------------

    def try_acquire(self, holder: str, ttl: float, now: float) -> int | None:
        with self._write(fenced=False, changes=False) as db:
            now = self._clock(db, now)
            row = db.execute(
                "SELECT holder, epoch, lease_until FROM leader" + self.LOCK_UPDATE
            ).fetchone()
            if row is None:
                inserted = db.execute(
                    "INSERT INTO leader (id, holder, epoch, lease_until) VALUES (1, ?, 1, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (holder, now + ttl),
                )
                return 1 if inserted.rowcount == 1 else None  # another won the same race
            current, epoch, until = row
            if current == holder and until > now:
                db.execute("UPDATE leader SET lease_until = ?", (now + ttl,))
                return int(epoch)
            if until > now:
                return None
            db.execute(
                "UPDATE leader SET holder = ?, epoch = ?, lease_until = ?",
                (holder, epoch + 1, now + ttl),
            )
            return int(epoch) + 1

    def renew(self, holder: str, epoch: int, ttl: float, now: float) -> bool:
        with self._write(fenced=False, changes=False) as db:
            now = self._clock(db, now)
            cursor = db.execute(
                "UPDATE leader SET lease_until = ? "
                "WHERE holder = ? AND epoch = ? AND lease_until > ?",
                (now + ttl, holder, epoch, now),
            )
            return cursor.rowcount == 1

    def release(self, holder: str, epoch: int, now: float) -> None:
        with self._write(fenced=False, changes=False) as db:
            now = self._clock(db, now)
            db.execute(
                "UPDATE leader SET lease_until = ? "
                "WHERE holder = ? AND epoch = ? AND lease_until > ?",
                (now, holder, epoch, now),
            )

    def leader(self, now: float) -> Lease | None:
        with self._read() as db:
            now = self._clock(db, now)
            row = db.execute("SELECT holder, epoch, lease_until FROM leader").fetchone()
        if row is None:
            return None
        return Lease(holder=row[0], epoch=int(row[1]), until=float(row[2]), now=now)

    # --- whole tables (imagepipe store copy) -------------------------------------------

    def table_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of TABLES, read in one transaction, in key order."""
        with self._read(snapshot=True) as db:
            return {table: select_all(db, table) for table in TABLES}


def pass_state(
    pools: Sequence[str],
    pool_rows: Sequence[Sequence[Any]],
    clone_rows: Sequence[Sequence[Any]],
    down_rows: Sequence[Sequence[Any]],
    rollout_bodies: Sequence[str],
    draining: Sequence[Sequence[Any]],
) -> PassState:
    """begin_pass's answer from its rows: pools (pool, failures, target_version,
    breaker_open_until, rollout_started_at), clones (pool, then CLONE_COLUMNS) in slot
    order, take-downs (pool, since, now), active rollouts' JSON newest first, drained
    hosts (host, since)."""
    clones: dict[str, dict[str, CloneRecord]] = {name: {} for name in pools}
    for row in clone_rows:
        clones[row[0]][row[1]] = _clone(row[1:])
    records = {name: PoolRecord(pool=name, clones=clones[name]) for name in pools}
    for pool, failures, target, breaker, rollout_started in pool_rows:
        records[pool] = replace(
            records[pool],
            target_version=target,
            failures=failures,
            breaker_open_until=breaker,
            rollout_started_at=rollout_started,
        )
    return PassState(
        records=records,
        down={row[0]: PoolDown(since=row[1], now=bool(row[2])) for row in down_rows},
        rollouts=tuple(rollout_from_json(body) for body in rollout_bodies),
        draining={host: since for host, since in draining},
    )


def select_all(db: Connection, table: str) -> list[tuple[Any, ...]]:
    """A table's rows, columns in TABLES' order, in primary-key order."""
    columns = ", ".join(TABLES[table])
    rows = db.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()
    return [tuple(row) for row in rows]


def statements(script: str) -> list[str]:
    """A migration script's statements (none of ours has a `;` inside a statement)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _clone(row: Sequence[Any]) -> CloneRecord:
    name, slot, version, state, since, ended, user, failures, retry_at, dirty, seen = row[:11]
    host, lost_since = row[11:13]
    return CloneRecord(
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
        host=host,
        lost_since=lost_since,
    )


def _try_decode(text: str) -> Action | None:
    from imagepipe.pool.codec import CodecError, action_from_json

    try:
        return action_from_json(text)
    except CodecError:
        return None


def _upsert_clone(db: Connection, pool: str, record: CloneRecord) -> None:
    columns = TABLES["clones"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    db.execute(
        f"INSERT INTO clones ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))}) "
        f"ON CONFLICT (pool, name) DO UPDATE SET {updates}",
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
            record.host,
            record.lost_since,
        ),
    )


def _delete_clone(db: Connection, pool: str, name: str) -> None:
    db.execute("DELETE FROM clones WHERE pool = ? AND name = ?", (pool, name))


def _upsert_pool(
    db: Connection,
    pool: str,
    target_version: int | None,
    failures: int,
    breaker_open_until: float | None,
    rollout_started_at: float | Unchanged | None,
) -> None:
    db.execute(
        "INSERT INTO pools (pool, target_version, failures, breaker_open_until) VALUES (?,?,?,?) "
        "ON CONFLICT (pool) DO UPDATE SET target_version = excluded.target_version, "
        "failures = excluded.failures, breaker_open_until = excluded.breaker_open_until",
        (pool, target_version, failures, breaker_open_until),
    )
    if not isinstance(rollout_started_at, Unchanged):
        db.execute(
            "UPDATE pools SET rollout_started_at = ? WHERE pool = ?", (rollout_started_at, pool)
        )
