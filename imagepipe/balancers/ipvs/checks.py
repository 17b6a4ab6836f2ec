"""Host checks of the IPVS balancer (for `imagepipe doctor`): the director's kernel module,
ipvsadm, the VIP on an interface, the sysctls drains need, and forwarding for masq. Read-only:
nothing is loaded (no ipvsadm call, which would load ip_vs) or set."""

from __future__ import annotations

from collections.abc import Sequence

from imagepipe.balancers.ipvs.balancer import SYSCTLS, IPVSBalancer
from imagepipe.balancers.ipvs.parse import format_endpoint
from imagepipe.balancers.ipvs.runner import CommandResult, CommandRunner, LocalRunner
from imagepipe.checks import Check, fail, ok
from imagepipe.errors import ImagepipeError


def describe(balancer: IPVSBalancer) -> Check:
    """The `balancer` line for IPVS: the virtual service the keeper keeps."""
    return ok(
        "balancer",
        f"ipvs: virtual service {format_endpoint(balancer.vip)}, scheduler "
        f"{balancer.scheduler}, forward {balancer.forward.value}, persistence "
        f"{balancer.persistence or 'off'}",
    )


def check_director(
    vip: str, *, forward: str, managed_sysctls: bool, runner: CommandRunner | None = None
) -> list[Check]:
    """The IPVS director: kernel module, ipvsadm, the VIP on an interface, the sysctls."""
    run = _Probe(runner or LocalRunner(timeout=10))
    return [
        check_ipvs_module(run),
        check_ipvsadm(run),
        check_ipvs_vip(run, vip),
        check_ipvs_sysctls(run, managed=managed_sysctls),
        check_ipvs_forwarding(run, forward),
    ]


def check_ipvs_module(run: CommandRunner) -> Check:
    if run.run(["cat", "/proc/net/ip_vs"]).ok:
        return ok("ipvs-module", "ip_vs is loaded")
    if run.run(["modprobe", "-n", "-q", "ip_vs"]).ok:
        return ok("ipvs-module", "ip_vs is not loaded but loadable: ipvsadm loads it at start")
    return fail(
        "ipvs-module",
        "this kernel has no ip_vs module",
        "boot a kernel with CONFIG_IP_VS (Debian's linux-image-amd64 or -cloud-amd64 has it), "
        "or set balancer.driver: haproxy",
    )


def check_ipvsadm(run: CommandRunner) -> Check:
    found = run.run(["sh", "-c", "command -v ipvsadm"])
    if found.ok and found.stdout.strip():
        return ok("ipvsadm", f"ipvsadm at {found.stdout.strip()}")
    return fail("ipvsadm", "ipvsadm is not installed", "apt-get install ipvsadm")


def check_ipvs_vip(run: CommandRunner, vip: str) -> Check:
    listed = run.run(["ip", "-o", "addr", "show"])
    configured = {
        words[3].split("/")[0]: words[1]
        for words in (line.split() for line in listed.stdout.splitlines())
        if len(words) > 3 and words[2] in ("inet", "inet6")
    }
    if vip in configured:
        return ok("ipvs-vip", f"{vip} is on {configured[vip]}")
    return fail(
        "ipvs-vip",
        f"the VIP {vip} is on no interface of the director",
        f"ip addr add {vip}/32 dev eth0 (and in /etc/network/interfaces so it survives a "
        "reboot), or point balancer.vip at an address the director has",
    )


def check_ipvs_sysctls(run: CommandRunner, *, managed: bool) -> Check:
    keys = list(SYSCTLS)
    read = run.run(["sysctl", "-n", *keys])
    values = read.stdout.split()
    wrong = [f"{k}={v}" for k, v in zip(keys, values, strict=False) if v != SYSCTLS[k]]
    if read.ok and len(values) == len(keys) and not wrong:
        return ok("ipvs-sysctls", ", ".join(f"{k}={v}" for k, v in SYSCTLS.items()))
    wanted = " ".join(f"{k}={v}" for k, v in SYSCTLS.items())
    found = ", ".join(wrong) if read.ok else "not readable (ip_vs not loaded yet)"
    if managed:
        return ok("ipvs-sysctls", f"{found}: the keeper sets {wanted} at start")
    return fail(
        "ipvs-sysctls",
        f"{found}; drained desktops and removed ones need {wanted}",
        f"sysctl -w {wanted} (and in /etc/sysctl.d/), or set balancer.ipvs_sysctls: true",
    )


def check_ipvs_forwarding(run: CommandRunner, forward: str) -> Check:
    if forward != "masq":
        return ok(
            "ipvs-forwarding",
            "droute: each desktop needs the VIP on its loopback with arp_ignore=1 and "
            "arp_announce=2 (not checkable from the director)",
        )
    value = run.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    if value == "1":
        return ok("ipvs-forwarding", "masq: net.ipv4.ip_forward=1")
    return fail(
        "ipvs-forwarding",
        f"masq needs the director to forward packets, but net.ipv4.ip_forward={value or '?'}",
        "sysctl -w net.ipv4.ip_forward=1 (and in /etc/sysctl.d/); the desktops' default "
        "route must point at the director",
    )


class _Probe:
    """A runner for looking only: a program that is missing is an answer (exit 127)."""

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        try:
            return self.runner.run(argv, stdin=stdin)
        except ImagepipeError as exc:
            return CommandResult(tuple(argv), 127, "", str(exc))
