"""A rollout moves a channel in the registry and says who did it and why; the rollout's
status shows the old free desktops it still holds as free (what the keeper acts on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe.app.status import load_records, pool_status
from imagepipe.errors import BadInputError
from imagepipe.images.registry import Registry
from imagepipe.pool.model import Observed, PoolSpec
from imagepipe.pool.observe import observe
from imagepipe.pool.ports import Channels
from imagepipe.pool.rollout.records import Rollout, RolloutState
from imagepipe.stores.sqlite import SQLiteStore
from tests.fakes.balancer import FakeBalancer
from tests.fakes.hypervisor import FakeClock, FakeHypervisor, FakeImages, FakeVersion
from tests.unit.test_images_registry import _register


def test_the_registry_moves_a_channel_for_a_rollout_with_who_and_why(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry", tmp_path / "images")
    _register(registry, tmp_path, "a")
    _register(registry, tmp_path, "b")
    registry.promote("tiny", 1, "stable")
    assert isinstance(registry, Channels)

    registry.move_channel("tiny", "stable", 2, by="rollout #1 by root@vdi (rollout)")

    assert registry.channel_version("tiny", "stable") == 2
    assert registry.channels("tiny")["stable"][-1].by == "rollout #1 by root@vdi (rollout)"
    assert registry.newest_version("tiny") == 2
    registry.revoke("tiny", 2, "broken")
    assert registry.newest_version("tiny") == 1
    with pytest.raises(BadInputError, match="roll out another version"):
        registry.move_channel("tiny", "stable", 2, by="x")


def test_status_shows_the_old_free_desktops_a_rollout_holds_as_free(tmp_path: Path) -> None:
    from imagepipe.pool.keeper import Keeper

    spec = PoolSpec(name="lab", image="tiny", channel="stable", initial=2, free=2, max=4)
    clock = FakeClock()
    hv, images, lb = FakeHypervisor(clock=clock.now), FakeImages(), FakeBalancer()
    hv.add_base(images.publish("tiny", 1, channel="stable"))
    hv.boot_ticks = 5  # new desktops take a while
    store = SQLiteStore(tmp_path / "state.db")
    keeper = Keeper(
        hypervisor=hv, balancer=lb, store=store, images=images, specs=[spec], clock=clock
    )
    for _ in range(10):
        keeper.run_pass()
        hv.tick()
    images.versions["tiny"].add(2)
    hv.add_base(FakeVersion("tiny", 2).base_image())
    store.add_rollout(
        Rollout(
            id=0,
            image="tiny",
            channel="stable",
            pools=("lab",),
            from_version=1,
            to_version=2,
            state=RolloutState.IN_PROGRESS,
            created_at=clock.now(),
        )
    )
    images.channels[("tiny", "stable")] = 2
    keeper.run_pass()

    records, _ = load_records(store, [spec], clock.now())
    observed = observe(hv, lb, images, [spec]).pools.get("lab", Observed())
    pool = pool_status(spec, observed, records["lab"], None, clock.now())

    old = [c for c in pool.clones if c.version == 1]
    assert [c.state for c in old] == ["free", "free"]
    assert pool.free == 2
    store.close()
