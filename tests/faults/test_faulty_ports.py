"""The faulty wrappers: transparent when quiet (each port's contract suite passes through
them, over the fakes and over real HAProxy and libvirt), and each fault does what the real
system does when it fails that way."""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import (
    BalancerError,
    BusyError,
    FatalHypervisorError,
    InvalidStateError,
)
from imagepipe.pool.model import BaseImage, CloneMode, CloneSpec, Endpoint, Power
from imagepipe.pool.ports import Balancer, Hypervisor
from tests.contract import test_hypervisor_fake as fake_contract
from tests.contract.balancer_suite import BalancerContract
from tests.contract.test_balancer_fake import FakeHarness
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeHypervisor, FakeImages
from tests.faults.injector import (
    CrashAt,
    CrashedCall,
    CrashPoint,
    FaultInjector,
    FaultKind,
    KeeperCrash,
)
from tests.faults.ports import FaultyBalancer, FaultyHypervisor
from tests.integration import test_libvirt_contract as libvirt_contract
from tests.integration.balancers import HAProxyHarness, haproxy_harness  # noqa: F401 (fixture)
from tests.integration.test_libvirt_contract import tiny_base, workdir  # noqa: F401 (fixtures)

BASE = FakeImages().publish("tiny", 1)


def quiet() -> FaultInjector:
    return FaultInjector(rng=random.Random(0))


def only(kind: FaultKind, seed: int = 0) -> FaultInjector:
    return FaultInjector(rng=random.Random(seed), kinds={kind}, rate=1.0, late_by=0.0)


def spec(slot: int = 0, base: BaseImage = BASE, pool: str = "lab") -> CloneSpec:
    return CloneSpec(
        name=f"{pool}-{slot}",
        pool=pool,
        slot=slot,
        base=base,
        mode=CloneMode.LINKED,
        cpus=1,
        memory=256 * 1024**2,
        display=Endpoint("127.0.0.1", 7200 + slot),
    )


@pytest.fixture
def fake() -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.add_base(BASE)
    return hv


# ---- transparent when no fault is scheduled ---------------------------------------------


class TestQuietFaultyHypervisorOverTheFake(fake_contract.TestFakeHypervisor):
    """The fake's own contract class (its base, foreign VM, running base and occupied
    display fixtures act on the wrapped fake), with the port under test wrapped."""

    @pytest.fixture
    def hypervisor(self, fake_hv: FakeHypervisor) -> Hypervisor:
        return FaultyHypervisor(fake_hv, quiet())


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.opt_in(
    "IMAGEPIPE_FAULT_ROUNDS",
    reason="long profile only (IMAGEPIPE_FAULT_ROUNDS=N): a minute of TCG guests that repeats "
    "tests/integration/test_libvirt_contract.py through a wrapper the fake's contract proves",
)
class TestQuietFaultyHypervisorOverLibvirt(libvirt_contract.TestLibvirtHypervisor):
    """The real libvirt contract class (its tiny base, foreign domain, running base), with
    the port under test wrapped."""

    @pytest.fixture
    def hypervisor(
        self,
        require_libvirt: str,
        workdir: Path,  # noqa: F811
        contract_pool: str,
    ) -> Iterator[Hypervisor]:
        from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor

        inner = LibvirtHypervisor(require_libvirt, state_dir=workdir / "state")
        try:
            yield FaultyHypervisor(inner, quiet())
        finally:
            for clone in inner.list_clones():
                if clone.pool == contract_pool:
                    inner.delete(clone.name)
            inner.close()


class TestQuietFaultyBalancerOverTheFake(BalancerContract):
    @pytest.fixture
    def inner(self) -> FakeBalancer:
        return FakeBalancer()

    @pytest.fixture
    def harness(self, inner: FakeBalancer) -> FakeHarness:
        return FakeHarness(inner)

    @pytest.fixture
    def balancer(self, inner: FakeBalancer) -> Balancer:
        return FaultyBalancer(inner, quiet())


@pytest.mark.real
class TestQuietFaultyBalancerOverHAProxy(BalancerContract):
    @pytest.fixture
    def harness(self, haproxy_harness: HAProxyHarness) -> HAProxyHarness:  # noqa: F811
        return haproxy_harness

    @pytest.fixture
    def balancer(self, haproxy_harness: HAProxyHarness) -> Balancer:  # noqa: F811
        adapter = haproxy_harness.new_adapter()
        adapter.ensure_frontend()
        return FaultyBalancer(adapter, quiet())


# ---- each fault, as the real systems fail ------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (FaultKind.BUSY, BusyError),
        (FaultKind.INVALID, InvalidStateError),
        (FaultKind.FATAL, FatalHypervisorError),
    ],
)
def test_a_refused_hypervisor_call_raises_the_adapters_typed_error_and_changes_nothing(
    fake: FakeHypervisor, kind: FaultKind, error: type[Exception]
) -> None:
    hv = FaultyHypervisor(fake, only(kind))

    with pytest.raises(error, match="injected"):
        hv.create_clone(spec())
    assert fake.clones == {}


