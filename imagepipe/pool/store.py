"""The state store port: what the hypervisor cannot tell, as the core needs it.

Holds clone records (state and timers), pool records (rollout target, failures, breaker)
and a journal of actions: begun before an action starts, ended when it ends, so a crash
leaves the unfinished ones in journal_open(). The store decides nothing; it persists.

The protocols here are narrow (one per kind of record); `Store` is all of them together,
what the keeper holds. Implementations are adapters (imagepipe.stores.sqlite: the embedded
default, one file on one host; imagepipe.stores.postgres: shared by several keepers and admin
machines); only the composition root (imagepipe.app.bootstrap) picks and builds one. Every
implementation passes the contract suite in tests/contract/store_suite.py.

Every write is one transaction. A reader (`imagepipe status`) never blocks the keeper.

Leadership (several keepers on one shared store): a lease in the store's single `leader`
row (holder, epoch, lease_until). The epoch is the fencing token: it grows at every
acquisition, and a store handle made with `fenced(epoch)` compares it inside each of its
write transactions, so a keeper that was paused or cut off and has been replaced can change
nothing (FencedError, nothing committed). Lease times are on the store's clock: SQLite (one
host) uses the `now` its caller passes, so fake clocks work; PostgreSQL uses the database
server's clock and ignores `now`, so the keepers' clocks never matter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from imagepipe.pool.model import CloneRecord, LoginHistory, PoolDown, PoolRecord
from imagepipe.pool.rollout.records import Heartbeat, Rollout

if TYPE_CHECKING:  # a store is handed actions; reading one (status) need not load them
    from imagepipe.pool.actions import Action

HISTORY_LIMIT = 10_000  # finished journal rows kept for `status` / history


class Unchanged(Enum):
    """save_pool(rollout_started_at=UNCHANGED): keep what the store has."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


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


@dataclass(frozen=True)
class Lease:
    """The leader row: who holds the lease, its epoch (the fencing token) and until when
    (seconds since the epoch, on the store's clock). `now` is the store's clock when read,
    so `until - now` is what is left of the lease whatever the reader's own clock says."""

    holder: str
    epoch: int
    until: float
    now: float

    @property
    def held(self) -> bool:
        """Whether the lease is still running (a holder whose lease ran out leads no more)."""
        return self.until > self.now


@dataclass(frozen=True)
class PassState:
    """What a keeper pass reads from the store, read together (Passes.begin_pass)."""

    records: Mapping[str, PoolRecord]  # every pool asked for; an empty record if unknown
    down: Mapping[str, PoolDown]  # the pools asked for that are being taken down
    rollouts: tuple[Rollout, ...]  # the active rollouts, newest first
    draining: Mapping[str, float]  # the drained hosts, with since when


class CloneRecords(Protocol):
    """Clone and pool records."""

    def load_pool(self, pool: str) -> PoolRecord:
        """The pool's record with its clones; an empty record if the pool is unknown."""
        ...

    def pools(self) -> list[str]:
        """Every pool the store has a record or a clone of, sorted."""
        ...

    def apply(self, pool: str, actions: Sequence[Action]) -> None:
        """Write the record actions (RecordClone, ForgetClone, RecordPool) in one
        transaction; other actions are not the store's business and are skipped.
        ValueError (nothing written) when one is for another pool."""
        ...

    def save_clone(self, pool: str, record: CloneRecord) -> None:
        """Write the clone's record (insert or replace)."""
        ...

    def mark_clean(self, pool: str, name: str) -> None:
        """A reset of the clone has completed: nothing of a previous user is left on it."""
        ...

    def forget_clone(self, pool: str, name: str) -> None:
        """Drop the clone's record; a clone without one succeeds."""
        ...

    def save_pool(
        self,
        pool: str,
        *,
        target_version: int | None,
        failures: int,
        breaker_open_until: float | None,
        rollout_started_at: float | Unchanged | None = UNCHANGED,
    ) -> None:
        """Write the pool's record; rollout_started_at is kept unless given."""
        ...


class Journal(Protocol):
    """Actions in flight: begun before they are made, ended when they end."""

    def journal_begin(self, action: Action, now: float) -> int:
        """Record that `action` is about to start; returns the entry id for journal_end."""
        ...

    def journal_end(self, entry_id: int, *, ok: bool, error: str | None, now: float) -> None:
        """Record how the action ended. Every so often, prune old finished entries."""
        ...

    def journal_open(self) -> list[JournalEntry]:
        """Actions begun and never ended (the keeper crashed or was killed), oldest first.
        Entries this version cannot read are logged and left out."""
        ...

    def journal_recent(self, pool: str | None, limit: int) -> list[JournalRecord]:
        """The newest `limit` journal entries (of one pool, or all), newest first."""
        ...

    def prune(self) -> int:
        """Drop finished journal entries beyond the history limit; returns how many."""
        ...


