"""Helpers to build and drive the tiny test guest (packer/tiny/guest) in integration and e2e
tests: build its kernel and initrd, make a base disk, log in on its serial console, and
connect to its VNC display like a remote-desktop client.

    files = build_guest(tmp)                 # vmlinuz + initrd.img (cached: < 1 s after once)
    base = tiny_base_image(tmp / "v1")       # BaseImage with disk.qcow2 + kernel + initrd
    with SerialConsole(hv.console_path("lab-1")) as console:
        console.login("alice")
        console.run("echo hi > /home/alice/note")
        console.logout()
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from imagepipe.pool.model import BaseImage

REPO = Path(__file__).resolve().parent.parent
BUILD_GUEST = REPO / "packer" / "tiny" / "guest" / "build-guest.sh"
DESKTOP_CMDLINE = "console=ttyS0 quiet imagepipe.mode=desktop"


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path


def build_guest(outdir: Path) -> GuestFiles:
    """Run build-guest.sh into outdir (cached in $IMAGEPIPE_CACHE after the first run)."""
    outdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BUILD_GUEST), str(outdir)], check=True, capture_output=True, timeout=600)
    return GuestFiles(outdir / "vmlinuz", outdir / "initrd.img")


def make_base_disk(path: Path, size_mb: int = 64) -> Path:
    """A qcow2 base disk holding an empty ext2 file system labelled `desktop` (what the
    image build writes), or a blank disk the guest formats at boot when mkfs is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mkfs = shutil.which("mkfs.ext2")
    if mkfs is None:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mb}M"], check=True
        )
        return path
    raw = path.with_suffix(".raw")
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(raw)], check=True)
    subprocess.run([mkfs, "-q", "-F", "-L", "desktop", str(raw)], check=True)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()
    return path


def tiny_base_image(directory: Path, *, image: str = "tiny", version: int = 1) -> BaseImage:
    """A registered-looking version folder: disk.qcow2, vmlinuz, initrd.img."""
    files = build_guest(directory)
    make_base_disk(directory / "disk.qcow2")
    return BaseImage(
        image=image,
        version=version,
        directory=directory,
        disk="disk.qcow2",
        kernel=files.kernel.name,
        initrd=files.initrd.name,
        cmdline=DESKTOP_CMDLINE,
    )


class SerialConsole:
    """The guest's serial console over the unix socket QEMU serves it on."""

    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self.output = ""  # everything received so far
        self._seen = 0  # wait_for() searches from here
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> SerialConsole:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def wait_for(self, text: str, timeout: float | None = None) -> str:
        """Read until `text` appears (after what earlier waits consumed); return the output
        up to and including it. TimeoutError shows the tail of what was seen."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            found = self.output.find(text, self._seen)
            if found >= 0:
                end = found + len(text)
                chunk = self.output[self._seen : end]
                self._seen = end
                return chunk
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no {text!r} on {self.path}; last output: {self.output[-400:]!r}"
                )
            self._sock.settimeout(min(left, 1.0))
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError(f"console {self.path} closed; last: {self.output[-400:]!r}")
            self.output += data.decode("utf-8", "replace")

    def send_line(self, line: str) -> None:
        self._sock.sendall(line.encode() + b"\n")

    def login(self, user: str, timeout: float | None = None) -> None:
        """Wait for the login prompt (asking for a fresh one) and log `user` in."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.send_line("")  # an empty name makes the guest print a fresh prompt
            try:
                self.wait_for("login: ", timeout=min(3.0, max(deadline - time.monotonic(), 0.1)))
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        self.send_line(user)
        self.wait_for(f"{user}@")  # the prompt is user@<desktop name>:dir$
        self.wait_for("$ ")

    def run(self, command: str, timeout: float | None = None) -> str:
        """Run a shell command in the logged-in session; return its output. The markers are
        computed by the shell, so the echoed command line never matches them."""
        k = time.monotonic_ns() % 1_000_000_000
        self.send_line(f"echo @@$(({k}))@@; {command}; echo @@$(({k + 1}))@@")
        self.wait_for(f"@@{k}@@", timeout)
        out = self.wait_for(f"@@{k + 1}@@", timeout)
        self.wait_for("$ ", timeout)
        return out[: -len(f"@@{k + 1}@@")].replace("\r\n", "\n").strip()

    def prompt(self, timeout: float | None = None) -> str:
        """Ask for a fresh login prompt (while nobody is logged in here); return its line,
        e.g. `lab-1 login: `."""
        self.send_line("")
        return self.wait_for("login: ", timeout).rsplit("\n", 1)[-1]

    def screen(self) -> list[str]:
        """The text on the desktop's screen, line by line without blank lines, as a VNC viewer
        sees it (run while logged in here): the screen shows the active virtual console (tty1),
        whose characters the guest's /dev/vcs1 holds, 80 a line."""
        active = self.run("cat /sys/class/tty/tty0/active")
        assert active == "tty1", f"the screen shows {active}, not the desktop's console tty1"
        text = self.run("fold -w 80 /dev/vcs1")
        return [line.strip() for line in text.splitlines() if line.strip()]

    def logout(self) -> None:
        self.send_line("exit")
        self.wait_for("logged out.")


class VncClient:
    """A remote-desktop client in a few lines of RFB 3.8: handshake with security type None
    and ClientInit, then stay connected until closed."""

    def __init__(
        self, host: str, port: int, *, timeout: float = 10.0, source: str | None = None
    ) -> None:
        """Connect to HOST:PORT, from the loopback address `source` when given (a user's
        own machine, as a balancer with source persistence tells users apart)."""
        bind = None if source is None else (source, 0)
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=bind)
        self.address = "{}:{}".format(*self.sock.getsockname()[:2])

    def handshake(self) -> str:
        """Do the RFB handshake; return the desktop name from ServerInit."""
        version = self._read(12)
        if not version.startswith(b"RFB "):
            raise ConnectionError(f"not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        count = self._read(1)[0]
        if count == 0:
            raise ConnectionError("VNC server refused the connection")
        types = self._read(count)
        if 1 not in types:
            raise ConnectionError(f"VNC server wants authentication: security types {list(types)}")
        self.sock.sendall(b"\x01")  # None
        if self._read(4) != b"\x00\x00\x00\x00":
            raise ConnectionError("VNC security handshake failed")
        self.sock.sendall(b"\x01")  # ClientInit: shared
        header = self._read(24)  # width, height, pixel format, name length
        name_length = int.from_bytes(header[20:24], "big")
        return self._read(name_length).decode("utf-8", "replace")

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("VNC server closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()
