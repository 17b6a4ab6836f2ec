"""Property tests: the planner's invariants hold over random days of observations.

A small model host applies the planner's actions at once (a create leaves a powered-off
clone, a start or reset boots it instantly); hypothesis drives users, power cuts, crashes,
rollouts and time between passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import example, given, settings
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
    RecordPool,
    ResetClone,
    ResumeClone,
    StartClone,
    StopClone,
    SuspendClone,
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
    OnLogoff,
    PoolRecord,
    PoolSpec,
    Power,
    Standby,
)
from imagepipe.pool.planner import free_target, plan, session_live, session_unread
from imagepipe.record import replace

T0 = 1_700_000_000.0


@dataclass
class Vm:
    slot: int
    version: int
    power: Power = Power.SHUTOFF
    ready: bool = False
    client: str | None = None
    users: tuple[str, ...] = ()
    dirty: bool = False  # a user's traces on its disk since the last reset or create


@dataclass
class Host:
    spec: PoolSpec
    now: float = T0
    target: int = 1
    base_ready: bool = True
    vms: dict[str, Vm] = field(default_factory=dict)
    backends: dict[str, BackendState] = field(default_factory=dict)
    records: dict[str, CloneRecord] = field(default_factory=dict)
    pool: RecordPool | None = None
    after_shrink: int | None = None  # a shrink happened: free clones must stay >= this
    late: set[str] = field(default_factory=set)  # next pass: their readiness read times out

    def observe(self) -> Observed:
        clones = []
        for name, vm in sorted(self.vms.items()):
            display = Endpoint("127.0.0.1", self.spec.port_for(vm.slot))
            ready = None if name in self.late and vm.power is Power.RUNNING else vm.ready
            info = CloneInfo(
                name, self.spec.name, vm.slot, "img", vm.version, vm.power, display, ready
            )
            state = self.backends.get(name)
            backend = None
            if state is not None:
                backend = Backend(name, display, state, int(vm.client is not None))
            session = GuestSession(vm.client, None, vm.users)
            if name in self.late and vm.power is Power.RUNNING:  # who is logged in: unread
                session = GuestSession(vm.client, None, (), users_unread=True)
            clones.append(ObservedClone(info, session, backend))
        orphans = tuple(
            Backend(n, Endpoint("127.0.0.1", 1), s)
            for n, s in self.backends.items()
            if n not in self.vms
        )
        return Observed(tuple(clones), orphans, self.target, self.base_ready)

    def record(self) -> PoolRecord:
        p = self.pool
        return PoolRecord(
            self.spec.name,
            dict(self.records),
            target_version=p.target_version if p else None,
            failures=p.failures if p else 0,
            breaker_open_until=p.breaker_open_until if p else None,
            rollout_started_at=p.rollout_started_at if p else None,
        )

    def step(self, killed_after: int | None = None) -> list[Action]:
        """One keeper pass. `killed_after`: the keeper dies (kill -9) after that many host
        calls; like the executor, it wrote the pass's records before any call."""
        observed, record = self.observe(), self.record()
        self.late = set()
        actions = plan(self.spec, observed, record, self.now)
        check_invariants(self, observed, record, actions)
        memory = (RecordClone, ForgetClone, RecordPool)
        calls = [a for a in actions if not isinstance(a, memory)]
        if killed_after is not None:
            calls = calls[:killed_after]
        for action in [a for a in actions if isinstance(a, memory)] + calls:
            self.apply(action)
        self.check_no_dirty_desktop_serves()
        if killed_after is not None:
            self.after_shrink = None  # the pass did not finish
            return actions
        if self.after_shrink is not None:
            assert self.free_ready() >= self.after_shrink, "shrink went below the free target"
            self.after_shrink = None
        return actions

    def apply(self, a: Action) -> None:
        vm = self.vms.get(a.clone)
        if isinstance(a, RecordClone):
            self.records[a.clone] = a.record
        elif isinstance(a, ForgetClone):
            self.records.pop(a.clone, None)
        elif isinstance(a, RecordPool):
            self.pool = a
        elif isinstance(a, CreateClone):
            self.vms.setdefault(a.clone, Vm(a.slot, a.version))
        elif isinstance(a, BalancerEnable):
            self.backends[a.clone] = BackendState.READY
        elif isinstance(a, BalancerDrain):
            if a.clone in self.backends:
                self.backends[a.clone] = BackendState.DRAIN
        elif isinstance(a, BalancerRemove):
            self.backends.pop(a.clone, None)
        elif vm is None:
            return
        elif isinstance(a, DeleteClone):
            del self.vms[a.clone]
        elif isinstance(a, StartClone | ResumeClone):
            vm.power, vm.ready = Power.RUNNING, True
        elif isinstance(a, ResetClone):
            vm.power, vm.ready, vm.client, vm.users = Power.RUNNING, True, None, ()
            vm.dirty = False
            kept = self.records.get(a.clone)
            if kept is not None:  # what the executor tells the store once a reset is done
                self.records[a.clone] = replace(kept, dirty=False)
        elif isinstance(a, SuspendClone | StopClone):
            vm.power, vm.ready, vm.client, vm.users = (
                Power.SUSPENDED if isinstance(a, SuspendClone) else Power.SHUTOFF,
                False,
                None,
                (),
            )

    def check_no_dirty_desktop_serves(self) -> None:
        assigned = set(self.spec.assignments.values())
        for name, state in self.backends.items():
            vm = self.vms.get(name)
            if state is not BackendState.READY or vm is None or vm.slot in assigned:
                continue
            if vm.client is not None or vm.users:
                continue  # its user is on it (a drain a killed pass did not do comes next)
            if self.spec.on_logoff is not OnLogoff.KEEP:
                assert not vm.dirty, f"{name} takes new users with a previous user's traces"

    def free_ready(self) -> int:
        return sum(
            1
            for name, vm in self.vms.items()
            if vm.version == self.target
            and vm.ready
            and vm.client is None
            and not vm.users
            and self.backends.get(name) is BackendState.READY
        )