class Rollouts(Protocol):
    """`imagepipe rollout`: intent, state and progress, executed by the keeper."""

    def add_rollout(self, rollout: Rollout) -> Rollout:
        """Write a new rollout; returns it with its id (ids grow)."""
        ...

    def save_rollout(self, rollout: Rollout) -> None:
        """Overwrite the rollout of rollout.id."""
        ...

    def update_rollout(
        self, rollout_id: int, change: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        """Read, change and write one rollout in one transaction (the keeper and the CLI
        both change rollouts: neither loses the other's change). Returns (before, after);
        None when there is no such rollout."""
        ...

    def rollout(self, rollout_id: int) -> Rollout | None:
        """The rollout of that id, if any."""
        ...

    def rollouts(
        self, image: str | None = None, *, active: bool = False, limit: int = 1000
    ) -> list[Rollout]:
        """Rollouts, newest first (of one image; only the active ones)."""
        ...


class Logins(Protocol):
    """Login history (learned warm-up)."""

    def record_logins(
        self, pool: str, day: int, bucket: int, logins: int, *, seconds: float, keep_days: int
    ) -> None:
        """Add `logins` arrivals to the pool's `bucket` (of `seconds`) of local `day`, and
        forget the pool's days older than `keep_days` before it."""
        ...

    def login_history(self, pool: str, *, seconds: float, since_day: int) -> LoginHistory:
        """The pool's recorded logins per day (from `since_day` on) and bucket of `seconds`."""
        ...


class PoolIntents(Protocol):
    """Pools an administrator is taking down (`imagepipe pools down`)."""

    def mark_down(self, pool: str, down: PoolDown) -> None:
        """Remember that the pool is to be taken down; a second call can only add `now`."""
        ...

    def pool_down(self, pool: str) -> PoolDown | None:
        """The pool's take-down request, or None when the pool is to be kept."""
        ...

    def clear_down(self, pool: str) -> bool:
        """Keep the pool again; True when it had been marked down."""
        ...


class HostIntents(Protocol):
    """Hosts an administrator drains (`imagepipe hosts drain`)."""

    def set_host_draining(self, host: str, since: float | None) -> bool:
        """Drain `host` from `since` on (no new desktops there; a second drain keeps the
        first `since`), or undrain it (None). True when this changed something."""
        ...

    def draining_hosts(self) -> dict[str, float]:
        """The drained hosts, with since when."""
        ...


class Heartbeats(Protocol):
    """The keeper's heartbeat, so the CLI can tell whether a keeper runs."""

    def beat(self, heartbeat: Heartbeat) -> None:
        """The keeper is alive: written at the start of every pass (one row, replaced)."""
        ...

    def heartbeat(self) -> Heartbeat | None:
        """The last heartbeat, if a keeper ever beat."""
        ...


class Passes(Protocol):
    """The start of a keeper pass, in one call: a shared database is a round trip away, and
    a pass must not wait for one per record it reads."""

    def begin_pass(self, heartbeat: Heartbeat, pools: Sequence[str]) -> PassState:
        """Write the keeper's heartbeat (as beat) and read what the pass plans with: the
        pools' records, their take-down requests, the active rollouts and the drained hosts,
        in one transaction (one round trip to a database server). Through a fenced handle
        the heartbeat is fenced like every write: FencedError, nothing written."""
        ...


class Leadership(Protocol):
    """The leader lease and its fencing token (one row: holder, epoch, lease_until).

    Lease times are on the store's clock (see the module docstring): `now` is used by
    SQLite and ignored by PostgreSQL, which takes the database server's clock."""

    def try_acquire(self, holder: str, ttl: float, now: float) -> int | None:
        """Take the lease for `ttl` seconds when nobody holds it, its lease has run out, or
        `holder` holds it already. Returns the epoch to write with: a new, greater one at
        every acquisition, the same one when `holder` still held a running lease (then it
        is a renewal). None while another holder's lease runs."""
        ...

    def renew(self, holder: str, epoch: int, ttl: float, now: float) -> bool:
        """Extend the lease to now + ttl if `holder` still holds it with `epoch` and it has
        not run out; False otherwise (then the caller leads no more: step down)."""
        ...

    def release(self, holder: str, epoch: int, now: float) -> None:
        """End the lease now if `holder` holds it with `epoch` (a clean stop, so a standby
        takes over without waiting for the lease to run out); otherwise do nothing."""
        ...

    def leader(self, now: float) -> Lease | None:
        """The leader row (held or run out), for `status`; None if nobody ever led."""
        ...


class Store(
    CloneRecords,
    Journal,
    Rollouts,
    Logins,
    PoolIntents,
    HostIntents,
    Heartbeats,
    Passes,
    Leadership,
    Protocol,
):
    """The whole state store, as the keeper holds it."""

    @property
    def location(self) -> str:
        """Where the state is, for messages: a file, or a URL (never with a password)."""
        ...

    def fenced(self, epoch: int) -> Store:
        """A handle on the same store whose every write transaction first compares `epoch`
        with the leader row's, inside the same transaction (PostgreSQL: SELECT ... FOR
        SHARE; SQLite: in the IMMEDIATE transaction). A mismatch raises FencedError and
        commits nothing. Reads are not fenced; lease calls check holder and epoch
        themselves. The handle shares the store's connection: close one, both are closed."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
