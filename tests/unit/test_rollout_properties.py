"""Property tests of an active rollout's rules (pool/rollout/rules.py) over random days:
users, power cuts, crashes, busy bases, keeper kills and new versions, on the model host of
test_planner_properties.py, with a rollout policy on every version change."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from imagepipe.pool.actions import (
    Action,
    BalancerEnable,
    CreateClone,
    DeleteClone,
    ForgetClone,
    RecordClone,
    RecordPool,
    ResetClone,
    StopClone,
    SuspendClone,
)
from imagepipe.pool.model import (
    BackendState,
    CloneState,
    Observed,
    PoolRecord,
    PoolSpec,
    RolloutPolicy,
)
from imagepipe.pool.planner import free_target, plan, session_live
from imagepipe.pool.rollout.rules import BUSY
from imagepipe.record import replace
from tests.unit.test_planner_properties import Host, events, run_events, specs


@dataclass
class RollingHost(Host):
    """Every version change is an `imagepipe rollout` with this policy."""

    surge: int = 1
    canary: int | None = None
    paused: bool = False

    def record(self) -> PoolRecord:
        policy = RolloutPolicy(
            rollout=1,
            to_version=self.target,
            surge=self.surge,
            canary=self.canary,
            paused=self.paused,
        )
        return replace(super().record(), rollout=policy)

    def serving(self) -> int:
        """Desktops a new user can get now, of any version, that the store knows (one it
        lost track of is reset first, whatever the rollout: nobody knows who was on it)."""
        return sum(
            1
            for name, vm in self.vms.items()
            if name in self.records
            and self.records[name].state is CloneState.FREE  # not a used, dirty one
            and vm.ready
            and vm.client is None
            and not vm.users
            and self.backends.get(name) is BackendState.READY
        )

    def step(self, killed_after: int | None = None) -> list[Action]:
        observed, record = self.observe(), self.record()
        self.late = set()  # a late agent is late for one pass, as in Host.step
        before = self.serving()
        new_before = sum(1 for vm in self.vms.values() if vm.version == self.target)
        actions = plan(self.spec, observed, record, self.now)
        check_rollout_rules(self, record, actions, new_before)
        memory = (RecordClone, ForgetClone, RecordPool)
        calls = [a for a in actions if not isinstance(a, memory)]
        if killed_after is not None:
            calls = calls[:killed_after]
        for action in [a for a in actions if isinstance(a, memory)] + calls:
            self.apply(action)
        self.check_no_dirty_desktop_serves()
        if killed_after is None:
            wanted = free_target(self.spec, self.now)
            busy = sum(
                1
                for name, vm in self.vms.items()
                if vm.version == self.target
                and name in self.records
                and self.records[name].state in BUSY
            )
            shared = self.spec.max - len(self.spec.assignments)
            floor = min(before, wanted, shared - busy)
            assert self.serving() >= floor, "a rollout pass left fewer free desktops"
            old_free = sum(
                1
                for name, vm in self.vms.items()
                if vm.version != self.target and self.backends.get(name) is BackendState.READY
            )
            new = sum(1 for vm in self.vms.values() if vm.version == self.target)
            if self.canary is not None:
                assert new <= max(self.canary, new_before), "more new desktops than the canary"
            assert new + old_free <= max(self.spec.max + self.surge, new_before + old_free)
        return actions


def check_rollout_rules(
    host: RollingHost, record: PoolRecord, actions: list[Action], new_before: int
) -> None:
    spec, now = host.spec, host.now
    by_name = host.observe().by_name()
    creates = [a for a in actions if isinstance(a, CreateClone)]
    if host.paused:
        assert not creates, "a paused rollout made a new desktop"
    if not host.base_ready:
        assert not creates, "cloned from a busy base"
    for a in actions:
        oc = by_name.get(a.clone)
        if oc is None:
            continue
        live = session_live(spec, oc.session, record.clones.get(a.clone), now)
        if isinstance(a, ResetClone | StopClone | SuspendClone | DeleteClone):
            assert not live, f"{a.kind} on {a.clone} with a live session (no deadline)"
        if isinstance(a, BalancerEnable):
            assert not live, f"a new user could reach {a.clone}, which has a session"


rollouts = st.fixed_dictionaries(
    {
        "surge": st.integers(0, 3),
        "canary": st.sampled_from([None, 1, 2]),
        "paused": st.booleans(),
    }
)


@settings(max_examples=200, deadline=None)
@given(spec=specs, policy=rollouts, script=events)
def test_a_rollout_never_leaves_fewer_free_desktops_nor_cuts_a_session(
    spec: PoolSpec, policy: dict[str, int | bool | None], script: list[tuple[str, int, float]]
) -> None:
    spec = replace(spec, drain_deadline=None)
    run_events(RollingHost(spec, **policy), [("tick", 0, 0.0), *script])  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(spec=specs, surge=st.integers(1, 3), script=events)
@example(  # five desktops to replace one at a time: more passes than a fixed twelve
    spec=PoolSpec(
        "lab",
        "img",
        initial=0,
        free=3,
        max=4,
        recycle_after=0.0,
        shrink_after=0.0,
        disconnect_timeout=0.0,
        drain_deadline=None,
        assignments={"teacher": 0},
    ),
    surge=1,
    script=[("tick", 0, 0.0)] * 3 + [("rollout", 0, 0.0)] + [("tick", 0, 0.0)] * 2,
)
def test_a_rollout_that_is_not_held_back_ends_on_the_new_version(
    spec: PoolSpec, surge: int, script: list[tuple[str, int, float]]
) -> None:
    host = RollingHost(spec, surge=surge)
    run_events(host, script)
    host.target += 1
    host.base_ready = True
    for vm in host.vms.values():  # everybody goes home
        vm.client, vm.users = None, ()
    host.now += max(spec.recycle_after, spec.disconnect_timeout, spec.breaker_cooldown) + 1
    # a surge of one replaces one desktop at a time, and a replacement takes up to four passes
    # (delete, create, start, enable): the bound grows with the desktops there are to replace
    for _ in range(4 * len(host.vms) + 12):
        host.now += spec.boot_timeout + spec.retry_backoff * 64
        host.step()
    assert {vm.version for vm in host.vms.values()} <= {host.target}


@dataclass
class SlowReadHost(RollingHost):
    """A loaded host: some passes the balancer's list cannot be read (the keeper sees no
    backend at all), or the guest agent of an old desktop answers too late (it looks not
    ready; the keeper learns a new desktop's readiness from agent events, not from a ping
    that can be late)."""

    blind_balancer: bool = False
    slow_agent: str | None = None

    def observe(self) -> Observed:
        observed = super().observe()
        clones = tuple(
            replace(
                c,
                backend=None if self.blind_balancer else c.backend,
                info=replace(c.info, ready=False) if c.name == self.slow_agent else c.info,
            )
            for c in observed.clones
        )
        orphans = () if self.blind_balancer else observed.orphan_backends
        return replace(observed, clones=clones, orphan_backends=orphans)

    def step(self, killed_after: int | None = None) -> list[Action]:
        try:
            return super().step(killed_after)
        finally:
            self.blind_balancer, self.slow_agent = False, None


def run_slow_reads(host: SlowReadHost, script: list[tuple[str, int, float]]) -> None:
    """The planner-property script, with passes whose reads are slow or fail."""
    plain: list[tuple[str, int, float]] = []
    for kind, pick, dt in script:
        if kind in ("blind-balancer", "slow-agent"):
            if plain:
                run_events(host, plain)
                plain = []
            old = sorted(n for n, vm in host.vms.items() if vm.version != host.target)
            host.blind_balancer = kind == "blind-balancer"
            host.slow_agent = old[pick % len(old)] if old and kind == "slow-agent" else None
            host.now += dt
            host.step()
        else:
            plain.append((kind, pick, dt))
    run_events(host, plain)


slow_events = st.lists(
    st.tuples(
        st.sampled_from(["tick", "login", "logoff", "rollout", "blind-balancer", "slow-agent"]),
        st.integers(0, 7),
        st.sampled_from([0.0, 1.0, 30.0]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(spec=specs, policy=rollouts, script=slow_events)
def test_a_rollout_never_runs_the_pool_dry_when_reads_are_slow_or_fail(
    spec: PoolSpec, policy: dict[str, int | bool | None], script: list[tuple[str, int, float]]
) -> None:
    spec = replace(spec, drain_deadline=None)
    host = SlowReadHost(spec, **policy)  # type: ignore[arg-type]
    run_slow_reads(host, [("tick", 0, 0.0), *script])
