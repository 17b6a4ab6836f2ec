"""What the executor makes of each hypervisor error: only a clone that is really gone counts
as stopped or deleted; a VM imagepipe did not make and a base that is gone are failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.pool.actions import CreateClone, DeleteClone, StopClone
from imagepipe.pool.executor import Executor
from imagepipe.pool.model import Endpoint, PoolSpec, Power
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages

LAB = PoolSpec(name="lab", image="tiny", max=8, port_first=5900, port_last=5907, max_failures=2)
SPECS = {"lab": LAB}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture
def images() -> FakeImages:
    return FakeImages()


@pytest.fixture
def hv(images: FakeImages) -> FakeHypervisor:
    fake = FakeHypervisor()
    fake.add_base(images.publish("tiny", 1))
    return fake


@pytest.fixture
def executor(hv: FakeHypervisor, images: FakeImages, store: SQLiteStore) -> Executor:
    return Executor(
        hv,
        FakeBalancer(),
        store,
        lambda image, version: images.resolve(image, version).base_image(),
        FakeClock(),
    )


@pytest.mark.parametrize(
    "action",
    [StopClone(pool="lab", clone="lab-3"), DeleteClone(pool="lab", clone="lab-3")],
    ids=["stop", "delete"],
)
def test_stopping_or_deleting_a_vm_imagepipe_did_not_make_fails_and_leaves_it_running(
    executor: Executor, hv: FakeHypervisor, store: SQLiteStore, action: StopClone | DeleteClone
) -> None:
    hv.add_foreign("lab-3", Power.RUNNING)

    report = executor.run(SPECS, [action])

    (outcome,) = report.outcomes
    assert not outcome.ok
    assert outcome.error is not None and "did not make" in outcome.error
    assert hv.foreign == {"lab-3": Power.RUNNING}
    (entry,) = store.journal_recent("lab", 5)
    assert entry.ok is False


@pytest.mark.parametrize(
    "action",
    [StopClone(pool="lab", clone="lab-4"), DeleteClone(pool="lab", clone="lab-4")],
    ids=["stop", "delete"],
)
def test_stopping_or_deleting_a_clone_that_is_gone_is_done(
    executor: Executor, action: StopClone | DeleteClone
) -> None:
    report = executor.run(SPECS, [action])

    assert report.ok


def test_a_clone_is_not_made_from_a_base_that_is_gone_and_the_error_names_the_version(
    executor: Executor, hv: FakeHypervisor, images: FakeImages
) -> None:
    hv.remove_base(images.publish("tiny", 1))
    create = CreateClone(
        pool="lab", clone="lab-1", slot=1, version=1, display=Endpoint("127.0.0.1", 5901)
    )

    report = executor.run(SPECS, [create])

    (outcome,) = report.outcomes
    assert not outcome.ok
    assert outcome.error is not None and "tiny v1" in outcome.error
    assert hv.count("create_clone") == 1  # final: not retried like a busy hypervisor
    assert hv.list_clones() == []
