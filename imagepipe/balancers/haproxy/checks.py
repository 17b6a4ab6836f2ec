"""Host checks of the HAProxy balancer (for `imagepipe doctor`): a managed HAProxy is installed
and reports its version, an unmanaged one answers on its admin socket. They only look: no
HAProxy is started."""

from __future__ import annotations

import re
import subprocess

from imagepipe.balancers.haproxy.balancer import HAProxyBalancer
from imagepipe.checks import INSTALL, Check, fail, ok
from imagepipe.errors import EnvironmentMissingError

_HAPROXY_VERSION = re.compile(r"version (\S+)", re.IGNORECASE)


def check_haproxy(balancer: HAProxyBalancer, bind: str) -> Check:
    """The `balancer` line for HAProxy: what answers where, or what to do."""
    socket = balancer.admin.path
    if not balancer.manage:
        if not balancer.admin.answers():
            return fail(
                "balancer",
                f"no HAProxy answers on the admin socket {socket} (manage: false)",
                "start your HAProxy with 'stats socket <path> level admin' and set "
                "balancer.admin_socket to that path, or set balancer.manage: true",
            )
        reply = balancer.admin.command("show version").strip()
        return ok("balancer", f"HAProxy {reply} answers on {socket} (manage: false)")
    try:
        program = balancer.process().program
    except EnvironmentMissingError as exc:
        return fail("balancer", str(exc), INSTALL)
    version = haproxy_version(program)
    if version is None:
        return fail(
            "balancer",
            f"{program} -v does not report a version",
            "reinstall haproxy (apt-get install --reinstall haproxy)",
        )
    running = (
        f"running, answers on {socket}"
        if balancer.admin.answers()
        else "not running: `imagepipe keep` starts it"
    )
    return ok(
        "balancer",
        f"haproxy {version} at {program}, managed, bind {bind}; {running}",
    )


def haproxy_version(program: str) -> str | None:
    """`haproxy -v`: 'HAProxy version 2.6.12-1+deb12u1 2023/12/16 ...' -> '2.6.12-1+deb12u1'."""
    try:
        done = subprocess.run(
            [program, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _HAPROXY_VERSION.search(done.stdout)
    return match[1] if done.returncode == 0 and match else None
