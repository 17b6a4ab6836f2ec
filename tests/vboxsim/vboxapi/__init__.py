"""Simulated `vboxapi`: the module VirtualBox's SDK installs, as pyvbox uses it.

pyvbox touches only this much of it: `VirtualBoxManager(style, params)`, its
`getVirtualBox()`, `getSessionObject(vbox)` (or `.mgr.getSessionObject`), `queryInterface(obj,
name)` (casting an IEvent to its specific interface) and `getBinDir()`. The API objects come
from tests/vboxsim/api.py and talk to the simulated host `tests.vboxsim.api.HOSTS.current()`.
Tests put tests/vboxsim on sys.path (tests.vboxsim.install()) so `import vboxapi` finds this.

With $IMAGEPIPE_VBOXSIM_SOCKET set, the API objects are proxies to a simulated VBoxSVC in its
own process (tests/vboxsim/remote.py), so a keeper process and the test share one VirtualBox.
"""

from __future__ import annotations

import os
from typing import Any

from tests.vboxsim.api import HOSTS, Session, VirtualBox
from tests.vboxsim.remote import connect

__all__ = ["VirtualBoxManager"]


class VirtualBoxManager:
    def __init__(self, style: str | None = None, params: Any = None) -> None:
        if style not in (None, "XPCOM", "MSCOM"):
            raise NotImplementedError(f"the simulator has no {style} binding")
        self.type = style or "XPCOM"
        self.mgr = self
        self.constants = None
        self._connections: dict[str, Any] = {}

    @property
    def _remote(self) -> Any:
        """The simulated VBoxSVC process named by $IMAGEPIPE_VBOXSIM_SOCKET, if any (read on
        each use: pyvbox keeps one manager per process for its whole life)."""
        path = os.environ.get("IMAGEPIPE_VBOXSIM_SOCKET")
        if not path:
            return None
        if path not in self._connections:
            self._connections[path] = connect(path)
        return self._connections[path]

    def getVirtualBox(self) -> VirtualBox | Any:
        remote = self._remote
        if remote is not None:
            return _root(remote)
        return HOSTS.current().vbox

    def getSessionObject(self, vbox: Any = None) -> Session | Any:
        remote = self._remote
        if remote is not None:
            return remote.ask("session", 0)
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


def _root(remote: Any) -> Any:
    """The server's IVirtualBox (reference 0 is the server's VirtualBox object)."""
    from tests.vboxsim.remote import Remote

    return Remote(remote, 0)
