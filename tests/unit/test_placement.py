"""Placement over several hosts (docs/hosts.md): where new desktops go, what happens to the
desktops of a lost host, and a drained host. The planner is pure: these drive plan()."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imagepipe.pool.actions import (
    Action,
    BalancerDrain,
    BalancerEnable,
    BalancerRemove,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    ResetClone,
)
from imagepipe.pool.model import (
    Backend,
    BackendState,
    CloneInfo,
    CloneRecord,
    CloneState,
    Endpoint,
    GuestSession,
    HostRoom,
    Observed,
    ObservedClone,
    PoolRecord,
    PoolSpec,
    Power,
)
from imagepipe.pool.planner import plan
from imagepipe.pool.planner.placement import Placer
from imagepipe.record import replace

T0 = 1_700_000_000.0
MB = 1024**2
SPEC = PoolSpec(name="lab", image="tiny", initial=0, free=2, max=6, memory=256 * MB)

rooms = st.builds(
    HostRoom,
    name=st.sampled_from([f"h{i}" for i in range(8)]),
    address=st.just("10.0.0.1"),
    usable=st.booleans(),
    desktops=st.integers(0, 6),
    memory=st.integers(0, 6).map(lambda n: n * 256 * MB),
    max_desktops=st.none() | st.integers(0, 8),
    max_memory=st.none() | st.integers(0, 8).map(lambda n: n * 256 * MB),
)
host_lists = st.lists(rooms, min_size=1, max_size=8, unique_by=lambda r: r.name)


def fits(room: HostRoom, desktops: int, memory: int, size: int) -> bool:
    return (room.max_desktops is None or desktops + 1 <= room.max_desktops) and (
        room.max_memory is None or memory + size <= room.max_memory
    )


@given(host_lists, st.integers(0, 30))
def test_a_new_desktop_goes_to_a_usable_host_with_room_and_the_least_load(
    hosts: list[HostRoom], picks: int
) -> None:
    size = 256 * MB
    placer = Placer(hosts)
    load = {h.name: (h.desktops, h.memory) for h in hosts}
    for _ in range(picks):
        candidates = [
            h for h in hosts if h.usable and fits(h, load[h.name][0], load[h.name][1], size)
        ]
        chosen = placer.pick(size)
        if not candidates:
            assert chosen is None
            break
        assert chosen is not None and chosen.usable
        best = min(candidates, key=lambda h: (load[h.name][0], load[h.name][1], h.name))
        assert chosen.name == best.name  # least loaded, ties by name
        d, m = load[chosen.name]
        load[chosen.name] = (d + 1, m + size)
    for h in hosts:
        d, m = load[h.name]
        if h.usable and (d, m) != (h.desktops, h.memory):  # placed here: within capacity
            assert h.max_desktops is None or d <= h.max_desktops
            assert h.max_memory is None or m <= h.max_memory


@given(host_lists)
def test_placement_is_deterministic_for_the_same_hosts_in_any_order(hosts: list[HostRoom]) -> None:
    one, other = Placer(hosts), Placer(list(reversed(hosts)))
    first = [getattr(one.pick(MB), "name", None) for _ in range(10)]
    again = [getattr(other.pick(MB), "name", None) for _ in range(10)]
    assert first == again


@given(st.integers(1, 12), st.integers(0, 60))
def test_equal_hosts_fill_evenly(n_hosts: int, desktops: int) -> None:
    hosts = [HostRoom(name=f"h{i:02d}", address="10.0.0.1", usable=True) for i in range(n_hosts)]
    placer = Placer(hosts)
    placed: dict[str, int] = {}
    for _ in range(desktops):
        room = placer.pick(MB)
        assert room is not None
        placed[room.name] = placed.get(room.name, 0) + 1
    counts = [placed.get(h.name, 0) for h in hosts]
    assert max(counts) - min(counts) <= 1


def test_no_hosts_is_the_single_host_named_empty() -> None:
    room = Placer(()).pick(MB)
    assert room is not None and room.name == ""


# --- plan() over several hosts ---------------------------------------------------------


def three_hosts(**changes: dict[str, object]) -> tuple[HostRoom, ...]:
    hosts = []
    for i in (1, 2, 3):
        room = HostRoom(name=f"h{i}", address=f"10.0.0.{i}", usable=True, max_desktops=4)
        hosts.append(replace(room, **changes.get(f"h{i}", {})))  # type: ignore[arg-type]
    return tuple(hosts)


def info(slot: int, host: str, *, version: int = 1) -> CloneInfo:
    address = f"10.0.0.{host[-1]}" if host else "127.0.0.1"
    return CloneInfo(
        f"lab-{slot}",
        "lab",
        slot,
        "tiny",
        version,
        Power.RUNNING,
        Endpoint(address, 5900 + slot),
        True,
        host=host,
    )


def seen(
    slot: int,
    host: str,
    *,
    client: str | None = None,
    backend: BackendState = BackendState.READY,
    total: int | None = 0,
) -> ObservedClone:
    i = info(slot, host)
    assert i.display is not None
    be = Backend(i.name, i.display, backend, 1 if client else 0, total)
    return ObservedClone(info=i, session=GuestSession(client=client), backend=be)


def rec(slot: int, host: str, state: CloneState = CloneState.FREE, **kw: object) -> CloneRecord:
    base = CloneRecord(f"lab-{slot}", slot, 1, state, T0, host=host, sessions_seen=0)
    return replace(base, **kw)  # type: ignore[arg-type]


def creates(actions: list[Action]) -> list[CreateClone]:
    return [a for a in actions if isinstance(a, CreateClone)]


def test_a_pool_of_six_fills_three_hosts_two_each_with_their_addresses() -> None:
    spec = replace(SPEC, initial=6)
    observed = Observed(target_version=1, base_ready=True, hosts=three_hosts())
    made = creates(plan(spec, observed, PoolRecord("lab"), T0))
    assert sorted(c.host for c in made) == ["h1", "h1", "h2", "h2", "h3", "h3"]
    for c in made:
        assert c.display == Endpoint(f"10.0.0.{c.host[-1]}", 5900 + c.slot)


def test_no_desktop_goes_to_a_host_without_the_version_or_room() -> None:
    spec = replace(SPEC, initial=6)
    hosts = three_hosts(h2={"usable": False}, h3={"max_desktops": 1})
    observed = Observed(target_version=1, base_ready=True, hosts=hosts)
    made = creates(plan(spec, observed, PoolRecord("lab"), T0))
    assert sorted(c.host for c in made) == ["h1", "h1", "h1", "h1", "h3"]


def test_a_lost_hosts_desktops_are_kept_drained_and_replaced_on_the_others() -> None:
    """h2 is cut off with a user on lab-2 and a free lab-3: nothing is deleted, their slots
    (names, ports) are held, their backends drained (the user's connection stays), and the
    pool refills on h1 and h3."""
    records = [
        rec(0, "h1"),
        rec(1, "h3"),
        rec(2, "h2", CloneState.IN_USE, dirty=True),
        rec(3, "h2"),
    ]
    record = PoolRecord("lab", {r.name: r for r in records}, target_version=1)
    b2 = Backend("lab-2", Endpoint("10.0.0.2", 5902), BackendState.DRAIN, 1, 1)
    b3 = Backend("lab-3", Endpoint("10.0.0.2", 5903), BackendState.READY, 0, 0)
    hosts = three_hosts(h2={"usable": False})
    observed = Observed(
        clones=(seen(0, "h1"), seen(1, "h3")),
        orphan_backends=(b2, b3),
        target_version=1,
        base_ready=True,
        hosts=hosts,
        lost_hosts=frozenset({"h2"}),
    )
    actions = plan(replace(SPEC, free=4), observed, record, T0 + 10)
    assert not [a for a in actions if isinstance(a, DeleteClone | ForgetClone | BalancerRemove)]
    assert [a.clone for a in actions if isinstance(a, BalancerDrain)] == ["lab-3"]
    made = creates(actions)
    assert {c.slot for c in made}.isdisjoint({2, 3})
    assert {c.host for c in made} <= {"h1", "h3"} and len(made) == 2
    lost = {a.clone: a.record for a in actions if isinstance(a, RecordClone)}
    assert lost["lab-2"].lost_since == T0 + 10 and lost["lab-3"].lost_since == T0 + 10
    assert lost["lab-2"].state is CloneState.IN_USE


def lost_pool() -> PoolRecord:
    """h2 came back: lab-2 (in use before the cut), lab-3 (free) were replaced by 4 and 5."""
    records = [
        rec(0, "h1"),
        rec(1, "h3"),
        rec(2, "h2", CloneState.IN_USE, dirty=True, lost_since=T0),
        rec(3, "h2", lost_since=T0),
        rec(4, "h1"),
        rec(5, "h3"),
    ]
    return PoolRecord("lab", {r.name: r for r in records}, target_version=1)


def back(*clones: ObservedClone) -> Observed:
    base = [seen(0, "h1"), seen(1, "h3"), seen(4, "h1"), seen(5, "h3")]
    return Observed(clones=(*base, *clones), target_version=1, base_ready=True, hosts=three_hosts())


def test_when_the_host_returns_a_desktop_with_a_session_is_tracked_again() -> None:
    observed = back(
        seen(2, "h2", client="192.0.2.7", backend=BackendState.DRAIN, total=1),
        seen(3, "h2", backend=BackendState.DRAIN),
    )
    actions = plan(replace(SPEC, free=4), observed, lost_pool(), T0 + 60)
    written = {a.clone: a.record for a in actions if isinstance(a, RecordClone)}
    assert written["lab-2"].state is CloneState.IN_USE and written["lab-2"].lost_since is None
    assert not [a for a in actions if a.clone == "lab-2" and isinstance(a, DeleteClone)]
    assert not [a for a in actions if a.clone == "lab-2" and isinstance(a, ResetClone)]
    # the replaced free one goes; the pool keeps its 4 free on 0, 1, 4, 5
    assert [a.clone for a in actions if isinstance(a, DeleteClone)] == ["lab-3"]


def test_a_desktop_used_while_its_host_was_unseen_is_reset_before_anyone_gets_it() -> None:
    """The balancer's session counter of lab-3 rose while h2 was cut off (a connection that
    still reached it): it is reset, never enabled as it is."""
    observed = back(seen(3, "h2", backend=BackendState.DRAIN, total=2))
    actions = plan(replace(SPEC, free=5), observed, lost_pool(), T0 + 60)
    mine = [a for a in actions if a.clone == "lab-3"]
    assert any(isinstance(a, ResetClone) for a in mine)
    assert not any(isinstance(a, BalancerEnable) for a in mine)


def test_a_desktop_back_in_use_is_deleted_not_reset_at_logoff_when_the_pool_is_over_max() -> None:
    """lab-2 came back in use and its user has logged off; the pool refilled to its `max`
    of 4 meanwhile (0, 1, 4, 5), so with lab-2 it counts 5: lab-2 goes instead of being reset
    into a fifth free desktop."""
    records = {**lost_pool().clones}
    records["lab-2"] = replace(records["lab-2"], lost_since=None)
    del records["lab-3"]
    observed = back(seen(2, "h2", backend=BackendState.DRAIN, total=1))
    actions = plan(replace(SPEC, free=4, max=4), observed, PoolRecord("lab", records, 1), T0 + 90)
    mine = [a for a in actions if a.clone == "lab-2"]
    assert any(isinstance(a, DeleteClone) for a in mine)
    assert not any(isinstance(a, ResetClone | BalancerEnable) for a in mine)


def test_a_free_desktop_back_from_a_lost_host_serves_again_if_the_pool_needs_it() -> None:
    observed = back(seen(3, "h2", backend=BackendState.DRAIN))
    actions = plan(replace(SPEC, free=5), observed, lost_pool(), T0 + 60)
    mine = [a for a in actions if a.clone == "lab-3"]
    assert [type(a) for a in mine] == [BalancerEnable, RecordClone]


def test_a_drained_host_gets_no_new_desktops_its_free_ones_go_and_in_use_ones_stay() -> None:
    records = [rec(0, "h1"), rec(1, "h1", CloneState.IN_USE, dirty=True), rec(2, "h2")]
    record = PoolRecord("lab", {r.name: r for r in records}, target_version=1)
    observed = Observed(
        clones=(
            seen(0, "h1"),
            seen(1, "h1", client="192.0.2.7", backend=BackendState.DRAIN),
            seen(2, "h2"),
        ),
        target_version=1,
        base_ready=True,
        hosts=three_hosts(h1={"usable": False}),
        draining_hosts=frozenset({"h1"}),
    )
    actions = plan(SPEC, observed, record, T0 + 60)
    assert [a.clone for a in actions if isinstance(a, DeleteClone)] == ["lab-0"]
    assert not [a for a in actions if a.clone == "lab-1" and not isinstance(a, RecordClone)]
    assert {c.host for c in creates(actions)} <= {"h2", "h3"} and creates(actions)


def test_a_pool_going_down_keeps_the_records_and_backends_of_a_lost_hosts_desktops() -> None:
    """Taking a pool down never forgets a desktop that may still run on a lost host (it is
    removed once the host is back) and only drains its balancer entry."""
    from imagepipe.pool.model import PoolDown
    from imagepipe.pool.teardown import plan_down

    records = [rec(0, "h1"), rec(2, "h2", CloneState.IN_USE, dirty=True)]
    record = PoolRecord("lab", {r.name: r for r in records}, target_version=1)
    b2 = Backend("lab-2", Endpoint("10.0.0.2", 5902), BackendState.READY, 0, 1)
    observed = Observed(
        clones=(seen(0, "h1"),),
        orphan_backends=(b2,),
        target_version=1,
        base_ready=True,
        hosts=three_hosts(h2={"usable": False}),
        lost_hosts=frozenset({"h2"}),
    )
    actions = plan_down(SPEC, observed, record, PoolDown(since=T0), T0 + 5)
    mine = [a for a in actions if a.clone == "lab-2"]
    assert [type(a) for a in mine] == [BalancerDrain]
