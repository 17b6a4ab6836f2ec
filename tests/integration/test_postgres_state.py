"""The state in a real PostgreSQL (tests/postgres.py): an admin machine with only the settings
and the URL, `imagepipe store copy` from SQLite, and a password that never shows."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepipe.app.bootstrap import Adapters, open_store
from imagepipe.cli.app import main
from imagepipe.config import load_pool_file, load_settings
from imagepipe.doctor import Status, check_state_db
from imagepipe.errors import StoreUnavailableError
from imagepipe.pool.actions import CreateClone
from imagepipe.pool.keeper import Keeper
from imagepipe.pool.model import CloneRecord, CloneState, Endpoint, PoolDown
from imagepipe.pool.rollout.records import Heartbeat, Rollout, RolloutState
from imagepipe.record import replace
from imagepipe.stores.postgres import PostgresStore
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages, FakeVersion
from tests.postgres import PostgresServer
from tests.unit.test_cli_rollout import POOL_FILE as ROLLOUT_POOL
from tests.unit.test_cli_rollout import KeeperClock

pytestmark = pytest.mark.real

POOL_FILE = """\
name: lab
image: tiny
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
"""


@dataclass
class Admin:
    """An admin machine: a settings file naming the PostgreSQL state and a password file;
    no state_db file anywhere."""

    folder: Path
    settings: Path
    dsn: str
    password: str

    def store(self) -> PostgresStore:
        return PostgresStore(self.dsn, password=self.password)


@pytest.fixture
def admin(tmp_path: Path, postgres_server: PostgresServer, postgres_dsn: str) -> Admin:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "lab.yml").write_text(POOL_FILE)
    secret = tmp_path / "pgpass"
    secret.write_text(postgres_server.password + "\n")
    secret.chmod(0o600)
    settings = tmp_path / "imagepipe.yml"
    settings.write_text(
        "pools_dir: pools\nstate_db: state/state.db\nrun_dir: run\n"
        f"state: {postgres_dsn}\nstate_password_file: pgpass\n"
    )
    return Admin(tmp_path, settings, postgres_dsn, postgres_server.password)


def test_status_json_works_from_a_machine_with_only_the_settings_and_the_url(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1))
    lb = FakeBalancer()
    store = admin.store()  # the keeper, on another machine, writes the shared state
    keeper = Keeper(
        hypervisor=hv,
        balancer=lb,
        store=store,
        images=images,
        specs=[load_pool_file(admin.folder / "pools" / "lab.yml")],
        clock=clock,
    )
    for _ in range(4):
        keeper.run_pass()
    lb.connect("lab-0")
    hv.connect("lab-0", "192.0.2.10")
    hv.login("lab-0", "alice")
    for _ in range(4):
        keeper.run_pass()
    store.close()
    adapters = Adapters(hypervisor=hv, balancer=lb.reopen(), images=images, clock=clock)

    code = main(["--config", str(admin.settings), "status", "--json"], adapters)

    assert code == 0
    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    clones = {c["name"]: c for c in pool["clones"]}
    assert clones["lab-0"]["state"] == "in_use" and clones["lab-0"]["users"] == ["alice"]
    assert (pool["free"], pool["in_use"]) == (2, 1)
    assert not (admin.folder / "state").exists()  # no local state was made or needed


def test_status_of_a_database_no_keeper_has_used_yet_shows_empty_pools(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    adapters = Adapters(
        hypervisor=FakeHypervisor(clock=clock.now),
        balancer=FakeBalancer(),
        images=FakeImages(),
        clock=clock,
    )

    assert main(["--config", str(admin.settings), "status", "--json"], adapters) == 0

    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    assert (pool["name"], pool["clones"], pool["total"]) == ("lab", [], 0)
    store = admin.store()  # and the reader made nothing: the keeper's first start does
    assert store.table_rows()["clones"] == []
    store.close()


def test_a_missing_password_file_is_named_with_the_settings_key(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    (admin.folder / "pgpass").unlink()

    code = main(["--config", str(admin.settings), "status", "--json"])

    err = capsys.readouterr().err
    assert code == 2
    assert f"{admin.settings}: state_password_file: cannot read the password file" in err


def test_a_rollout_started_from_an_admin_machine_is_carried_out_by_the_keeper(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    (admin.folder / "pools" / "lab.yml").write_text(ROLLOUT_POOL)
    clock = KeeperClock()
    hv = FakeHypervisor(clock=clock.now)
    images = FakeImages()
    hv.add_base(images.publish("tiny", 1, channel="stable"))
    lb = FakeBalancer()
    store = admin.store()  # the keeper's connection to the shared state
    keeper = Keeper(
        hypervisor=hv,
        balancer=lb,
        store=store,
        images=images,
        specs=[load_pool_file(admin.folder / "pools" / "lab.yml")],
        clock=clock,
        channels=images,
    )
    clock.keeper, clock.hv = keeper, hv
    for _ in range(4):
        keeper.run_pass()
        hv.tick()
    images.versions["tiny"].add(2)
    hv.add_base(FakeVersion("tiny", 2).base_image())
    adapters = Adapters(hypervisor=hv, balancer=lb, images=images, clock=clock)

    argv = ["--config", str(admin.settings), "rollout", "tiny", "--drain", "--wait", "--json"]
    code = main(argv, adapters)

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and lines[-1]["state"] == "done"
    assert [r.state for r in store.rollouts("tiny")] == [RolloutState.DONE]
    assert {c.version for c in store.load_pool("lab").clones.values()} == {2}
    store.close()
    assert not (admin.folder / "state").exists()


def test_a_pool_taken_down_from_an_admin_machine_is_in_the_shared_state(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(admin.settings), "pools", "down", "lab"]) == 0
    store = admin.store()
    down = store.pool_down("lab")
    store.close()
    assert down is not None and not down.now
    assert main(["--config", str(admin.settings), "pools", "up", "lab"]) == 0
    store = admin.store()
    assert store.pool_down("lab") is None
    store.close()
    assert not (admin.folder / "state").exists()


def test_a_failed_connection_names_the_database_and_never_the_password(
    admin: Admin, postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "Wrong-" + postgres_server.password
    (admin.folder / "pgpass").write_text(wrong + "\n")
    settings = load_settings(admin.settings)

    with pytest.raises(StoreUnavailableError) as refused:
        open_store(settings)
    message = str(refused.value)
    assert admin.dsn in message and "password authentication failed" in message
    assert wrong not in message and postgres_server.password not in message

    code = main(["--config", str(admin.settings), "status", "--json"])
    err = capsys.readouterr().err
    assert code == 4 and "password authentication failed" in err
    assert wrong not in err and postgres_server.password not in err


def test_doctor_checks_the_shared_state_with_its_password_and_writes_nothing(
    admin: Admin, postgres_server: PostgresServer
) -> None:
    settings = load_settings(admin.settings)
    for _ in range(2):  # the first made nothing either
        fresh = check_state_db(settings)
        assert fresh.status is Status.OK and "no state yet" in fresh.detail
    admin.store().close()  # a keeper's first start makes the tables
    made = check_state_db(settings)
    assert made.status is Status.OK and "(current)" in made.detail

    (admin.folder / "pgpass").write_text("not-" + postgres_server.password + "\n")
    refused = check_state_db(settings)
    assert refused.status is Status.FAIL and "password authentication failed" in refused.detail
    assert postgres_server.password not in refused.detail
    assert refused.fix is not None and "state_password_file" in refused.fix


def test_a_password_in_the_url_is_refused_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "imagepipe.yml"
    settings.write_text("run_dir: run\nstate: postgresql://keeper:S3cret-pw@db.example/ip\n")

    code = main(["--config", str(settings), "status", "--json"])

    err = capsys.readouterr().err
    assert code == 2 and f"{settings}:2: state:" in err and "state_password_file" in err
    assert "S3cret-pw" not in err


# --- imagepipe store copy -------------------------------------------------------------------


def _old_state(path: Path, *, beat_pid: int = 0, beat_at: float | None = None) -> None:
    """A SQLite state with a row in every table, its keeper stopped (or not)."""
    store = SQLiteStore(path)
    record = CloneRecord(name="lab-0", slot=0, version=1, state=CloneState.FREE, since=1.5)
    store.save_clone("lab", replace(record, dirty=True, sessions_seen=4, last_user="ann"))
    store.save_pool("lab", target_version=2, failures=1, breaker_open_until=None)
    create = CreateClone(
        pool="lab", clone="lab-1", slot=1, version=1, display=Endpoint("127.0.0.1", 5901)
    )
    store.journal_end(store.journal_begin(create, now=2.0), ok=True, error=None, now=3.0)
    store.journal_begin(create, now=4.0)  # in flight when the keeper stopped
    store.record_logins("lab", 700, 9, 3, seconds=300.0, keep_days=28)
    store.mark_down("lab", PoolDown(since=5.0, now=False))
    store.add_rollout(
        Rollout(
            id=0,
            image="tiny",
            channel="stable",
            pools=("lab",),
            from_version=1,
            to_version=2,
            state=RolloutState.PENDING,
            created_at=6.0,
            created_by="admin@host",
        )
    )
    store.try_acquire("host-a", 10.0, 7.0)
    store.beat(
        Heartbeat(at=time.time() if beat_at is None else beat_at, pid=beat_pid, host="h", tick=5.0)
    )
    store.close()


def test_store_copy_moves_every_table_and_verifies_it(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_path = admin.folder / "state" / "state.db"
    _old_state(sqlite_path)
    before = SQLiteStore(sqlite_path)
    expected = before.table_rows()
    pool = before.load_pool("lab")
    before.close()

    code = main(["--config", str(admin.settings), "store", "copy", "--to", admin.dsn])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "journal: 2 rows" in out and "clones: 1 rows" in out and "(verified)" in out
    assert f"to {admin.dsn}" in out
    store = admin.store()
    assert store.table_rows() == expected
    assert store.load_pool("lab") == pool
    assert [e.action.clone for e in store.journal_open()] == ["lab-1"]
    assert (
        store.journal_begin(  # the ids go on after the copied ones
            CreateClone(pool="lab", clone="lab-2", slot=2, version=1, display=None), now=8.0
        )
        == 3
    )
    assert store.add_rollout(store.rollouts()[0]).id == 2
    store.close()


def test_store_copy_refuses_a_target_that_holds_state(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    _old_state(admin.folder / "state" / "state.db")
    store = admin.store()
    store.mark_down("hall", PoolDown(since=1.0, now=True))
    store.close()

    code = main(["--config", str(admin.settings), "store", "copy", "--to", admin.dsn])

    assert code == 2
    assert "is not empty (table pools_down has rows)" in capsys.readouterr().err
    store = admin.store()
    assert store.pools() == [] and store.journal_recent(None, 10) == []
    store.close()


def test_store_copy_refuses_while_a_keeper_runs(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    _old_state(admin.folder / "state" / "state.db", beat_pid=os.getpid())

    code = main(["--config", str(admin.settings), "store", "copy", "--to", admin.dsn])

    assert code == 2
    assert "stop it first" in capsys.readouterr().err
    store = admin.store()
    assert store.table_rows()["journal"] == []
    store.close()


def test_store_copy_refuses_while_the_state_database_is_being_written(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    path = admin.folder / "state" / "state.db"
    _old_state(path, beat_pid=os.getpid(), beat_at=0.0)  # a keeper whose beat is old...
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # ...but that is writing right now
    try:
        code = main(["--config", str(admin.settings), "store", "copy", "--to", admin.dsn])
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    assert code == 4
    assert "is in use" in capsys.readouterr().err
    store = admin.store()
    assert store.table_rows()["clones"] == []
    store.close()
