"""bootstrap (the composition root) and its builders: the configured adapters, or a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepipe import schema
from imagepipe.app.bootstrap import bootstrap, build_balancer, build_hypervisor
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.null import NullBalancer
from imagepipe.config import BalancerSettings, HypervisorSettings, Settings
from imagepipe.errors import EnvironmentMissingError
from imagepipe.pool.model import Endpoint


def settings(tmp_path: Path, **changes: object) -> Settings:
    base = Settings(
        state_db=tmp_path / "state" / "state.db",
        run_dir=tmp_path / "run",
        registry=tmp_path / "registry",
        image_store=tmp_path / "images",
        pools_dir=tmp_path / "pools",
    )
    return schema.replace(base, **changes)


def test_balancer_none_accepts_everything_and_reports_nothing(tmp_path: Path) -> None:
    balancer = build_balancer(settings(tmp_path, balancer=BalancerSettings(driver="none")))

    assert isinstance(balancer, NullBalancer)
    balancer.ensure_frontend()
    balancer.enable("lab-0", Endpoint("127.0.0.1", 5900))
    balancer.drain("lab-0")
    balancer.remove("lab-0")
    assert balancer.list_backends() == []


def test_ipvs_builds_the_ipvs_adapter_on_its_vip(tmp_path: Path) -> None:
    cfg = BalancerSettings(driver="ipvs", vip="10.0.0.1")
    balancer = build_balancer(settings(tmp_path, balancer=cfg))
    assert isinstance(balancer, IPVSBalancer)
    assert balancer.vip == Endpoint("10.0.0.1", 3389)


def test_virtualbox_says_how_to_get_a_working_hypervisor(tmp_path: Path) -> None:
    cfg = HypervisorSettings(driver="virtualbox")
    with pytest.raises(EnvironmentMissingError, match=r"hypervisor\.driver: libvirt"):
        build_hypervisor(settings(tmp_path, hypervisor=cfg))


def test_bootstrap_makes_its_folders_and_reports_a_missing_hypervisor(
    tmp_path: Path,
) -> None:
    cfg = HypervisorSettings(driver="virtualbox")
    with pytest.raises(EnvironmentMissingError):
        bootstrap(settings(tmp_path, hypervisor=cfg))
    assert (tmp_path / "state").is_dir() and (tmp_path / "run").is_dir()
