"""Simulated `vboxapi`: the module VirtualBox's SDK installs, as pyvbox uses it.

pyvbox touches only this much of it: `VirtualBoxManager(style, params)`, its
`getVirtualBox()`, `getSessionObject(vbox)` (or `.mgr.getSessionObject`), `queryInterface(obj,
name)` (casting an IEvent to its specific interface) and `getBinDir()`. The API objects come
from tests/vboxsim/api.py and talk to the simulated host `tests.vboxsim.api.HOSTS.current()`.
Tests put tests/vboxsim on sys.path (tests.vboxsim.install()) so `import vboxapi` finds this.
"""

from __future__ import annotations

from typing import Any

from tests.vboxsim.api import HOSTS, Session, VirtualBox

__all__ = ["VirtualBoxManager"]


class VirtualBoxManager:
    def __init__(self, style: str | None = None, params: Any = None) -> None:
        if style not in (None, "XPCOM", "MSCOM"):
            raise NotImplementedError(f"the simulator has no {style} binding")
        self.type = style or "XPCOM"
        self.mgr = self
        self.constants = None

    def getVirtualBox(self) -> VirtualBox:
        return HOSTS.current().vbox

    def getSessionObject(self, vbox: Any = None) -> Session:
        HOSTS.current()
        return Session()

    def queryInterface(self, obj: Any, name: str) -> Any:
        return obj

    def getBinDir(self) -> str:
        return str(HOSTS.current().home / "bin")

    def getArray(self, obj: Any, field: str) -> Any:
        return getattr(obj, field)

    def waitForEvents(self, timeout: int) -> int:
        return 0

    def interruptWaitEvents(self) -> bool:
        return True