def test_a_refused_balancer_call_raises_a_balancer_error_and_changes_nothing() -> None:
    inner = FakeBalancer()
    lb = FaultyBalancer(inner, only(FaultKind.BUSY))

    with pytest.raises(BalancerError, match="locked"):
        lb.enable("lab-0", Endpoint("127.0.0.1", 7200))
    assert inner.list_backends() == []


def test_a_half_failed_create_leaves_the_clone_defined_but_reports_failure(
    fake: FakeHypervisor,
) -> None:
    hv = FaultyHypervisor(fake, only(FaultKind.HALF_CREATE))

    with pytest.raises(FatalHypervisorError, match="half-way"):
        hv.create_clone(spec())
    assert fake.clones["lab-0"].power is Power.SHUTOFF


def test_a_late_answer_comes_after_the_work_is_done(fake: FakeHypervisor) -> None:
    injector = only(FaultKind.TIMEOUT)
    injector.late_by = 0.01
    FaultyHypervisor(fake, injector).create_clone(spec())

    assert "lab-0" in fake.clones
    assert [i.kind for i in injector.injected] == ["timeout"]


def test_a_hanging_call_never_reaches_the_system_and_fails_when_released(
    fake: FakeHypervisor,
) -> None:
    injector = only(FaultKind.HANG)
    hv = FaultyHypervisor(fake, injector)
    errors: list[Exception] = []

    def call() -> None:
        try:
            hv.create_clone(spec())
        except FatalHypervisorError as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(0.05)
    assert worker.is_alive(), "the call should hang until released"
    injector.release_hangs()
    worker.join(5)
    assert len(errors) == 1 and fake.clones == {}


def test_reads_only_fail_they_never_hang(fake: FakeHypervisor) -> None:
    hv = FaultyHypervisor(fake, only(FaultKind.HANG))

    assert hv.list_clones() == []  # a hang applies to actions only


def test_the_same_seed_injects_the_same_faults_on_the_same_calls(fake: FakeHypervisor) -> None:
    def run(seed: int) -> list[str]:
        injector = FaultInjector(
            rng=random.Random(seed), kinds={FaultKind.BUSY, FaultKind.FATAL}, rate=0.5
        )
        hv = FaultyHypervisor(FakeHypervisor(), injector)
        for _ in range(20):
            with contextlib.suppress(BusyError, FatalHypervisorError):
                hv.list_clones()
        return [i.kind for i in injector.injected]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- a keeper killed at a call ----------------------------------------------------------


def test_a_kill_before_the_call_leaves_the_host_unchanged_and_every_later_call_dies(
    fake: FakeHypervisor,
) -> None:
    injector = quiet()
    saved: list[str] = []
    injector.crash_at(
        CrashAt("create_clone", 1, CrashPoint.BEFORE), on_crash=lambda: saved.append("db")
    )
    hv = FaultyHypervisor(fake, injector)

    with pytest.raises(KeeperCrash):
        hv.create_clone(spec())
    assert fake.clones == {} and saved == ["db"]
    with pytest.raises(KeeperCrash):
        hv.list_clones()


def test_a_kill_after_the_call_leaves_its_effect_and_worker_threads_unwind_quickly(
    fake: FakeHypervisor,
) -> None:
    injector = quiet()
    injector.crash_at(CrashAt("create_clone", 2, CrashPoint.AFTER))
    hv = FaultyHypervisor(fake, injector)
    hv.create_clone(spec(0))
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            hv.create_clone(spec(1))
        except CrashedCall as exc:
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)

    assert sorted(fake.clones) == ["lab-0", "lab-1"]
    assert len(outcome) == 1 and injector.crashed


# ---- over real libvirt -----------------------------------------------------------------


@pytest.mark.real
def test_over_real_libvirt_a_half_failed_create_leaves_a_real_domain_that_delete_removes(
    require_libvirt: str,
) -> None:
    from imagepipe.hypervisors.libvirt.hypervisor import LibvirtHypervisor
    from tests.guest import tiny_base_image

    root = Path(tempfile.mkdtemp(prefix="ipf-", dir="/tmp"))  # short socket paths
    libvirt = LibvirtHypervisor(require_libvirt, state_dir=root / "state")
    try:
        base = tiny_base_image(root / "tiny-v1")
        hv = FaultyHypervisor(libvirt, only(FaultKind.HALF_CREATE))
        with pytest.raises(FatalHypervisorError):
            hv.create_clone(spec(0, base, pool="k9half"))

        assert [c.name for c in libvirt.list_clones() if c.pool == "k9half"] == ["k9half-0"]
        libvirt.delete("k9half-0")
        assert [c.name for c in libvirt.list_clones() if c.pool == "k9half"] == []
        assert not list((root / "state").rglob("k9half-*"))
    finally:
        for clone in libvirt.list_clones():
            if clone.pool == "k9half":
                libvirt.delete(clone.name)
        libvirt.close()
        shutil.rmtree(root, ignore_errors=True)
