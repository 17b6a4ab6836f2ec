"""The HAProxy admin socket: one short connection per command, as `socat` would do it.

Non-interactive mode: send one line, read until HAProxy closes the connection.
"""

from __future__ import annotations

import socket
from pathlib import Path

from imagepipe.errors import BalancerError

MAX_REPLY = 16 * 1024 * 1024


class HAProxyDownError(BalancerError):
    """Nothing answers on the admin socket: HAProxy is not running (or not there)."""


class AdminSocket:
    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> str:
        """Send one command and return HAProxy's whole reply."""
        if "\n" in line or ";" in line:
            raise BalancerError(f"refusing to send {line!r}: one command per call")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise HAProxyDownError(
                    f"HAProxy does not answer on its admin socket {self.path} ({exc.strerror})"
                ) from None
            except OSError as exc:
                raise BalancerError(
                    f"cannot connect to the HAProxy admin socket {self.path}: {exc}"
                ) from None
            try:
                sock.sendall(line.encode() + b"\n")
                return self._read_all(sock)
            except TimeoutError:
                raise BalancerError(
                    f"HAProxy did not answer {line!r} within {self.timeout:g} s on {self.path}"
                ) from None
            except OSError as exc:
                raise BalancerError(f"HAProxy admin socket {self.path} failed: {exc}") from None

    def answers(self) -> bool:
        """True when a running HAProxy replies on the socket."""
        try:
            return self.command("show version").strip() != ""
        except BalancerError:
            return False

    @staticmethod
    def _read_all(sock: socket.socket) -> str:
        chunks: list[bytes] = []
        size = 0
        while size < MAX_REPLY:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        return b"".join(chunks).decode(errors="replace")
