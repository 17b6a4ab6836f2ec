"""Sessions nobody watched (issue 14): the balancer's per-backend session counter
(Backend.sessions_total) is persistent evidence that somebody used a desktop, so a session
that began and ended while the keeper was down still gets the desktop reset before the next
user. README, "Pool lifecycle" ("Dirty until reset")."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from imagepipe.pool.actions import (
    Action,
    BalancerEnable,
    BalancerRemove,
    DeleteClone,
    RecordClone,
    ResetClone,
    StopClone,
)
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    GuestSession,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.planner import plan
from imagepipe.pool.planner.steps import connected_since
from imagepipe.record import replace
from imagepipe.stores.sqlite import MIGRATIONS, SQLiteStore

T0 = 1_700_000_000.0
SPEC = PoolSpec(name="ev", image="tiny", initial=2, free=2, max=4, port_first=6100)
USER = GuestSession(client="10.0.0.9", connected_since=T0, users=("ann",))


def desktop(
    slot: int,
    *,
    total: int | None,
    state: BackendState | None = BackendState.READY,
    session: GuestSession = GuestSession(),
    connections: int = 0,
) -> ObservedClone:
    name = f"ev-{slot}"
    display = Endpoint("127.0.0.1", 6100 + slot)
    info = CloneInfo(name, "ev", slot, "tiny", 1, Power.RUNNING, display, ready=True)
    backend = (
        None
        if state is None
        else Backend(name, display, state, connections=connections, sessions_total=total)
    )
    return ObservedClone(info=info, session=session, backend=backend)


def free(slot: int, *, seen: int | None, **kw: object) -> CloneRecord:
    record = CloneRecord(f"ev-{slot}", slot, 1, CloneState.FREE, T0, sessions_seen=seen)
    return replace(record, **kw)  # type: ignore[arg-type]


def planned(*pairs: tuple[ObservedClone, CloneRecord]) -> list[Action]:
    observed = Observed(clones=tuple(o for o, _ in pairs), target_version=1, base_ready=True)
    record = PoolRecord("ev", {r.name: r for _, r in pairs}, target_version=1)
    return plan(SPEC, observed, record, T0 + 600)


def resets(actions: list[Action]) -> list[str]:
    return [a.clone for a in actions if isinstance(a, ResetClone)]


def written(actions: list[Action]) -> dict[str, CloneRecord]:
    return {a.clone: a.record for a in actions if isinstance(a, RecordClone)}


# ---- the rule ----------------------------------------------------------------------------


def test_a_free_desktop_whose_counter_rose_while_no_keeper_ran_is_reset_before_it_serves() -> None:
    actions = planned(
        (desktop(0, total=3), free(0, seen=2)), (desktop(1, total=5), free(1, seen=5))
    )

    assert resets(actions) == ["ev-0"]
    assert BalancerRemove(pool="ev", clone="ev-0") in actions
    assert actions.index(BalancerRemove(pool="ev", clone="ev-0")) < actions.index(
        ResetClone(pool="ev", clone="ev-0")
    ), "taken out of the balancer before anything else happens to it"
    record = written(actions)["ev-0"]
    assert record.dirty and record.sessions_seen == 3, "dirty mark and new count in one write"
    assert "ev-1" not in written(actions), "an unchanged counter is no evidence"


def test_a_counter_that_started_over_is_evidence_when_anybody_connected_since() -> None:
    actions = planned(
        (desktop(0, total=1), free(0, seen=7)), (desktop(1, total=0), free(1, seen=7))
    )

    assert resets(actions) == ["ev-0"]
    assert written(actions)["ev-1"] == free(1, seen=0), "a reset to 0 is only a new baseline"


def test_a_record_without_a_baseline_takes_the_counter_without_evidence() -> None:
    actions = planned(
        (desktop(0, total=4), free(0, seen=None)), (desktop(1, total=0), free(1, seen=0))
    )

    assert resets(actions) == []
    assert written(actions) == {"ev-0": free(0, seen=4)}


def test_a_balancer_that_cannot_count_gives_no_evidence_and_keeps_the_baseline() -> None:
    actions = planned(
        (desktop(0, total=None), free(0, seen=2)), (desktop(1, total=0), free(1, seen=0))
    )

    assert actions == []


def test_a_desktop_in_use_is_never_reset_by_its_counter_only_marked_dirty() -> None:
    in_use = desktop(0, total=9, state=BackendState.DRAIN, session=USER, connections=1)
    actions = planned((in_use, free(0, seen=2)), (desktop(1, total=0), free(1, seen=0)))

    assert not [
        a
        for a in actions
        if a.clone == "ev-0" and isinstance(a, ResetClone | DeleteClone | StopClone)
    ]
    record = written(actions)["ev-0"]
    assert record.state is CloneState.IN_USE and record.dirty and record.sessions_seen == 9


def test_a_client_still_connected_whose_session_the_hypervisor_has_not_reported_keeps_it() -> None:
    """The counter rises as the balancer connects the client; the hypervisor reports the
    session only after the display handshake. Meanwhile the desktop is not reset under the
    user (and, dirty, serves nobody else); once the client is gone it is."""
    connecting = desktop(0, total=3, connections=1)
    actions = planned((connecting, free(0, seen=2)), (desktop(1, total=0), free(1, seen=0)))

    assert resets(actions) == []
    assert written(actions)["ev-0"].dirty
    assert BalancerEnable(pool="ev", clone="ev-0", address=connecting.info.display) not in actions
    gone = desktop(0, total=3, connections=0)
    later = planned((gone, free(0, seen=3, dirty=True)), (desktop(1, total=0), free(1, seen=0)))
    assert resets(later) == ["ev-0"]


def test_a_backend_the_keeper_adds_is_counted_from_zero_before_it_is_added() -> None:
    """Closes the hole of a desktop enabled, used at once, and the keeper killed before the
    pass after the add: the baseline 0 is in the record written before the add."""
    booted = CloneRecord("ev-0", 0, 1, CloneState.BOOTING, T0, sessions_seen=12)
    actions = planned(
        (desktop(0, total=None, state=None), booted), (desktop(1, total=0), free(1, seen=0))
    )

    enable = next(a for a in actions if isinstance(a, BalancerEnable))
    record = written(actions)["ev-0"]
    assert record.state is CloneState.FREE and record.sessions_seen == 0
    assert actions.index(RecordClone(pool="ev", clone="ev-0", record=record)) > actions.index(
        enable
    )  # listed after; the executor writes every record before it runs any action


@pytest.mark.parametrize(
    ("seen", "total", "evidence"),
    [
        (None, 5, False),
        (5, None, False),
        (5, 5, False),
        (5, 6, True),
        (5, 0, False),
        (5, 2, True),
        (0, 0, False),
        (0, 1, True),
    ],
)
def test_connected_since_reads_the_counter_like_a_counter_with_resets(
    seen: int | None, total: int | None, evidence: bool
) -> None:
    assert connected_since(seen, total) is evidence


# ---- the store -----------------------------------------------------------------------------


def test_the_store_keeps_the_counter_a_record_accounted_for(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    store.save_clone("ev", free(0, seen=17))
    store.save_clone("ev", free(1, seen=None))
    store.close()

    again = SQLiteStore(tmp_path / "state.db")
    clones = again.load_pool("ev").clones
    assert clones["ev-0"].sessions_seen == 17
    assert clones["ev-1"].sessions_seen is None
    again.close()


def test_an_upgraded_store_resets_its_free_desktops_once_as_their_history_is_unknown(
    tmp_path: Path,
) -> None:
    """A record from before the counter has no baseline: a user may have come and gone while
    the keeper was being upgraded, so a free desktop counts as used (one reset, once)."""
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("".join(MIGRATIONS[:7]))
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (?)", (7,))
    for name, state in (("ev-0", "free"), ("ev-1", "booting"), ("ev-2", "suspended")):
        db.execute(
            "INSERT INTO clones (pool, name, slot, version, state, since) VALUES (?,?,?,?,?,?)",
            ("ev", name, int(name[-1]), 1, state, T0),
        )
    db.commit()
    db.close()

    store = SQLiteStore(path)
    clones = store.load_pool("ev").clones
    assert [n for n, r in clones.items() if r.dirty] == ["ev-0"]
    assert {r.sessions_seen for r in clones.values()} == {None}
    store.close()
