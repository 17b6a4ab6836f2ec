"""The keeper while its hypervisor's daemon does not answer (libvirtd restarting or stopped):
calls fail with HypervisorUnavailableError. One line when it starts, one when it is over,
and no desktop pays for it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from imagepipe.errors import HypervisorUnavailableError
from imagepipe.pool.keeper import Keeper, KeeperOptions, NoHooks, PassReport
from imagepipe.pool.model import CloneState
from tests.unit.test_keeper import LAB, World, settle

DOWN = "libvirt at qemu:///system does not answer (Connection refused)"


class CountPasses(NoHooks):
    def __init__(self, passes: int) -> None:
        self.reports: list[PassReport | None] = []
        self.enough = threading.Event()
        self._passes = passes

    def after_pass(self, keeper: Keeper, report: PassReport | None, seconds: float) -> None:
        self.reports.append(report)
        if len(self.reports) >= self._passes:
            self.enough.set()


def test_a_hypervisor_down_for_several_passes_is_logged_once_and_its_return_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(store_path=tmp_path / "state.db")
    keeper = Keeper(
        hypervisor=world.hv,
        balancer=world.lb,
        store=world.store,
        images=world.images,
        specs=[LAB],
        clock=world.clock,
        settings=KeeperOptions(tick=0.01),
    )
    settle(keeper)
    world.hv.fail_next("list_clones", HypervisorUnavailableError(DOWN), times=4)
    hooks = CountPasses(6)
    keeper.hooks = hooks
    caplog.set_level(logging.DEBUG, logger="imagepipe.pool.keeper")
    runner = threading.Thread(target=keeper.run)
    runner.start()
    try:
        assert hooks.enough.wait(10), "the keeper stopped passing"
    finally:
        keeper.stop()
        runner.join(10)
        world.store.close()

    assert hooks.reports[:4] == [None] * 4 and hooks.reports[4] is not None
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in errors] == ["pass failed; retrying next tick"]
    assert DOWN in str(errors[0].__dict__)
    back = [r for r in caplog.records if r.getMessage() == "passes work again"]
    assert len(back) == 1 and back[0].levelno == logging.INFO


def test_a_call_cut_by_a_libvirtd_restart_is_retried_and_not_held_against_the_desktop(
    tmp_path: Path,
) -> None:
    world = World(store_path=tmp_path / "state.db")
    keeper = world.keeper(busy_backoff=0.5)
    try:
        world.hv.fail_next("start", HypervisorUnavailableError(DOWN))
        settle(keeper)

        records = world.store.load_pool("lab").clones.values()
        assert {r.state for r in records} == {CloneState.FREE}
        assert all(r.failures == 0 for r in records)
        assert world.store.load_pool("lab").failures == 0
    finally:
        world.store.close()
