"""The simulated VBoxSVC as its own process, so several imagepipe processes (the keeper,
`status`, the test) share one VirtualBox, as on a real host.

    python -m tests.vboxsim.remote --home DIR --socket PATH [--version 7.0.14] [--qemu]

Clients (`vboxapi` with $IMAGEPIPE_VBOXSIM_SOCKET set) get `Remote` proxies: reading an
attribute asks the server each time (values are live, as with XPCOM), methods are real bound
methods (pyvbox checks inspect.ismethod), API objects travel as references, and a SimCOMError
comes back with its errno. Wire: 4-byte length + pickle; API objects are pickled by reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import signal
import socket
import socketserver
import struct
import threading
import types
from io import BytesIO
from pathlib import Path
from typing import Any

from tests.vboxsim import api
from tests.vboxsim.codes import SimCOMError

_BY_REFERENCE = (
    api.VirtualBox, api.Machine, api.Session, api.Console, api.Progress, api.Event,
    api.EventSource, api.Listener, api.Medium, api.Snapshot, api.VRDEServer,
    api.VRDEServerInfo, api.MediumAttachment, api.ErrorInfo, api.Host, api.MachineData,
    api.Appliance, api.VirtualSystemDescription, api.FirmwareSettings,
)  # fmt: skip


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def _recv(sock: socket.socket) -> bytes:
    header = _exactly(sock, 4)
    return _exactly(sock, struct.unpack("!I", header)[0])


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("simulated VBoxSVC connection closed")
        data += chunk
    return bytes(data)


# -- server --------------------------------------------------------------------------------------


class _Objects:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.table: dict[int, Any] = {}
        self._by_identity: dict[int, int] = {}

    def ref(self, obj: Any) -> int:
        with self._lock:
            known = self._by_identity.get(id(obj))
            if known is not None and self.table.get(known) is obj:
                return known
            ref = next(self._ids)
            self.table[ref] = obj
            self._by_identity[id(obj)] = ref
            return ref


OBJECTS = _Objects()


class _ServerPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _BY_REFERENCE):
            return ("ref", OBJECTS.ref(obj))
        return None


class _ServerUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return OBJECTS.table[pid[1]] if pid[1] else api.HOSTS.current().vbox


def _dump_server(value: Any) -> bytes:
    out = BytesIO()
    _ServerPickler(out).dump(value)
    return out.getvalue()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                request = _ServerUnpickler(BytesIO(_recv(self.request))).load()
            except (ConnectionError, OSError):
                return
            _send(self.request, _dump_server(self._answer(*request)))

    def _answer(
        self, op: str, ref: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            target = OBJECTS.table[ref] if ref else api.HOSTS.current().vbox
            if op == "host":
                return ("value", api.HOSTS.current())
            if op == "console":  # test hook: the serial console of a running machine
                process = api.HOSTS.current().by_name(name).process
                return ("value", str(getattr(process, "console_path", "")))
            if op == "session":
                return ("value", api.Session())
            if op == "getattr":
                value = getattr(target, name)
                if callable(value) and not isinstance(value, _BY_REFERENCE):
                    return ("method",)
                return ("value", value)
            if op == "setattr":
                setattr(target, name, args[0])
                return ("value", None)
            if op == "call":
                return ("value", getattr(target, name)(*args, **kwargs))
            raise ValueError(f"unknown operation {op}")
        except SimCOMError as exc:
            return ("com", exc.errno, exc.msg)
        except AttributeError as exc:
            return ("attr", str(exc))
        except TypeError as exc:
            return ("type", str(exc))
        except Exception as exc:
            return ("other", f"{type(exc).__name__}: {exc}")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(home: Path, path: Path, version: str, qemu: bool) -> None:
    factory: api.ProcessFactory = api.MemoryProcess
    if qemu:
        from tests.vboxsim.process import QemuProcess

        factory = QemuProcess
    host = api.Host(home, version=version, process_factory=factory)
    api.HOSTS.use(host)
    path.unlink(missing_ok=True)
    server = _Server(str(path), _Handler)

    def stop(_signo: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        host.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)


# -- client ----------------------------------------------------------------------------------------


class RemoteError(Exception):
    """A SimCOMError from the server: errno and msg as the XPCOM bindings give them."""

    def __init__(self, errno: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = errno
        self.msg = msg


class Connection:
    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    def _sock(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.path)
            self._local.sock = sock
        return sock

    def ask(
        self,
        op: str,
        ref: int,
        name: str = "",
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = BytesIO()
        _ClientPickler(out).dump((op, ref, name, args, kwargs or {}))
        sock = self._sock()
        _send(sock, out.getvalue())
        reply = _ClientUnpickler(BytesIO(_recv(sock)), self).load()
        kind = reply[0]
        if kind == "value":
            return reply[1]
        if kind == "method":
            return _METHOD
        if kind == "com":
            raise RemoteError(reply[1], reply[2])
        if kind == "attr":
            raise AttributeError(reply[1])
        if kind == "type":
            raise TypeError(reply[1])
        raise RuntimeError(reply[1])


_METHOD = object()


class Remote:
    """A server-side API object. Attribute reads are live; methods are bound methods."""

    def __init__(self, connection: Connection, ref: int) -> None:
        object.__setattr__(self, "_conn", connection)
        object.__setattr__(self, "_ref", ref)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = self._conn.ask("getattr", self._ref, name)
        if value is _METHOD:

            def method(this: Remote, *args: Any, **kwargs: Any) -> Any:
                return this._conn.ask("call", this._ref, name, args, kwargs)

            method.__name__ = name
            return types.MethodType(method, self)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._conn.ask("setattr", self._ref, name, (value,))

    def __repr__(self) -> str:
        return f"<Remote #{self._ref}>"


class _ClientPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Remote):
            return ("ref", object.__getattribute__(obj, "_ref"))
        return None


class _ClientUnpickler(pickle.Unpickler):
    def __init__(self, data: BytesIO, connection: Connection) -> None:
        super().__init__(data)
        self._connection = connection

    def persistent_load(self, pid: Any) -> Any:
        return Remote(self._connection, pid[1])


def connect(path: str | None = None) -> Connection:
    return Connection(path or os.environ["IMAGEPIPE_VBOXSIM_SOCKET"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--version", default="7.0.14")
    parser.add_argument("--qemu", action="store_true")
    options = parser.parse_args()
    serve(options.home, options.socket, options.version, options.qemu)


if __name__ == "__main__":
    main()