def check_invariants(
    host: Host, observed: Observed, record: PoolRecord, actions: list[Action]
) -> None:
    spec, now = host.spec, host.now
    by_name = observed.by_name()
    deadline = spec.drain_deadline
    started = next(
        (a.rollout_started_at for a in actions if isinstance(a, RecordPool)),
        record.rollout_started_at,
    )
    forced = deadline is not None and started is not None and now - started >= deadline
    for a in actions:
        oc = by_name.get(a.clone)
        if oc is None:
            continue
        rec = record.clones.get(a.clone)
        live = session_live(spec, oc.session, rec, now) or session_unread(
            spec, oc.session, rec, now
        )
        old = oc.info.version != host.target
        if isinstance(a, ResetClone | StopClone | SuspendClone) or (
            isinstance(a, DeleteClone) and not (old and forced)
        ):
            assert not live, f"{a.kind} on {a.clone} with a live session"
        if isinstance(a, BalancerEnable):
            assert not old, f"old-version clone {a.clone} enabled in the balancer"
    for name, oc in by_name.items():  # nothing is decided on a readiness read that timed out
        rec = record.clones.get(name)
        if (
            oc.info.ready is None
            and rec is not None
            and rec.state is CloneState.FREE
            and oc.info.version == host.target
            and not session_live(spec, oc.session, rec, now)
        ):
            assert not [a for a in actions if a.clone == name], f"{name} acted on, unread"
    if not host.base_ready:
        assert not any(isinstance(a, CreateClone) for a in actions), "cloned from a busy base"
    # never more than max clones of the target version, counting creates in flight
    creating = {a.clone for a in actions if isinstance(a, CreateClone)}
    pending = {
        n
        for n, r in record.clones.items()
        if r.state is CloneState.CREATING
        and r.version == host.target
        and n not in by_name
        and n in observed.in_flight
    }
    existing = {n for n, vm in host.vms.items() if vm.version == host.target}
    assert len(existing | pending | creating) <= spec.max
    # shrink never takes ready free clones below the free target
    shrunk = [
        a
        for a in actions
        if isinstance(a, DeleteClone | SuspendClone)
        and (r := record.clones.get(a.clone)) is not None
        and r.state is CloneState.FREE
        and by_name[a.clone].info.version == host.target
        and by_name[a.clone].info.ready
        and not by_name[a.clone].session.active
    ]
    if shrunk:  # checked once the pass's actions are applied, balancer included
        host.after_shrink = free_target(spec, now)


specs = st.builds(
    PoolSpec,
    name=st.just("lab"),
    image=st.just("img"),
    initial=st.integers(0, 3),
    free=st.integers(0, 3),
    max=st.integers(1, 6),
    on_logoff=st.sampled_from(list(OnLogoff)),
    standby=st.sampled_from(list(Standby)),
    recycle_after=st.sampled_from([0.0, 60.0]),
    shrink_after=st.sampled_from([0.0, 600.0]),
    disconnect_timeout=st.sampled_from([0.0, 300.0]),
    drain_deadline=st.sampled_from([None, 900.0]),
    assignments=st.sampled_from([{}, {"teacher": 0}]),
)

events = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "tick",
                "login",
                "disconnect",
                "logoff",
                "poweroff",
                "crash",
                "rollout",
                "base",
                "kill",
                "kill",
                "lose-store",
                "late",
            ]
        ),
        st.integers(0, 7),
        st.sampled_from([0.0, 1.0, 30.0, 120.0, 700.0]),
    ),
    max_size=40,
)


def run_events(host: Host, script: list[tuple[str, int, float]]) -> None:
    kill: int | None = None
    for kind, pick, dt in script:
        host.now += dt
        names = sorted(host.vms)
        vm = host.vms[names[pick % len(names)]] if names else None
        if kind == "login" and vm is not None and vm.power is Power.RUNNING:
            name = names[pick % len(names)]
            if host.backends.get(name) is BackendState.READY and vm.client is None:
                vm.client, vm.users, vm.dirty = "10.0.0.1", (f"u{pick}",), True
        elif kind == "disconnect" and vm is not None:
            vm.client = None
        elif kind == "logoff" and vm is not None:
            vm.client, vm.users = None, ()
        elif kind == "poweroff" and vm is not None:
            vm.power, vm.ready, vm.client, vm.users = Power.SHUTOFF, False, None, ()
        elif kind == "crash" and vm is not None:
            vm.power, vm.ready, vm.client, vm.users = Power.CRASHED, False, None, ()
        elif kind == "rollout":
            host.target += 1
        elif kind == "base":
            host.base_ready = not host.base_ready
        elif kind == "kill":  # the keeper dies part-way through the next pass
            kill = pick % 4
            continue
        elif kind == "late" and vm is not None:  # its guest agent answers after the timeout
            host.late = {names[pick % len(names)]}
        elif kind == "lose-store":  # the state database is gone; the host is as it was
            host.records.clear()
            host.pool = None
        host.step(killed_after=kill)
        kill = None


# The keeper killed right after it took a logged-off desktop out of the balancer, before
# the reset (issue 14): the desktop must not come back to the balancer with its traces.
KILLED_BEFORE_RESET = [
    ("tick", 0, 0.0),
    ("tick", 0, 0.0),
    ("tick", 0, 0.0),
    ("login", 0, 1.0),
    ("tick", 0, 1.0),
    ("kill", 1, 0.0),
    ("logoff", 0, 1.0),
    ("tick", 0, 1.0),
    ("tick", 0, 1.0),
]
SMALL = PoolSpec(name="lab", image="img", initial=2, free=2, max=4, recycle_after=0.0)


@settings(max_examples=150, deadline=None)
@given(spec=specs, script=events)
@example(spec=SMALL, script=KILLED_BEFORE_RESET)
@example(
    spec=SMALL, script=[*KILLED_BEFORE_RESET[:5], ("lose-store", 0, 0.0), *KILLED_BEFORE_RESET[6:]]
)
def test_invariants_hold_over_random_days(
    spec: PoolSpec, script: list[tuple[str, int, float]]
) -> None:
    run_events(Host(spec), script)


@settings(max_examples=100, deadline=None)
@given(spec=specs, script=events)
def test_pool_converges_to_free_target_and_then_plans_nothing(
    spec: PoolSpec, script: list[tuple[str, int, float]]
) -> None:
    host = Host(spec)
    run_events(host, script)
    host.base_ready = True
    for vm in host.vms.values():  # everybody goes home
        vm.client, vm.users = None, ()
    quiet = max(spec.recycle_after, spec.disconnect_timeout, spec.breaker_cooldown) + 1
    host.now += quiet
    for _ in range(12):
        host.now += spec.boot_timeout + spec.retry_backoff * 64
        host.step()
    busy = sum(1 for vm in host.vms.values() if vm.client or vm.users)
    shared_room = spec.max - len(spec.assignments) - busy
    assert host.free_ready() >= min(free_target(spec, host.now), shared_room)
    assert host.step() == []
    assert host.step() == []  # and again: idempotent


def test_same_inputs_give_same_actions() -> None:
    host = Host(PoolSpec(name="lab", image="img", initial=2, free=2, max=4))
    observed, record = host.observe(), host.record()
    assert plan(host.spec, observed, record, T0) == plan(host.spec, observed, record, T0)
    replace(host.spec)  # specs are plain values: nothing in a plan depends on identity
