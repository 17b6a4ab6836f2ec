"""What the IPVS adapter tells a user when the director is not ready, and the settings that
build it. (Its behaviour against the kernel is tested on a real IPVS kernel:
tests/integration/test_ipvs.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from imagepipe import doctor
from imagepipe.app.bootstrap import build_balancer
from imagepipe.balancers.ipvs import checks as ipvs_checks
from imagepipe.balancers.ipvs.balancer import IPVSBalancer
from imagepipe.balancers.ipvs.parse import Forward
from imagepipe.balancers.ipvs.runner import CommandResult
from imagepipe.config import BalancerSettings, Settings
from imagepipe.doctor import Status
from imagepipe.errors import BadInputError, BalancerError, EnvironmentMissingError
from imagepipe.pool.model import Endpoint


class ScriptedRunner:
    """Answers each command from a table of (argv prefix, exit code, stdout, stderr)."""

    def __init__(self, *answers: tuple[str, int, str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        self.calls.append(tuple(argv))
        line = " ".join(argv)
        for prefix, code, out, err in self.answers:
            if line.startswith(prefix):
                return CommandResult(tuple(argv), code, out, err)
        return CommandResult(tuple(argv), 127, "", f"sh: {argv[0]}: not found\n")


def adapter(runner: ScriptedRunner, **options: object) -> IPVSBalancer:
    return IPVSBalancer(vip="10.0.2.100", runner=runner, **options)  # type: ignore[arg-type]


def test_a_director_without_ipvsadm_says_to_install_it() -> None:
    with pytest.raises(EnvironmentMissingError, match="apt-get install ipvsadm"):
        adapter(ScriptedRunner()).ensure_frontend()


def test_a_kernel_without_ipvs_says_so() -> None:
    runner = ScriptedRunner(
        (
            "ipvsadm",
            2,
            "",
            "Can't initialize ipvs: Protocol not available\n"
            "Are you sure that IP Virtual Server is built in the kernel or as module?\n",
        )
    )
    with pytest.raises(EnvironmentMissingError, match="modprobe ip_vs"):
        adapter(runner).list_backends()


def test_direct_routing_refuses_a_desktop_on_another_port_than_the_vip() -> None:
    runner = ScriptedRunner(("ipvsadm -L", 0, "TCP  10.0.2.100:3389 wlc\n", ""), ("cat", 0, "", ""))
    balancer = adapter(runner, forward=Forward.DROUTE)

    with pytest.raises(BalancerError, match="takes the VIP's port 3389: use forward: masq"):
        balancer.enable("lab-1", Endpoint("10.0.0.21", 5901))
    assert not [c for c in runner.calls if c[:2] == ("ipvsadm", "-a")]


def test_unknown_scheduler_and_a_vip_that_is_no_address_are_refused() -> None:
    with pytest.raises(BalancerError, match="unknown IPVS scheduler 'fast'"):
        adapter(ScriptedRunner(), scheduler="fast")
    with pytest.raises(BalancerError, match="not an IP address"):
        IPVSBalancer(vip="director.example", runner=ScriptedRunner())


def test_settings_build_the_ipvs_adapter_with_every_key(tmp_path: Path) -> None:
    settings = Settings(
        balancer=BalancerSettings(
            driver="ipvs",
            vip="10.0.0.10",
            port=3390,
            scheduler="lc",
            forward="droute",
            persistence=600.0,
            ipvs_names_file=tmp_path / "names",
            ipvs_sysctls=False,
        )
    )
    balancer = build_balancer(settings)

    assert isinstance(balancer, IPVSBalancer)
    assert (balancer.vip, balancer.scheduler, balancer.forward, balancer.persistence) == (
        Endpoint("10.0.0.10", 3390),
        "lc",
        Forward.DROUTE,
        600,
    )
    assert (balancer.names_file, balancer.set_sysctls) == (str(tmp_path / "names"), False)


def test_ipvs_without_a_vip_is_bad_input() -> None:
    with pytest.raises(BadInputError, match=r"needs balancer\.vip"):
        build_balancer(Settings(balancer=BalancerSettings(driver="ipvs")))


# -- doctor ---------------------------------------------------------------------------------

IP_ADDR = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "2: eth0    inet 10.0.2.15/24 scope global eth0\\       valid_lft forever\n"
    "2: eth0    inet 10.0.2.100/24 scope global secondary eth0\\       valid_lft forever\n"
)


def ipvs_settings(**changes: object) -> Settings:
    options: dict[str, object] = {"driver": "ipvs", "vip": "10.0.2.100", **changes}
    return Settings(balancer=BalancerSettings(**options))  # type: ignore[arg-type]


def test_doctor_on_a_ready_director_is_all_ok() -> None:
    runner = ScriptedRunner(
        ("cat /proc/net/ip_vs", 0, "IP Virtual Server version 1.2.1 (size=4096)\n", ""),
        ("sh -c command -v ipvsadm", 0, "/sbin/ipvsadm\n", ""),
        ("ip -o addr show", 0, IP_ADDR, ""),
        ("sysctl -n net.ipv4.vs", 0, "1\n0\n", ""),
        ("sysctl -n net.ipv4.ip_forward", 0, "1\n", ""),
    )

    checks = doctor.check_ipvs(ipvs_settings(), runner)

    assert [(c.check, c.status) for c in checks] == [
        ("ipvs-module", Status.OK),
        ("ipvsadm", Status.OK),
        ("ipvs-vip", Status.OK),
        ("ipvs-sysctls", Status.OK),
        ("ipvs-forwarding", Status.OK),
    ]
    assert checks[2].detail == "10.0.2.100 is on eth0"


def test_doctor_on_a_bare_host_says_what_to_fix_for_each_part() -> None:
    runner = ScriptedRunner(
        ("ip -o addr show", 0, IP_ADDR.splitlines()[0] + "\n", ""),
        ("sysctl -n net.ipv4.vs", 255, "", "sysctl: cannot stat /proc/sys/net/ipv4/vs\n"),
        ("sysctl -n net.ipv4.ip_forward", 0, "0\n", ""),
    )

    checks = {c.check: c for c in doctor.check_ipvs(ipvs_settings(ipvs_sysctls=False), runner)}

    assert checks["ipvs-module"].status is Status.FAIL
    assert "CONFIG_IP_VS" in (checks["ipvs-module"].fix or "")
    assert checks["ipvsadm"].fix == "apt-get install ipvsadm"
    assert (checks["ipvs-vip"].fix or "").startswith("ip addr add 10.0.2.100/32 dev eth0")
    assert checks["ipvs-sysctls"].status is Status.FAIL
    assert "expire_nodest_conn=1" in (checks["ipvs-sysctls"].fix or "")
    assert (checks["ipvs-forwarding"].fix or "").startswith("sysctl -w net.ipv4.ip_forward=1")


def test_doctor_lets_the_keeper_set_the_sysctls_when_it_manages_them() -> None:
    runner = ScriptedRunner(("sysctl -n net.ipv4.vs", 0, "0\n1\n", ""))

    check = ipvs_checks.check_ipvs_sysctls(runner, managed=True)

    assert check.status is Status.OK
    assert "expire_nodest_conn=0" in check.detail and "the keeper sets" in check.detail
