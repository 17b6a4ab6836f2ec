"""What a host check returns: one line of `imagepipe doctor`'s report.

Each driver keeps its checks beside it (hypervisors/libvirt/checks.py, balancers/ipvs/checks.py,
...); doctor.py composes them with the checks of settings, pools, files and the registry.

    ok("kvm", "/dev/kvm is usable")
    fail("ipvsadm", "ipvsadm is not installed", "apt-get install ipvsadm")
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

INSTALL = "run ./install.sh"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report. `fix` says what to do; None when the check is ok."""

    check: str
    status: Status
    detail: str
    fix: str | None = None


def ok(check: str, detail: str) -> Check:
    return Check(check, Status.OK, detail)


def warn(check: str, detail: str, fix: str) -> Check:
    return Check(check, Status.WARN, detail, fix)


def fail(check: str, detail: str, fix: str) -> Check:
    return Check(check, Status.FAIL, detail, fix)
