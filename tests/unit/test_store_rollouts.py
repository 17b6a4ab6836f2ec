"""The store's rollouts and the keeper's heartbeat: what survives a restart, what the CLI and
the keeper write at the same time, and the upgrade of an older database."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from imagepipe.pool.rollout.records import Heartbeat, PoolProgress, Rollout, RolloutState
from imagepipe.pool.store import MIGRATIONS, Store

ROLLOUT = Rollout(
    id=0,
    image="tiny",
    channel="stable",
    pools=("lab", "hall"),
    from_version=1,
    to_version=2,
    state=RolloutState.PENDING,
    created_at=100.0,
    created_by="admin@host",
    deadline_at=500.0,
    message="Maintenance",
    canary=1,
    bake=60.0,
    progress=(PoolProgress(pool="lab", new_ready=1, old_in_use=2, old_at_start=3),),
)


def test_a_rollout_reads_back_as_written_after_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    saved = store.add_rollout(ROLLOUT)
    store.close()

    again = Store(tmp_path / "state.db")
    assert again.rollout(saved.id) == saved == replace(ROLLOUT, id=1)
    assert again.rollouts("tiny", active=True) == [saved]
    assert again.rollouts("other") == []
    again.close()


def test_ended_rollouts_are_history_newest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    first = store.add_rollout(ROLLOUT)
    store.save_rollout(replace(first, state=RolloutState.DONE, finished_at=200.0))
    second = store.add_rollout(replace(ROLLOUT, from_version=2, to_version=3))

    assert [r.id for r in store.rollouts("tiny")] == [second.id, first.id]
    assert [r.id for r in store.rollouts("tiny", active=True)] == [second.id]
    store.close()


def test_a_pause_written_by_the_cli_is_not_lost_to_the_keepers_write(tmp_path: Path) -> None:
    keeper = Store(tmp_path / "state.db")
    cli = Store(tmp_path / "state.db")
    saved = keeper.add_rollout(ROLLOUT)

    def keeper_judges(current: Rollout) -> Rollout:
        return replace(current, reason=f"judged paused={current.paused}")

    cli.update_rollout(saved.id, lambda r: replace(r, paused=True))
    result = keeper.update_rollout(saved.id, keeper_judges)

    assert result is not None
    assert result[1].paused and result[1].reason == "judged paused=True"
    keeper.close()
    cli.close()


def test_the_heartbeat_keeps_the_last_pass(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.heartbeat() is None
    store.beat(Heartbeat(at=1.0, pid=10, host="h", tick=5.0))
    store.beat(Heartbeat(at=2.0, pid=10, host="h", tick=5.0))
    assert store.heartbeat() == Heartbeat(at=2.0, pid=10, host="h", tick=5.0)
    store.close()


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

    store = Store(db)
    assert store.load_pool("lab").target_version == 1
    assert store.rollouts() == [] and store.heartbeat() is None
    store.close()
