"""`imagepipe store copy --to postgresql://...`: move a SQLite state into PostgreSQL.

With the keeper stopped (a fresh heartbeat, or a writer holding the database, refuses), every
table is read in one transaction holding SQLite's write lock, written into an empty PostgreSQL
database in one transaction, read back, and compared table by table: the row count and a
SHA-256 digest of the rows. The SQLite file is left as it was (the fallback until the settings
point at the new state).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.pool.rollout.records import Heartbeat
from imagepipe.stores.postgres import PostgresStore
from imagepipe.stores.sqlite import SQLiteStore

LOCK_WAIT = 2.0  # seconds to wait for SQLite's write lock before calling the file in use
QUIET_TICKS = 3  # a heartbeat younger than this many keeper ticks means a keeper runs


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int
    digest: str  # sha256 of the table's rows (order-independent), the same on both sides


@dataclass(frozen=True)
class CopyReport:
    source: Path
    target: str
    tables: tuple[TableCopy, ...]


def copy_state(source: Path, target: str, *, password: str | None, now: float) -> CopyReport:
    """Copy the SQLite state at `source` into the empty PostgreSQL database `target` and
    verify it."""
    if not source.is_file():
        raise BadInputError(
            f"there is no SQLite state at {source} (settings key state_db): nothing to copy"
        )
    reader = SQLiteStore(source)  # brings an older file to the current schema first
    try:
        refuse_if_running(reader.heartbeat(), now)
        try:
            rows = reader.export(wait=LOCK_WAIT)
        except OperationFailedError as exc:
            raise OperationFailedError(
                f"{source} is in use ({exc}): stop the keeper (systemctl stop imagepipe-keep) "
                "and try again"
            ) from exc
    finally:
        reader.close()
    store = PostgresStore(target, password=password)
    try:
        store.import_tables(rows)
        copied = store.table_rows()
    finally:
        store.close()
    tables = []
    for table, written in rows.items():
        want, got = _summary(table, written), _summary(table, copied[table])
        if want != got:
            raise OperationFailedError(
                f"the copy of table {table} differs: {want.rows} rows (sha256 {want.digest}) in "
                f"{source}, {got.rows} rows (sha256 {got.digest}) in {target}; empty the target "
                "database and copy again"
            )
        tables.append(want)
    return CopyReport(source=source, target=target, tables=tuple(tables))


def refuse_if_running(beat: Heartbeat | None, now: float) -> None:
    """BadInputError when the heartbeat says a keeper is running on this state."""
    if beat is None or beat.pid == 0:  # never ran, or stopped cleanly (its last beat)
        return
    age = now - beat.at
    if age < QUIET_TICKS * beat.tick:
        where = "this host" if beat.host == socket.gethostname() else f"host {beat.host}"
        raise BadInputError(
            f"a keeper (pid {beat.pid} on {where}) wrote its heartbeat {max(0, round(age))} s "
            "ago: stop it first (systemctl stop imagepipe-keep), then copy"
        )


def _summary(table: str, rows: Sequence[tuple[Any, ...]]) -> TableCopy:
    lines = sorted(json.dumps(list(row)) for row in rows)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return TableCopy(table=table, rows=len(rows), digest=digest)
